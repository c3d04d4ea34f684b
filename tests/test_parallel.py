"""Data parallelism on 8 simulated CPU devices (see conftest) and on 2 processes."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from _limits import HANG_SECONDS

from bn_jax import data
from bn_jax import host
from bn_jax import loop
from bn_jax import models
from bn_jax import optim
from bn_jax import parallel
from bn_jax import programs as programs_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# A user's environment: one CPU device per process (the workers set their own device count).
ONE_DEVICE_ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


@pytest.fixture(scope='module')
def dataset():
  return data.load('synthetic:400', val_fraction=0.2)  # 320 train: 10 whole batches of 32


def _fit(dataset, runner=host.ONE_DEVICE, epochs=2, loss_scale=False, optimizer=None,
         **model_kwargs):
  model = models.create_model('mlp', hidden=(16,), **{'dropout': 0.0, **model_kwargs})
  return loop.fit(model, dataset, seeds=(0, 1), batch_size=32, epochs=epochs, progress=False,
                   runner=runner, loss_scale=loss_scale, optimizer=optimizer)


def _assert_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


@pytest.mark.slow
def test_sync_on_8_devices_equals_one_device_on_the_whole_batch(dataset):
  assert len(jax.devices()) == 8
  one, s1 = _fit(dataset, norm='batch')
  eight, s8 = _fit(dataset, parallel.DataParallel(8), norm='batch', bn_axis_name='batch')
  # 20 Adam steps: Adam's early steps are ~lr * sign(g), so rounding differences in tiny
  # gradients show up at ~1e-5; BN statistics and losses agree much closer.
  _assert_close(s1.params, s8.params, atol=1e-4)
  _assert_close(s1.batch_stats, s8.batch_stats, atol=1e-5)
  for a, b in zip(one, eight):
    for h1, h8 in zip(a['history'], b['history']):
      assert h1['train_loss'] == pytest.approx(h8['train_loss'], rel=1e-5)
      assert h1['val_accuracy'] == pytest.approx(h8['val_accuracy'], abs=1e-6)
  # Per-device statistics would differ: local BN on 8 devices is another model.
  _, local = _fit(dataset, parallel.DataParallel(8), norm='batch')
  assert _max_diff(s1.batch_stats, local.batch_stats) > 1e-3


@pytest.mark.slow
def test_float16_loss_scaling_on_8_devices_equals_one_device(dataset):
  # SGD: an update proportional to the gradient, so a gradient summed wrongly over devices
  # would show (Adam's update hardly depends on the gradient's scale).
  kwargs = dict(norm='batch', dtype=np.float16, loss_scale=True,
                optimizer=optim.make_optimizer('sgd', learning_rate=0.05))
  _, s1 = _fit(dataset, **kwargs)
  _, s8 = _fit(dataset, parallel.DataParallel(8), bn_axis_name='batch', **kwargs)
  # the same scale on every device and in both runs: 20 finite steps counted, none skipped
  np.testing.assert_array_equal(s1.dynamic_scale.fin_steps, [20, 20])
  np.testing.assert_array_equal(s8.dynamic_scale.fin_steps, s1.dynamic_scale.fin_steps)
  # Float16 sums in another order: a few of the 25k weights drift by ~1e-3 over the 20 steps;
  # a gradient summed wrongly over the devices would move all of them.
  _assert_close(s1.params, s8.params, atol=5e-3)
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(np.asarray(x) - np.asarray(y)),
                                       s1.params, s8.params))
  assert np.mean(np.concatenate([d.ravel() for d in diffs])) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['shard_map', 'pmap'])
def test_sgd_on_8_devices_takes_the_one_device_step(dataset, kind):
  """SGD's update is proportional to the gradient: a gradient summed once too often over the
  devices (shard_map differentiating replicated params) would show as 8x the step."""
  sgd = optim.make_optimizer('sgd', learning_rate=0.05)
  _, s1 = _fit(dataset, norm='batch', optimizer=sgd)
  _, s8 = _fit(dataset, parallel.DataParallel(8, kind), norm='batch', bn_axis_name='batch',
               optimizer=sgd)
  _assert_close(s1.params, s8.params, atol=1e-5)


@pytest.mark.slow
def test_local_on_8_devices_equals_ghost_per_device_batch_on_one_device(dataset):
  _, local = _fit(dataset, parallel.DataParallel(8), norm='batch')
  _, ghost = _fit(dataset, norm='ghost', bn_group_size=32 // 8)
  _assert_close(local.params, ghost.params, atol=1e-4)
  _assert_close(local.batch_stats, ghost.batch_stats, atol=1e-5)


@pytest.mark.slow
def test_ghost_with_group_equal_to_batch_equals_plain_bn(dataset):
  _, plain = _fit(dataset, norm='batch', epochs=1)
  _, ghost = _fit(dataset, norm='ghost', bn_group_size=32, epochs=1)
  _assert_close(plain.params, ghost.params, atol=1e-4)
  _assert_close(plain.batch_stats, ghost.batch_stats, atol=1e-5)


@pytest.mark.slow
def test_shard_map_and_pmap_agree_step_for_step(dataset):
  kwargs = dict(norm='batch', bn_axis_name='batch', dropout=0.2)  # dropout on: same rngs
  runs = {}
  for kind in parallel.KINDS:
    model = models.create_model('mlp', hidden=(16,), **kwargs)
    runs[kind] = loop.fit(model, dataset, seeds=(0, 1), batch_size=32, epochs=1,
                           chunk_steps=1, evals_per_epoch=10, progress=False,
                           runner=parallel.DataParallel(4, kind))
  (a, sa), (b, sb) = runs['shard_map'], runs['pmap']
  for ra, rb in zip(a, b):
    assert len(ra['curve']) == 10  # validated after every step
    for pa, pb in zip(ra['curve'], rb['curve']):
      assert pa['val_loss'] == pytest.approx(pb['val_loss'], rel=1e-5)
  _assert_close(sa.params, sb.params, atol=1e-5)
  _assert_close(sa.batch_stats, sb.batch_stats, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('bn_axis_name', ['batch', None])  # sync, local
def test_running_averages_are_identical_on_every_device(dataset, bn_axis_name):
  runner = parallel.DataParallel(8)
  model = models.create_model('mlp', hidden=(16,), norm='batch', bn_axis_name=bn_axis_name)
  data_on_devices = host.DeviceData.put(dataset, runner)
  schedule = loop.Schedule(320, 32, epochs=1, num_devices=8)
  programs = programs_lib.compile_programs(model, data_on_devices, schedule, seeds=[0],
                                            learning_rate=1e-3, runner=runner)
  order = runner.put(host.epoch_order(0, 0, num_examples=320, batch_size=32,
                                       num_rows=10)[None], split_last=True)
  rngs = runner.put(jax.random.split(jax.random.key(0), 1))
  states, _ = runner.train_chunks(programs.states, data_on_devices.arrays, order, rngs, 0, 10)
  for leaf in jax.tree.leaves(states.batch_stats):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 8
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])
  assert np.abs(np.asarray(jax.tree.leaves(states.batch_stats)[0])).max() > 0


@pytest.mark.slow
def test_dropout_differs_per_device(dataset):
  # Same data, same init; with dropout each device must draw its own mask, so the 8-device
  # run is not the 1-device run (which draws one mask for the whole batch).
  _, one = _fit(dataset, epochs=1, norm='none', dropout=0.5)
  _, eight = _fit(dataset, parallel.DataParallel(8), epochs=1, norm='none', dropout=0.5)
  assert _max_diff(one.params, eight.params) > 1e-4


def test_bad_device_settings_are_clear_errors(dataset):
  with pytest.raises(ValueError, match='batch_size 36 is not divisible by the 8 devices'):
    loop.fit(models.create_model('mlp', hidden=(8,)), dataset, batch_size=36, epochs=1,
              progress=False, runner=parallel.DataParallel(8))
  with pytest.raises(ValueError, match='devices=9, but JAX sees 8'):
    parallel.DataParallel(9)
  with pytest.raises(ValueError, match="unknown parallel 'xmap'"):
    parallel.DataParallel(2, 'xmap')
  with pytest.raises(ValueError, match='bn_group_size=3 must divide the batch of 4'):
    _fit(dataset, parallel.DataParallel(8), norm='ghost', bn_group_size=3, epochs=1)


@contextlib.contextmanager
def _reserved_port():
  """A loopback port that stays reserved until the block ends.

  Binding port 0 and closing the socket before the coordinator binds the number leaves a
  window in which any other socket can take it: another process's bind, or an outgoing
  connection's ephemeral port (a worker's own gRPC client retrying before the coordinator
  listens can even connect to itself on that port). The coordinator then fails with 'Failed
  to start RPC server'. So the socket stays bound while the workers run: with SO_REUSEPORT,
  which gRPC also sets on its listening socket, the coordinator can bind the same port, while
  the kernel gives the port to no ephemeral bind or connect. It never listens, so every
  connection reaches the coordinator.
  """
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(('127.0.0.1', 0))
    yield s.getsockname()[1]


def _run_together(commands, envs, logs):
  """Starts every command at once (command i with envs[i], output to logs[i]), waits for all;
  their exit codes."""
  # Each worker writes to its own log file, not a pipe: a pipe nobody reads while we wait for
  # another worker would block a chatty worker, and the collectives the others wait in.
  with contextlib.ExitStack() as files:
    procs = [subprocess.Popen(command, env={**env, 'PYTHONUNBUFFERED': '1'},
                              stdout=files.enter_context(open(log, 'w')),
                              stderr=subprocess.STDOUT)
             for command, env, log in zip(commands, envs, logs)]
    try:
      for p in procs:
        p.wait(timeout=HANG_SECONDS)
    finally:
      for p in procs:  # never leave a process behind, whatever happened
        if p.poll() is None:
          p.kill()
          p.wait()
  return [p.returncode for p in procs]


# The multi-host test's experiment: tiny, and nothing written outside its workdirs.
SCRIPT = os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py')
TINY = ('--config.data=synthetic:400', '--config.epochs=1', '--config.seeds=2',
        '--config.progress=false', '--config.tensorboard=false',
        '--config.compilation_cache=false')


def _readme_multihost_flags(address, num_processes, process_id):
  """The flags docs/devices.md (linked from README.md) tells every host to add, its
  placeholders filled in."""
  with open(os.path.join(ROOT, 'docs', 'devices.md')) as f:
    readme = ' '.join(f.read().split())  # its paragraphs wrap lines anywhere
  match = re.search(r'Several hosts: start the same command on every host with `([^`]+)`',
                    readme)
  assert match, 'docs/devices.md no longer documents the multi-host launch ("Several hosts: ...").'
  values = {'HOST0:PORT': address, 'P': str(num_processes), 'I': str(process_id)}
  flags = [flag.split('=', 1) for flag in match.group(1).split()]
  assert [name for name, _ in flags] == ['--config.coordinator_address',
                                         '--config.num_processes', '--config.process_id']
  return [f'{name}={values[placeholder]}' for name, placeholder in flags]


def _records(workdir):
  records = [json.loads(line) for line in open(workdir / 'results.jsonl')]
  return sorted(records, key=lambda r: (r['run_key'], r['seed']))  # file order: finish order


def _measurements(record):
  """A record's numbers: final metrics, per-epoch history and curve, without timings."""
  history = [{k: v for k, v in h.items() if k != 'seconds'} for h in record['history']]
  return {'final': record['final'], 'history': history, 'curve': record['curve']}


