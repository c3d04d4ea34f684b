"""The sweep: records, what a workdir re-uses (growing grids and seeds, code versions), and
the experiment scripts end to end on generated data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _limits import HANG_SECONDS

from bn_jax import code_version
from bn_jax import data
from bn_jax import errors
from bn_jax import loop
from bn_jax import report
from bn_jax import results
from bn_jax import settings
from bn_jax import placement
from bn_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts run as a user runs them: one CPU device (not conftest's 8 simulated ones).
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
RECORD_KEYS = {'experiment', 'run_key', 'identity', 'model', 'norm', 'seed', 'batch_size',
               'learning_rate', 'epochs', 'data', 'config', 'history', 'final', 'curve', 'steps',
               'wall_seconds', 'compile_seconds', 'status', 'diverged_at', 'code', 'versions',
               'devices', 'finished'}
HISTORY_KEYS = {'epoch', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'seconds'}
FINAL_KEYS = {'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'test_loss',
              'test_accuracy', 'train_eval_loss', 'train_eval_accuracy'}


def test_run_makes_one_record_per_seed_with_overrides_applied():
  config = settings.base_config()
  config.update(data='synthetic:200', seeds=2, epochs=1, hidden=(8,), progress=False, devices=1)
  dataset = data.load(config.data)
  records = sweep.run(config, dataset, experiment='t', norm='none', batch_size=50)
  assert [r['seed'] for r in records] == [0, 1]
  for r in records:
    assert RECORD_KEYS <= set(r)
    assert r['norm'] == 'none' and r['config']['norm'] == 'none' and r['batch_size'] == 50
    assert r['config']['seed'] == r['seed'] and r['config']['hidden'] == [8]
    assert r['identity'] == settings.identity(settings.resolve(config, norm='none',
                                                               batch_size=50),
                                              data_content=dataset.fingerprint)
    assert r['run_key'] == results.run_key(r['identity'])
    assert set(r['code']) == {'sources', 'host', 'script', 'commit', 'dirty', 'programs',
                              'program_seeds', 'threefry'}
  assert config.norm == 'batch'  # the caller's config is left as it was


def _numbers(record):
  """A record's measured numbers, without wall times."""
  return (record['final'], record['curve'],
          [{k: v for k, v in h.items() if k != 'seconds'} for h in record['history']])


@pytest.mark.slow
def test_concurrent_runs_record_the_numbers_of_runs_one_after_another(tmp_path):
  config = settings.base_config()
  config.update(data='synthetic:300', seeds=2, epochs=2, hidden=(8,), progress=False,
                devices=1, compilation_cache=False)
  dataset = data.load(config.data)
  grid = [{'norm': n, 'batch_size': b} for n in ('batch', 'none') for b in (25, 50)]
  config.concurrent_runs = 1
  alone = sweep.sweep(config, dataset, grid, experiment='t')
  config.concurrent_runs = 3
  together = sweep.sweep(config, dataset, grid, experiment='t', workdir=str(tmp_path))
  assert [r['devices']['concurrent_runs'] for r in alone + together] == [1] * 8 + [3] * 8
  assert [_numbers(r) for r in alone] == [_numbers(r) for r in together]
  written = results.read_records(str(tmp_path / 'results.jsonl'))
  assert sorted((r['run_key'], r['seed']) for r in written) == sorted(
      (r['run_key'], r['seed']) for r in together)


def test_concurrent_runs_auto_is_one_per_cpu_core_on_one_cpu_device():
  config = settings.base_config()

  class Runner:
    num_devices = 1

  assert placement.concurrent_runs(config, Runner, 100) == min(os.cpu_count(), 8)
  assert placement.concurrent_runs(config, Runner, 1) == 1  # never more than the configurations
  Runner.num_devices = 8  # one program uses every device: one at a time
  config.concurrent_runs = 4
  assert placement.concurrent_runs(config, Runner, 100) == 1


@pytest.mark.slow
def test_bn_vs_no_bn_script_end_to_end(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py'),
         f'--workdir={workdir}', '--config.data=synthetic:600', '--config.seeds=2',
         '--config.epochs=2', '--config.batch_size=64', '--config.progress=false',
         f'--config.compilation_cache_dir={tmp_path / "cache"}']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_SECONDS, check=False,
                       env=SCRIPT_ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / 'results.jsonl')]
  assert sorted((r['norm'], r['seed']) for r in records) == [  # in the order runs finished
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


def test_to_target_is_the_first_point_reaching_it():
  curve = [{'step': 5, 'examples': 160, 'val_accuracy': 0.5},
           {'step': 10, 'examples': 300, 'val_accuracy': 0.81},
           {'step': 15, 'examples': 460, 'val_accuracy': 0.79},
           {'step': 20, 'examples': 600, 'val_accuracy': 0.9}]
  assert report.to_target(curve, 0.8) == {'step': 10, 'examples': 300}
  assert report.to_target(curve, 0.9) == {'step': 20, 'examples': 600}
  assert report.to_target(curve, 0.95) is None


def _run_batch_sizes(workdir, cache):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'batch_sizes.py'),
         f'--workdir={workdir}', '--config.data=synthetic:600', '--config.seeds=2',
         '--config.batch_sizes=(32,64)', '--config.epochs=2', '--config.progress=false',
         '--config.target_val_accuracy=0.5', f'--config.compilation_cache_dir={cache}']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_SECONDS, check=False,
                       env=SCRIPT_ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.mark.slow
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


