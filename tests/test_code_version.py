"""The code version: edits that cannot change a run's numbers (comments, docstrings, plots,
modules the run never executes) keep finished runs; edits that can (the loss, the data order)
make them stale."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import pytest

from _limits import HANG_SECONDS

from bn_jax import code_version
from bn_jax import data
from bn_jax import host
from bn_jax import loop
from bn_jax import programs as programs_lib
from bn_jax import reuse
from bn_jax import settings
from bn_jax import sweep
from bn_jax import train


def test_version_hashes_the_sources_and_the_script_once_per_process(tmp_path):
  script = tmp_path / 'script.py'
  script.write_text('print(1)\n')
  version = code_version.version(str(script))
  assert version['script'] == 'script.py' and len(version['sources']) == 16
  assert version['host'] == code_version.host_fingerprint()
  script.write_text('print(2)\n')
  assert code_version.version(str(script)) == version  # read once: this process runs print(1)
  code_version._version.cache_clear()  # pylint: disable=protected-access  (a new process)
  assert code_version.version(str(script))['sources'] != version['sources']
  root = os.path.dirname(code_version.PACKAGE_DIR)
  if os.path.isdir(os.path.join(root, '.git')):  # a git checkout: the commit is recorded
    assert len(version['commit']) == 40 and isinstance(version['dirty'], bool)


def _copy_host_modules(tmp_path):
  for name in code_version.HOST_MODULES:
    shutil.copy(os.path.join(code_version.PACKAGE_DIR, f'{name}.py'), tmp_path)
  return tmp_path


def _edit(path, old, new):
  text = path.read_text()
  assert old in text
  path.write_text(text.replace(old, new, 1))


def test_host_fingerprint_ignores_comments_and_docstrings_not_code(tmp_path):
  copy = _copy_host_modules(tmp_path)
  before = code_version.host_fingerprint(copy)
  assert before == code_version.host_fingerprint()
  _edit(copy / 'host.py', 'def epoch_order(', '# A new comment.\ndef epoch_order(')
  _edit(copy / 'loop.py', '"""Trains one configuration', '"""Trains, reworded: one configuration')
  _edit(copy / 'schedule.py', '\n', '\n\n\n')  # layout
  assert code_version.host_fingerprint(copy) == before
  _edit(copy / 'host.py', 'default_rng([seed, epoch])', 'default_rng([epoch, seed])')
  assert code_version.host_fingerprint(copy) != before  # another data order


def _fingerprint(small_dataset, seeds=(0,), **overrides):
  config = settings.resolve(settings.base_config(), hidden=(8,), **overrides)
  data_ = host.DeviceData.put(small_dataset)
  schedule = loop.Schedule(300, config.batch_size, 1)
  return programs_lib.program_fingerprint(settings.make_model(config), data_, schedule, seeds=seeds,
                                          learning_rate=config.learning_rate,
                                          optimizer=settings.make_optimizer(config, 10, 10))


@pytest.mark.slow
def test_program_fingerprint_follows_the_numbers_not_the_seed_values(small_dataset,
                                                                      monkeypatch):
  base = _fingerprint(small_dataset)
  assert _fingerprint(small_dataset) == base and _fingerprint(small_dataset, (7,)) == base
  assert _fingerprint(small_dataset, (0, 1)) != base  # two seeds: a vmapped program
  assert _fingerprint(small_dataset, bn_momentum=0.9) != base
  assert _fingerprint(small_dataset, learning_rate=0.01) != base
  real = train.metric_sums
  monkeypatch.setattr(train, 'metric_sums', lambda *a: {
      **real(*a), 'loss': 1.5 * real(*a)['loss']})
  jax.clear_caches()  # a new process would trace the edited code
  try:
    assert _fingerprint(small_dataset) != base
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert _fingerprint(small_dataset) == base


def test_compiled_programs_carry_the_fingerprint_of_their_lowering(small_dataset):
  config = settings.resolve(settings.base_config(), hidden=(8,))
  data_ = host.DeviceData.put(small_dataset)
  schedule = loop.Schedule(300, 32, 1)
  programs = programs_lib.compile_programs(settings.make_model(config), data_, schedule, seeds=(3,),
                                           learning_rate=1e-3)
  assert programs.fingerprint == programs_lib.program_fingerprint(
      settings.make_model(config), data_, schedule, seeds=(0,), learning_rate=1e-3)


def test_same_numbers_when_the_sources_or_the_host_code_and_programs_agree():
  now = {'sources': 's2', 'host': 'h'}
  asked = []
  programs = lambda n: asked.append(n) or 'p'
  assert code_version.same_numbers({'sources': 's2'}, now, programs) and not asked
  assert code_version.same_numbers({'sources': 's1', 'host': 'h', 'programs': 'p',
                                    'program_seeds': 3}, now, programs) and asked == [3]
  assert not code_version.same_numbers({'sources': 's1', 'host': 'h', 'programs': 'q'}, now,
                                       programs)
  assert not code_version.same_numbers({'sources': 's1', 'host': 'g', 'programs': 'p'}, now,
                                       programs)
  assert not code_version.same_numbers({'sources': 's1'}, now, programs)  # an older record


@pytest.mark.slow
def test_a_sweep_reuses_runs_when_only_the_sources_text_changed(tmp_path, monkeypatch):
  config = settings.base_config()
  config.update(data='synthetic:200', seeds=2, epochs=1, hidden=(8,), progress=False,
                compilation_cache=False, devices=1, tensorboard=False)
  dataset = data.load('synthetic:200')
  first = sweep.sweep(config, dataset, [{}], experiment='t', workdir=str(tmp_path))
  real = code_version.version
  monkeypatch.setattr(code_version, 'version', lambda script=None: {
      **real(script), 'sources': 'f' * 16})  # e.g. a comment, a plot title
  assert sweep.sweep(config, dataset, [{}], experiment='t', workdir=str(tmp_path)) == first
  monkeypatch.setattr(train, 'metric_sums', lambda *a, real=train.metric_sums: {
      **real(*a), 'loss': 1.5 * real(*a)['loss']})
  jax.clear_caches()
  try:
    with pytest.raises(settings.ConfigError, match='2 finished runs .* made by code that may '
                       'give other numbers .*on_code_change=retrain'):
      sweep.sweep(config, dataset, [{}], experiment='t', workdir=str(tmp_path))
  finally:
    monkeypatch.undo()
    jax.clear_caches()


SCRIPT = '''
import matplotlib
matplotlib.use('Agg')
from matplotlib import pyplot as plt
from bn_jax import cli, report, settings, sweep

def get_config():
  c = settings.base_config()
  c.update(data='synthetic:200', seeds=1, epochs=1, hidden=(8,), progress=False,
           compilation_cache=False, tensorboard=False)
  return c

def main(config, workdir):
  records = sweep.sweep(config, sweep.load_data(config), [{}], experiment='t', workdir=workdir)
  plt.title('TITLE')
  print('RESULT', records[0]['final']['val_accuracy'])

if __name__ == '__main__':
  cli.run(main, get_config)
'''


@pytest.mark.slow
def test_edits_in_a_copy_of_the_package_reuse_or_refuse_as_they_should(tmp_path):
  """The researcher's loop, as processes: run; edit a comment in train.py, a docstring in
  loop.py, a module the run never executes and a plot title; run again: nothing trains, no
  refusal. Then multiply the loss by 1.5: the finished run is refused with the fix named."""
  root = os.path.dirname(code_version.PACKAGE_DIR)
  package = tmp_path / 'src' / 'bn_jax'
  shutil.copytree(code_version.PACKAGE_DIR, package,
                  ignore=shutil.ignore_patterns('__pycache__'))
  script = tmp_path / 'study.py'
  script.write_text(textwrap.dedent(SCRIPT))
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
         'PYTHONPATH': str(tmp_path / 'src')}
  run = lambda: subprocess.run([sys.executable, str(script), f'--workdir={tmp_path / "w"}'],
                               capture_output=True, text=True, timeout=HANG_SECONDS, env=env,
                               cwd=root, check=False)
  first = run()
  assert first.returncode == 0 and 'training 1 runs' in first.stdout, first.stderr[-2000:]
  _edit(package / 'train.py', 'def train_step(', '# Reworded.\ndef train_step(')
  _edit(package / 'loop.py', '"""Trains one configuration', '"""Trains, reworded: one')
  _edit(package / 'ics.py', '\nimport', '\nimport math  # unused\nimport')
  _edit(script, "'TITLE'", "'A new title'")
  again = run()
  assert again.returncode == 0 and 'training 0 runs' in again.stdout, again.stderr[-2000:]
  assert again.stdout.split('RESULT')[1] == first.stdout.split('RESULT')[1]
  _edit(package / 'train.py', "return {'loss': jnp.sum(losses * mask)",
        "return {'loss': 1.5 * jnp.sum(losses * mask)")
  edited = run()
  assert edited.returncode == 2, edited.stderr[-2000:]
  assert 'made by code that may give other numbers' in edited.stderr
  assert '--config.on_code_change=retrain' in edited.stderr


def test_a_refusal_names_the_threefry_lowering_when_only_it_differs():
  hint = reuse._threefry_hint  # pylint: disable=protected-access
  made_by_script = {'sources': 's1', 'threefry': True}
  assert 'call bn_jax.threefry.install() first' in hint(made_by_script, {'threefry': False})
  assert 'use them from there' in hint({'threefry': False}, {'threefry': True})
  assert not hint(made_by_script, {'threefry': True})
  assert not hint({'sources': 's1'}, {'threefry': True})  # older records