@pytest.mark.slow
def test_readme_multihost_command_runs_as_written(tmp_path):
  """docs/devices.md's launch of several hosts, exactly as written, on 2 processes over loopback
  with 2 CPU devices each: both exit 0, process 0 alone records and prints, and its records hold
  the numbers of 1 process on 4 devices (which runs at the same time)."""
  devices = lambda n: {**ONE_DEVICE_ENV, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
  logs = [tmp_path / f'{name}.log' for name in ('process0', 'process1', 'single')]
  with _reserved_port() as port:
    hosts = [[sys.executable, SCRIPT, *TINY, f'--workdir={tmp_path / "multi"}',
              *_readme_multihost_flags(f'127.0.0.1:{port}', 2, i)] for i in range(2)]
    single = [sys.executable, SCRIPT, *TINY, f'--workdir={tmp_path / "single"}']
    codes = _run_together(hosts + [single], [devices(2), devices(2), devices(4)], logs)
  for code, log in zip(codes, logs):
    assert code == 0, log.read_text()[-3000:]
  printed = [log.read_text() for log in logs]
  assert '| mlp | batch | 2 |' in printed[0] and '| mlp | none | 2 |' in printed[0], printed[0]
  assert '| model |' not in printed[1] and 'wrote ' not in printed[1], printed[1]
  multi, one = _records(tmp_path / 'multi'), _records(tmp_path / 'single')
  assert len(multi) == len(one) == 2 * 2  # BN and no BN, 2 seeds each
  for m, o in zip(multi, one):
    assert m['devices']['processes'] == 2 and o['devices']['processes'] == 1
    assert m['devices']['count'] == o['devices']['count'] == 4
    assert (m['run_key'], m['seed'], m['steps']) == (o['run_key'], o['seed'], o['steps'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _measurements(m), _measurements(o))
