"""One process of the multi-host test: trains on the global mesh, process 0 saves the result.

  python _multihost_worker.py PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS PORT OUT.npz
"""

import os
import sys

pid, nproc, ndev, port, out = sys.argv[1:6]
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={ndev}'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from bn_jax import data, loop, models, parallel  # pylint: disable=wrong-import-position

parallel.initialize_distributed(f'127.0.0.1:{port}', int(nproc), int(pid))
runner = parallel.DataParallel()  # every device of every process
assert runner.num_devices == int(nproc) * int(ndev), runner.num_devices
dataset = data.load('synthetic:400', val_fraction=0.2)  # each host loads all; uses its shards
model = models.create_model('mlp', hidden=(16,), dropout=0.2, norm='batch', bn_axis_name='batch')
results, states = loop.fit(model, dataset, seeds=(0, 1), batch_size=32, epochs=2,
                            chunk_steps=4, progress=False, runner=runner)
if jax.process_index() == 0:
  leaves = jax.tree_util.tree_leaves_with_path((states.params, states.batch_stats))
  arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
  arrays['val_accuracy'] = np.array([r['final']['val_accuracy'] for r in results])
  arrays['train_loss'] = np.array([r['final']['train_loss'] for r in results])
  np.savez(out, **arrays)
if int(nproc) > 1:
  jax.distributed.shutdown()
