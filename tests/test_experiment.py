"""Result records and files; the bn_vs_no_bn script end to end on generated data."""

import json
import os
import subprocess
import sys

import pytest

from bn_jax import data
from bn_jax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts run as a user runs them: one CPU device (not conftest's 8 simulated ones).
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
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


def test_bn_vs_no_bn_script_end_to_end(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py'),
         f'--workdir={workdir}', '--config.data=synthetic:600', '--config.seeds=2',
         '--config.epochs=2', '--config.batch_size=64', '--config.progress=false',
         f'--config.compilation_cache_dir={tmp_path / "cache"}']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                       env=SCRIPT_ENV)
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


def test_learning_rate_scaling_rules():
  lr = experiment.scaled_learning_rate
  assert lr(1e-3, 256, 32, 'none') == 1e-3
  assert lr(1e-3, 256, 32, 'linear') == pytest.approx(8e-3)
  assert lr(1e-3, 256, 32, 'sqrt') == pytest.approx(1e-3 * 8**0.5)
  assert lr(1e-3, 8, 32, 'linear') == pytest.approx(2.5e-4)
  with pytest.raises(ValueError, match="unknown lr_scaling 'cube'"):
    lr(1e-3, 64, 32, 'cube')


def test_to_target_is_the_first_point_reaching_it():
  curve = [{'step': 5, 'examples': 160, 'val_accuracy': 0.5},
           {'step': 10, 'examples': 300, 'val_accuracy': 0.81},
           {'step': 15, 'examples': 460, 'val_accuracy': 0.79},
           {'step': 20, 'examples': 600, 'val_accuracy': 0.9}]
  assert experiment.to_target(curve, 0.8) == {'step': 10, 'examples': 300}
  assert experiment.to_target(curve, 0.9) == {'step': 20, 'examples': 600}
  assert experiment.to_target(curve, 0.95) is None


def test_resolve_rejects_unknown_keys():
  with pytest.raises(KeyError, match="unknown config key 'batchsize'"):
    experiment.resolve(experiment.base_config(), batchsize=3)


def _run_batch_sizes(workdir, cache):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'batch_sizes.py'),
         f'--workdir={workdir}', '--config.data=synthetic:600', '--config.seeds=2',
         '--config.batch_sizes=(32,64)', '--config.epochs=2', '--config.progress=false',
         '--config.target_val_accuracy=0.5', f'--config.compilation_cache_dir={cache}']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                       env=SCRIPT_ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_batch_sizes_script_end_to_end_and_warm_cache(tmp_path):
  cache = tmp_path / 'cache'
  out = _run_batch_sizes(tmp_path / 'cold', cache)
  records = [json.loads(line) for line in open(tmp_path / 'cold' / 'results.jsonl')]
  assert sorted((r['norm'], r['batch_size'], r['seed']) for r in records) == [
      (n, b, s) for n in ('batch', 'none') for b in (32, 64) for s in (0, 1)]
  for r in records:
    assert RECORD_KEYS <= set(r) and r['experiment'] == 'batch_sizes'
    assert r['steps'] == 2 * -(-540 // r['batch_size'])  # 2 epochs of ceil(540 / b) steps
    assert len(r['curve']) == 2 * 4 and r['curve'][-1]['step'] == r['steps']
    reached = experiment.to_target(r['curve'], 0.5)
    assert r['to_target'] == reached
  summary = (tmp_path / 'cold' / 'summary.md').read_text()
  for b in (32, 64):
    for n in ('batch', 'none'):
      assert f'| {b} | {n} | 2 |' in summary
  assert 'steps to 0.5 val acc' in summary and 'train−val gap' in summary
  for name in ('accuracy_vs_batch_size.png', 'curves.png'):
    assert (tmp_path / 'cold' / name).read_bytes()[:4] == b'\x89PNG'
  assert '| 32 | batch | 2 |' in out.stdout

  # A second run with the same cache compiles nothing: every compiled program is written to
  # the persistent cache on a miss, so an unchanged cache means every program was a hit.
  entries = sorted(os.listdir(cache))
  assert len(entries) >= 4  # at least the 4 train-chunk programs
  _run_batch_sizes(tmp_path / 'warm', cache)
  assert sorted(os.listdir(cache)) == entries


@pytest.mark.parametrize('bn_stats, data_parallel, norm, axis_name', [
    ('sync', True, 'batch', 'batch'), ('sync', False, 'batch', None),
    ('local', True, 'batch', None), ('ghost', True, 'ghost', None)])
def test_bn_stats_pick_the_statistics_group(bn_stats, data_parallel, norm, axis_name):
  config = experiment.resolve(experiment.base_config(), bn_stats=bn_stats, bn_group_size=4)
  model = experiment.make_model(config, data_parallel)
  assert (model.norm, model.bn_axis_name) == (norm, axis_name)
  assert experiment.make_model(config, data_parallel, norm='none').norm == 'none'
  with pytest.raises(ValueError, match="unknown bn_stats 'global'"):
    experiment.make_model(experiment.resolve(config, bn_stats='global'))


def test_config_sets_the_layers_of_either_model():
  config = experiment.resolve(experiment.base_config(), hidden=(7, 5), features=(3, 4, 6),
                              init_scale=2.0)
  mlp = experiment.make_model(config)
  assert (mlp.hidden, mlp.init_scale) == ((7, 5), 2.0)
  cnn = experiment.make_model(config, model='cnn')
  assert (cnn.features, cnn.init_scale) == ((3, 4, 6), 2.0)


def test_script_on_simulated_devices_with_pmap_and_ghost_bn(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py'),
         f'--workdir={tmp_path}', '--config.data=synthetic:600', '--config.seeds=1',
         '--config.epochs=1', '--config.progress=false', '--config.norms=("batch",)',
         '--config.devices=4', '--config.parallel=pmap', '--config.bn_stats=ghost',
         '--config.bn_group_size=4', '--config.compilation_cache=false']
  env = {**SCRIPT_ENV, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  (record,) = [json.loads(line) for line in open(tmp_path / 'results.jsonl')]
  assert record['devices'] == {'platform': 'cpu', 'count': 4, 'processes': 1}
  assert record['config']['bn_stats'] == 'ghost' and record['config']['parallel'] == 'pmap'
  assert record['steps'] == 540 // 32  # several devices: whole batches only
