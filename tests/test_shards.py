"""Scaling a sweep out: shards of one workdir (each pair trained once, each shard its own lock
and results file, the tables from all of them) and one configuration per device."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from _limits import HANG_SECONDS

from bn_jax import data
from bn_jax import errors
from bn_jax import locks
from bn_jax import results
from bn_jax import settings
from bn_jax import shards
from bn_jax import sweep


def test_parse_reads_i_of_n_or_slurms_array_variables():
  assert shards.parse('1/4', {}) == (1, 4) and shards.parse(' 0 / 2 ', {}) == (0, 2)
  assert shards.parse('', {}) is None and shards.parse('0/1', {}) is None
  slurm = {'SLURM_ARRAY_TASK_ID': '3', 'SLURM_ARRAY_TASK_COUNT': '4',
           'SLURM_ARRAY_TASK_MIN': '1'}  # --array=1-4
  assert shards.parse('', slurm) == (2, 4) and shards.parse('0/2', slurm) == (0, 2)
  for bad in ('4/4', '1', 'a/b', '-1/3'):
    with pytest.raises(errors.ConfigError, match=r'must be I/N with 0 <= I < N'):
      shards.parse(bad, {})


def test_every_configuration_belongs_to_exactly_one_shard_and_the_split_is_even():
  keys = [f'{k:012x}' for k in range(10)]
  parts = [shards.assigned((i, 4), reversed(keys)) for i in range(4)]  # any order: sorted
  assert sorted(k for part in parts for k in part) == keys  # each once
  assert [len(p) for p in parts] == [3, 3, 2, 2]
  assert parts[1] == {keys[1], keys[5], keys[9]}
  assert shards.assigned(None, keys) == set(keys)


def test_shards_of_another_count_are_refused(tmp_path):
  (tmp_path / 'results.shard-1-of-4.jsonl').write_text('')
  with pytest.raises(errors.WorkdirError, match=r'holds the results of 4 shards .*'
                     r'--config.shard=I/4'):
    results.Workdir(str(tmp_path), 't', shard=(0, 2))


def test_an_unsharded_process_waits_for_none_while_a_shard_holds_its_lock(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
      import fcntl, sys, time
      f = open({str(tmp_path / '.lock.shard-0-of-2')!r}, 'a+')
      fcntl.flock(f, fcntl.LOCK_EX); f.write('pid shard'); f.flush()
      print('held', flush=True); time.sleep(60)''')], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(locks.WorkdirInUse, match=r'in use by pid shard \(.lock.shard-0-of-2\)'):
      locks.lock(str(tmp_path))
  finally:
    holder.kill()
    holder.wait()


def _config(**overrides):
  config = settings.base_config()
  config.update({**dict(data='synthetic:200', seeds=2, epochs=1, hidden=(8,), progress=False,
                        compilation_cache=False, tensorboard=False), **overrides})
  return config


@pytest.mark.slow
def test_per_device_placement_gives_each_run_its_one_device_numbers(tmp_path):
  grid = [{'batch_size': b} for b in (16, 32, 48)]
  dataset = data.load('synthetic:200')
  alone = sweep.sweep(_config(devices=1), dataset, grid, experiment='t',
                      workdir=str(tmp_path / 'one'))
  spread = sweep.sweep(_config(placement='per_device'), dataset, grid, experiment='t',
                       workdir=str(tmp_path / 'spread'))
  assert [r['run_key'] for r in spread] == [r['run_key'] for r in alone]  # one-device runs
  for a, b in zip(alone, spread):
    assert a['final'] == b['final'] and a['history'][0]['train_loss'] == (
        b['history'][0]['train_loss'])
  used = {r['devices']['device'] for r in spread}
  assert len(used) == 3 and {r['devices']['placement'] for r in spread} == {'per_device'}


SCRIPT = '''
from bn_jax import cli, report, settings, sweep

def get_config():
  c = settings.base_config()
  c.update(data='synthetic:400', seeds=3, epochs=2, hidden=(16,), progress=False,
           compilation_cache=False, tensorboard=False, devices=1)
  return c

def main(config, workdir):
  grid = [{'norm': n, 'batch_size': b} for n in ('batch', 'none') for b in (16, 32)]
  records = sweep.sweep(config, sweep.load_data(config), grid, experiment='t', workdir=workdir)
  print(report.summary_table(records, keys=('norm', 'batch_size')))

if __name__ == '__main__':
  cli.run(main, get_config)
'''


@pytest.mark.slow
def test_two_shards_one_killed_and_restarted_train_each_pair_once(tmp_path):
  script = tmp_path / 'study.py'
  script.write_text(textwrap.dedent(SCRIPT))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  command = lambda workdir, *flags: [sys.executable, str(script), f'--workdir={workdir}', *flags]
  run = lambda *a: subprocess.run(command(*a), capture_output=True, text=True,
                                  timeout=HANG_SECONDS, env=env, check=False)
  alone = run(tmp_path / 'alone')
  assert alone.returncode == 0, alone.stderr[-2000:]
  table = alone.stdout[alone.stdout.index('| norm'):]
  shared = tmp_path / 'shared'
  first = subprocess.Popen(command(shared, '--config.shard=0/2'), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
  killed = subprocess.Popen(command(shared, '--config.shard=1/2'), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
  own = shared / 'results.shard-1-of-2.jsonl'
  deadline = time.monotonic() + HANG_SECONDS
  while killed.poll() is None and time.monotonic() < deadline:
    if own.exists() and own.read_text().count('\n') >= 1:  # one configuration recorded
      break
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  out, err = first.communicate(timeout=HANG_SECONDS)
  assert first.returncode == 0, err[-2000:]
  restarted = run(shared, '--config.shard=1/2')
  assert restarted.returncode == 0, restarted.stderr[-2000:]
  pairs = [(r['run_key'], r['seed']) for name in ('results.shard-0-of-2.jsonl',
                                                  'results.shard-1-of-2.jsonl')
           for r in results.read_records(shared / name)]
  assert len(pairs) == 12 and len(set(pairs)) == 12  # 4 configurations x 3 seeds, once each
  assert 0 < len(results.read_records(own)) < 12  # each shard trained some configurations
  assert not (shared / 'results.jsonl').exists()
  assert table in restarted.stdout  # the last shard to finish prints the whole table
  assert 'runs of other shards are not finished yet' in out or table in out
  again = run(shared)
  assert again.returncode == 0 and 'training 0 runs' in again.stdout, again.stderr[-2000:]
  assert table in again.stdout
