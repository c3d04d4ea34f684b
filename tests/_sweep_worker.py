"""A small sweep run the way an experiment script runs it; for the kill -9 test.

  python _sweep_worker.py WORKDIR KILL_AFTER CACHE_DIR

With KILL_AFTER = n > 0 the process kills itself with SIGKILL when its (n+1)-th train chunk
starts, wherever the sweep is (async checkpoint writes included). Prints the chunks it ran.
CACHE_DIR: JAX's persistent compilation cache, shared by the test's runs (one after another).
"""

import os
import signal
import sys

from bn_jax import data, settings, sweep, train  # pylint: disable=g-multiple-import
from bn_jax import host


class CountingChunks:
  """`train.train_chunks`, counted, with a SIGKILL at call n + 1."""

  def __init__(self, kill_after):
    self.kill_after, self.calls = kill_after, 0

  def __call__(self, *args):
    self.calls += 1
    if self.kill_after and self.calls > self.kill_after:
      os.kill(os.getpid(), signal.SIGKILL)
    return train.train_chunks(*args)

  def lower(self, *args):
    return train.train_chunks.lower(*args)


workdir, kill_after, cache_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = settings.base_config()
# 300 examples, batch 32: 10 steps an epoch in 4 chunks (3, 3, 3, 1); 3 epochs; 2 configs.
config.update(data='synthetic:400', val_fraction=0.25, seeds=2, epochs=3, batch_size=32,
              hidden=(16,), chunk_steps=3, checkpoint_every_steps=4, checkpoint_min_seconds=0,
              progress=False, compilation_cache_dir=cache_dir,
              concurrent_runs=1)  # one configuration after the other: the kill lands in the 2nd
sweep.enable_compilation_cache(config)
runner = host.OneDevice()
runner.train_chunks = CountingChunks(kill_after)
sweep.sweep(config, data.load(config.data, val_fraction=config.val_fraction),
                 [{'norm': 'batch'}, {'norm': 'none'}], experiment='kill_test',
                 workdir=workdir, runner=runner)
print('chunks run:', runner.train_chunks.calls)