@pytest.mark.slow
def test_script_on_simulated_devices_with_pmap_and_ghost_bn(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py'),
         f'--workdir={tmp_path}', '--config.data=synthetic:600', '--config.seeds=1',
         '--config.epochs=1', '--config.progress=false', '--config.norms=("batch",)',
         '--config.devices=4', '--config.parallel=pmap', '--config.bn_stats=ghost',
         '--config.bn_group_size=4', '--config.compilation_cache=false']
  env = {**SCRIPT_ENV, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_SECONDS, check=False,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  (record,) = [json.loads(line) for line in open(tmp_path / 'results.jsonl')]
  assert record['devices'] == {'platform': 'cpu', 'count': 4, 'processes': 1,
                               'concurrent_runs': 1, 'placement': 'data_parallel'}  # one program
  # uses every device
  assert record['config']['bn_stats'] == 'ghost' and record['config']['parallel'] == 'pmap'
  assert record['steps'] == 540 // 32  # several devices: whole batches only


class CountingFit:
  """`loop.fit`, counting the runs (configuration, seed) it trains."""

  def __init__(self):
    self.fit, self.trained = loop.fit, []

  def __call__(self, model, data_, *, seeds, **kwargs):
    self.trained.append(list(seeds))
    return self.fit(model, data_, seeds=seeds, **kwargs)


@pytest.fixture
def counting(monkeypatch):
  fit = CountingFit()
  monkeypatch.setattr(loop, 'fit', fit)
  return fit


def _small_config(**overrides):
  config = settings.base_config()
  config.update({**dict(data='synthetic:200', seeds=1, epochs=1, hidden=(8,), progress=False,
                       compilation_cache=False, devices=1), **overrides})
  return config


def _keys_on_disk(workdir):
  return [(r['run_key'], r['seed']) for r in results.read_records(workdir / 'results.jsonl')]


@pytest.mark.slow
def test_a_growing_grid_trains_only_the_new_configurations(tmp_path, counting):
  config, dataset = _small_config(), data.load('synthetic:200')
  grid = lambda sizes: [{'norm': n, 'batch_size': b} for n in ('batch', 'none') for b in sizes]
  first = sweep.sweep(config, dataset, grid((16, 32)), experiment='t', workdir=str(tmp_path))
  assert counting.trained == [[0]] * 4 and len(first) == 4
  # The grid grows by one batch size (the grid list is not part of any run's identity).
  second = sweep.sweep(config, dataset, grid((16, 32, 64)), experiment='t',
                       workdir=str(tmp_path))
  assert counting.trained == [[0]] * 6  # 2 new configurations, one seed each
  assert [r['run_key'] for r in second if r['batch_size'] in (16, 32)] == [
      r['run_key'] for r in first]
  assert second[0] == first[0]  # the finished record itself, not a re-run
  keys = _keys_on_disk(tmp_path)
  assert len(keys) == 6 and len(set(keys)) == 6
  sweep.sweep(config, dataset, grid((16, 32, 64)), experiment='t', workdir=str(tmp_path))
  assert counting.trained == [[0]] * 6 and len(_keys_on_disk(tmp_path)) == 6


def test_more_seeds_train_only_the_new_seeds_together(tmp_path, counting):
  dataset = data.load('synthetic:200')
  sweep.sweep(_small_config(seeds=1), dataset, [{}], experiment='t', workdir=str(tmp_path))
  records = sweep.sweep(_small_config(seeds=3), dataset, [{}], experiment='t',
                        workdir=str(tmp_path))
  assert counting.trained == [[0], [1, 2]]  # seeds 1 and 2 stacked in one program
  assert [r['seed'] for r in records] == [0, 1, 2]
  keys = _keys_on_disk(tmp_path)
  assert len(keys) == 3 and len(set(keys)) == 3
  # Fewer seeds: nothing to train, the first ones are returned.
  assert [r['seed'] for r in sweep.sweep(_small_config(seeds=2), dataset, [{}],
                                         experiment='t', workdir=str(tmp_path))] == [0, 1]
  assert counting.trained == [[0], [1, 2]]


def test_first_seed_trains_seeds_disjoint_from_the_default_ones(tmp_path, counting):
  dataset = data.load('synthetic:200')
  sweep.sweep(_small_config(seeds=2), dataset, [{}], experiment='t', workdir=str(tmp_path))
  records = sweep.sweep(_small_config(seeds=2), dataset, [{'first_seed': 2}], experiment='t',
                        workdir=str(tmp_path))
  assert counting.trained == [[0, 1], [2, 3]] and [r['seed'] for r in records] == [2, 3]
  assert len(set(_keys_on_disk(tmp_path))) == 4  # one configuration, four seeds


def test_a_grid_naming_one_configuration_twice_trains_it_once(tmp_path, counting):
  records = sweep.sweep(_small_config(), data.load('synthetic:200'),
                        [{'learning_rate': 1e-3}, {}], experiment='t', workdir=str(tmp_path))
  assert counting.trained == [[0]] and records[0] == records[1]
  assert len(_keys_on_disk(tmp_path)) == 1


def _other_code(monkeypatch):
  real = code_version.version  # the host code changed: data order, schedule or loop
  monkeypatch.setattr(code_version, 'version', lambda script=None: {
      **real(script), 'sources': 'f' * 16, 'host': 'e' * 16})


def test_finished_runs_of_other_code_are_refused_retrained_or_reused(tmp_path, counting,
                                                                      monkeypatch):
  dataset = data.load('synthetic:200')
  old = sweep.sweep(_small_config(), dataset, [{}], experiment='t', workdir=str(tmp_path))
  _other_code(monkeypatch)  # the sources changed since
  with pytest.raises(settings.ConfigError, match=r'1 finished runs in .*results.jsonl were made '
                     r'by code that may give other numbers .*--config.on_code_change=retrain'):
    sweep.sweep(_small_config(), dataset, [{}], experiment='t', workdir=str(tmp_path))
  assert counting.trained == [[0]]
  reused = sweep.sweep(_small_config(on_code_change='reuse'), dataset, [{}], experiment='t',
                       workdir=str(tmp_path))
  assert reused == old and counting.trained == [[0]]
  new = sweep.sweep(_small_config(on_code_change='retrain'), dataset, [{}], experiment='t',
                    workdir=str(tmp_path))
  assert counting.trained == [[0], [0]] and new[0]['code']['sources'] == 'f' * 16
  (on_disk,) = results.read_records(tmp_path / 'results.jsonl')  # never the same run twice
  assert on_disk['code']['sources'] == 'f' * 16
  (superseded,) = results.read_records(tmp_path / 'superseded.jsonl')
  assert superseded['code'] == old[0]['code']


def test_a_workdir_of_records_without_identity_is_refused(tmp_path):
  results.append_records(str(tmp_path / 'results.jsonl'), [
      {'experiment': 't', 'run_key': 'abc', 'seed': 0}])
  with pytest.raises(errors.WorkdirError, match='written by an older bn_jax .*use another --workdir'):
    sweep.sweep(_small_config(), data.load('synthetic:200'), [{}], experiment='t',
                workdir=str(tmp_path))


def test_saved_final_states_are_the_trained_variables(tmp_path):
  config, dataset = _small_config(seeds=2), data.load('synthetic:200')
  records = sweep.sweep(config, dataset, [{}], experiment='t', workdir=str(tmp_path),
                        save_states=True)
  model = settings.make_model(config)
  _, states = loop.fit(model, dataset, seeds=[0, 1], **settings.fit_args(config))
  for s, r in enumerate(records):
    saved = results.load_state(str(tmp_path), r)
    np.testing.assert_array_equal(saved['params']['Dense_0']['kernel'],
                                  states.params['Dense_0']['kernel'][s])
    assert set(saved) == {'params', 'batch_stats'}


def _run_script(script, workdir, *flags):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', script), f'--workdir={workdir}',
         '--config.data=synthetic:600', '--config.progress=false',
         '--config.compilation_cache=false', *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_SECONDS, check=False,
                        env=SCRIPT_ENV)


@pytest.mark.slow
# One refusal from each layer a script runs before its workdir: the command line (cli), the
# script's grid (overrides) and the settings' checks (checks). Every check's own message is
# tested in-process in test_checks.py.
@pytest.mark.parametrize('flag, message', [
    ('--config.batchsize=3', 'unknown setting --config.batchsize (did you mean '
     '--config.batch_size?)'),
    ('--config.norm=layer', '--config.norm is not used by this script'),
    ('--config.bn_momentum=2', 'bn_momentum must be in [0, 1), got 2.0'),
])
def test_refused_input_is_one_line_and_leaves_no_folder(tmp_path, flag, message):
  workdir = tmp_path / 'run'
  out = _run_script('bn_vs_no_bn.py', workdir, flag)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and message in lines[-1], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_a_value_of_the_wrong_type_is_one_line_naming_the_type(tmp_path):
  out = _run_script('bn_vs_no_bn.py', tmp_path / 'run', '--config.learning_rate=abc')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.strip() == ('error: --config.learning_rate=abc: learning_rate takes a '
                                'number (default 0.001).')
  assert not (tmp_path / 'run').exists()
