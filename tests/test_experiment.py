"""Result records and files; the bn_vs_no_bn script end to end on generated data."""

import json
import os
import subprocess
import sys

import pytest

from bn_jax import data
from bn_jax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_KEYS = {'experiment', 'model', 'norm', 'seed', 'batch_size', 'learning_rate', 'epochs',
               'data', 'config', 'history', 'final', 'wall_seconds', 'status', 'versions',
               'devices'}
HISTORY_KEYS = {'epoch', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'seconds'}
FINAL_KEYS = {'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'test_loss',
              'test_accuracy', 'train_eval_loss', 'train_eval_accuracy'}


def test_run_makes_one_record_per_seed_with_overrides_applied():
  config = experiment.base_config()
  config.update(data='synthetic:200', seeds=2, epochs=1, hidden=(8,), progress=False)
  records = experiment.run(config, data.load(config.data), experiment='t', norm='none',
                           batch_size=50)
  assert [r['seed'] for r in records] == [0, 1]
  for r in records:
    assert RECORD_KEYS <= set(r)
    assert r['norm'] == 'none' and r['config']['norm'] == 'none' and r['batch_size'] == 50
    assert r['config']['seed'] == r['seed'] and r['config']['hidden'] == [8]
  assert config.norm == 'batch'  # the caller's config is left as it was


def test_atomic_write_and_records_round_trip(tmp_path):
  path = os.path.join(tmp_path, 'sub', 'summary.md')
  experiment.atomic_write(path, 'hello')
  experiment.atomic_write(path, 'world')
  assert open(path).read() == 'world'
  assert os.listdir(os.path.dirname(path)) == ['summary.md']  # no temporary left behind
  results = os.path.join(tmp_path, 'results.jsonl')
  experiment.append_records(results, [{'a': 1}, {'a': float('nan')}])
  with open(results, 'a') as f:
    f.write('{"torn": ')  # a crash in the middle of a line
  records = experiment.read_records(results)
  assert records[0] == {'a': 1} and len(records) == 2


def test_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(NotADirectoryError, match='is a file'):
    experiment.prepare_workdir(str(path))


def test_bn_vs_no_bn_script_end_to_end(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py'),
         f'--workdir={workdir}', '--config.data=synthetic:600', '--config.seeds=2',
         '--config.epochs=2', '--config.batch_size=64', '--config.progress=false']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / 'results.jsonl')]
  assert [(r['norm'], r['seed']) for r in records] == [
      ('batch', 0), ('batch', 1), ('none', 0), ('none', 1)]
  for r in records:
    assert RECORD_KEYS <= set(r)
    assert r['experiment'] == 'bn_vs_no_bn' and r['status'] == 'ok'
    assert r['epochs'] == 2 and r['batch_size'] == 64 and r['data'] == 'synthetic:600'
    assert [set(h) for h in r['history']] == [HISTORY_KEYS] * 2
    assert set(r['final']) == FINAL_KEYS
    assert r['final']['val_accuracy'] == r['history'][-1]['val_accuracy']
    assert set(r['versions']) == {'python', 'jax', 'flax', 'optax'}
  summary = (workdir / 'summary.md').read_text()
  assert '| mlp | batch | 2 |' in summary and '| mlp | none | 2 |' in summary
  assert summary in out.stdout or summary.split('\n\n', 1)[1] in out.stdout
  assert (workdir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
