"""Faults at the level of a sweep: kill -9 and resume, torn records, seeds partly recorded,
data changed under a workdir, divergence, a batch larger than the training set (the checks
themselves are in test_settings.py)."""

import json
import os
import subprocess
import sys

import pytest

from _limits import HANG_SECONDS

from bn_jax import data
from bn_jax import results
from bn_jax import settings
from bn_jax import sources
from bn_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as a user runs
VOLATILE = ('wall_seconds', 'compile_seconds', 'finished')


def _sweep(workdir, kill_after=0):
  return subprocess.run([sys.executable, os.path.join(HERE, '_sweep_worker.py'), str(workdir),
                         str(kill_after), str(workdir.parent / 'jax_cache')], capture_output=True,
                        text=True, timeout=HANG_SECONDS, env=ENV, check=False)


def _records(workdir):
  records = [json.loads(line) for line in open(workdir / 'results.jsonl')]
  for r in records:
    for key in VOLATILE:
      r.pop(key)
    for h in r['history']:
      h.pop('seconds')
  return sorted(records, key=lambda r: (r['run_key'], r['seed']))  # file order: finish order


@pytest.mark.slow
def test_killed_sweep_resumes_runs_only_what_is_unfinished_and_matches(tmp_path):
  clean = _sweep(tmp_path / 'clean')
  assert clean.returncode == 0, clean.stderr[-3000:]
  assert 'chunks run: 24' in clean.stdout  # 2 configurations x 3 epochs x 4 chunks

  # Killed (SIGKILL) as the 6th chunk of the second configuration starts: the first
  # configuration is finished and recorded, the second has checkpoints at steps 6 and 10.
  killed = _sweep(tmp_path / 'killed', kill_after=17)
  assert killed.returncode == -9
  assert len(open(tmp_path / 'killed' / 'results.jsonl').readlines()) == 2

  resumed = _sweep(tmp_path / 'killed')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # From step 10 (8 chunks left), or from step 6 if the kill caught step 10's asynchronous
  # save before it was finalized (10 chunks left); never from scratch (12).
  chunks = int(resumed.stdout.split('chunks run:')[1])
  assert chunks in (8, 10), resumed.stdout
  for a, b in zip(_records(tmp_path / 'killed'), _records(tmp_path / 'clean')):
    for key in a:  # bit-identical on CPU, field by field
      assert a[key] == b[key], (key, chunks)


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path):
  config = settings.base_config()
  config.update(data='synthetic:400', val_fraction=0.25, seeds=1, epochs=2, hidden=(16,),
                norm='none', progress=False, compilation_cache=False, devices=1)
  records = sweep.sweep(config, data.load(config.data, val_fraction=0.25),
                             [{'learning_rate': 1e30}, {'learning_rate': 1e-3}],
                             experiment='t', workdir=str(tmp_path))
  assert [r['status'] for r in records] == ['diverged', 'ok']
  assert records[0]['diverged_at'] == {'epoch': 1, 'step': 10}
  assert len(records[0]['history']) == 1  # stopped once every seed had diverged
  assert len(records[1]['history']) == 2 and records[1]['final']['val_loss'] < 10  # finite
  assert not (tmp_path / 'checkpoints').exists()  # each run's checkpoints, then the folder
  on_disk = {json.loads(line)['config']['learning_rate']: json.loads(line)['status']
             for line in open(tmp_path / 'results.jsonl')}  # in the order the runs finished
  assert on_disk == {1e30: 'diverged', 1e-3: 'ok'}


def test_batch_larger_than_the_training_set_is_refused(tmp_path):
  config = settings.base_config()
  config.update(data='synthetic:400', batch_size=1000, progress=False, compilation_cache=False,
                devices=1)
  with pytest.raises(settings.ConfigError, match=r'batch_size must be in \[1, 360\]'):
    sweep.sweep(config, data.load(config.data), [{}], experiment='t', workdir=str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before the workdir was touched


def _tiny(**overrides):
  config = settings.base_config()
  config.update({**dict(data='synthetic:400', seeds=2, epochs=2, hidden=(16,), progress=False,
                        compilation_cache=False, devices=1, concurrent_runs=1), **overrides})
  return config


def _numbers(records):
  return [(r['run_key'], r['seed'], r['final'], r['curve'], r['status']) for r in records]


def test_torn_or_unterminated_records_neither_break_the_workdir_nor_lose_runs(tmp_path,
                                                                             capsys):
  config, dataset = _tiny(seeds=1), data.load('synthetic:400')  # one seed: alone is as before
  grid = [{'norm': 'batch'}, {'norm': 'none'}]
  first = sweep.sweep(config, dataset, grid, experiment='t', workdir=str(tmp_path))
  path = tmp_path / 'results.jsonl'
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 1)  # `truncate -s -1`: the last newline gone
  for _ in range(2):  # the sequence: every later call went on failing
    again = sweep.sweep(config, dataset, grid, experiment='t', workdir=str(tmp_path))
    assert 'training 0 runs' in capsys.readouterr().out and again == first
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 100)  # the last record cut short
  again = sweep.sweep(config, dataset, grid, experiment='t', workdir=str(tmp_path))
  out, err = capsys.readouterr()
  assert '1 of 2 runs finished before; training 1 runs' in out and 'line 2 is torn' in err
  assert _numbers(again) == _numbers(first)  # the lost run trained again, to the same numbers
  assert len(results.read_records(path)) == 2


def test_a_configuration_whose_seeds_were_partly_recorded_resumes_them_together(
    tmp_path, monkeypatch):
  config, dataset = _tiny(checkpoint_min_seconds=0.0), data.load('synthetic:400')
  uninterrupted = sweep.sweep(config, dataset, [{}], experiment='t')
  real_append = results.append_records

  def disk_full_after_one(path, records):  # seed 0's line written, then the disk is full
    real_append(path, records[:1])
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(results, 'append_records', disk_full_after_one)
  with pytest.raises(OSError, match='No space left'):
    sweep.sweep(config, dataset, [{}], experiment='t', workdir=str(tmp_path))
  monkeypatch.setattr(results, 'append_records', real_append)
  assert [r['seed'] for r in results.read_records(tmp_path / 'results.jsonl')] == [0]
  resumed = sweep.sweep(config, dataset, [{}], experiment='t', workdir=str(tmp_path))
  assert _numbers(resumed) == _numbers(uninterrupted)  # seed 1 trained with seed 0, as before
  assert [r['seed'] for r in results.read_records(tmp_path / 'results.jsonl')] == [0, 1]


@pytest.mark.slow
def test_data_that_changed_under_a_workdir_is_trained_again(tmp_path, capsys):
  directory = tmp_path / 'data'
  directory.mkdir()

  def write(num_train, seed):
    (x, y), (xt, yt) = data.synthetic(num_train=num_train, num_test=50, seed=seed)
    for key, array in (('train_images', x[..., 0]), ('train_labels', y),
                       ('test_images', xt[..., 0]), ('test_labels', yt)):
      sources.write_idx(str(directory / sources.IDX_FILES[key]), array)

  config = _tiny(data=f'idx:{directory}', seeds=1, epochs=1)
  write(600, seed=0)
  before = sweep.sweep(config, data.load(config.data), [{}], experiment='t',
                       workdir=str(tmp_path / 'run'))
  write(400, seed=1)  # other files under the same path: 540 -> 360 training examples
  after = sweep.sweep(config, data.load(config.data), [{}], experiment='t',
                      workdir=str(tmp_path / 'run'))
  assert ': 0 of 1 runs finished before; training 1 runs' in capsys.readouterr().out
  assert after[0]['run_key'] != before[0]['run_key']
  assert after[0]['identity']['data_content'] != before[0]['identity']['data_content']
  assert after[0]['steps'] < before[0]['steps']  # trained on the new, smaller set
