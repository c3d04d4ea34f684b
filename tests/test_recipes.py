"""README.md's "Editing bn_jax" recipes, run as written: a norm added to a copy of the
package, the sweep script, the unit test of a train step."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from _limits import HANG_SECONDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  section = text.split('## Editing bn_jax')[1].split('\n## ')[0]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert len(blocks) == 4, 'the norm class, its registry entry, the script, the test'
  return blocks


def test_the_unit_test_recipe_passes():
  scope = {}
  exec(_blocks()[3], scope)  # pylint: disable=exec-used
  scope['test_one_step_moves_the_running_mean_toward_the_batch_mean']()


def _env(pythonpath=None):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if pythonpath:
    env['PYTHONPATH'] = pythonpath
  return env


@pytest.mark.slow
def test_the_sweep_script_recipe_prints_a_row_per_momentum(tmp_path):
  script = tmp_path / 'bn_momentum.py'
  script.write_text(_blocks()[2])
  out = subprocess.run(
      [sys.executable, str(script), f'--workdir={tmp_path / "w"}', '--config.data=synthetic:200',
       '--config.epochs=1', '--config.seeds=2', '--config.hidden=(8,)', '--config.progress=false',
       '--config.compilation_cache=false'], capture_output=True, text=True,
      timeout=HANG_SECONDS, env=_env(), check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line for line in out.stdout.splitlines() if re.match(r'\| 0\.9', line)]
  assert [row.split('|')[1].strip() for row in rows] == ['0.9', '0.99', '0.999']
  assert all('| 2 |' in row for row in rows)  # two seeds each


@pytest.mark.slow
def test_the_new_norm_recipe_is_one_class_and_one_entry(tmp_path):
  package = tmp_path / 'src' / 'bn_jax'
  shutil.copytree(os.path.join(ROOT, 'bn_jax'), package,
                  ignore=shutil.ignore_patterns('__pycache__'))
  layer, entry = _blocks()[:2]
  norms = (package / 'norms.py').read_text()
  norms = norms.replace('@dataclasses.dataclass(frozen=True)\nclass Norm:',
                        layer + '\n\n@dataclasses.dataclass(frozen=True)\nclass Norm:')
  head, tail = norms.split('REGISTRY = {', 1)
  registry, rest = tail.split('\n)}\n', 1)
  (package / 'norms.py').write_text(f'{head}REGISTRY = {{{registry}\n{entry.rstrip()}\n)}}\n{rest}')
  check = textwrap.dedent('''
      import jax
      from bn_jax import data, settings, sweep
      assert 'plain_batch' in settings.NORMS and 'plain_batch' in settings.RUNNING_STATS
      config = settings.base_config()
      config.update(data='synthetic:200', seeds=1, epochs=1, hidden=(8,), progress=False,
                    compilation_cache=False, norm='plain_batch', bn_momentum=0.9)
      identity = settings.identity(config)
      assert identity['bn_momentum'] == 0.9 and identity['bn_stats'] == 'sync', identity
      model = settings.make_model(config)
      variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)), train=False)
      assert 'BatchNorm_0' not in variables['params'] and 'BatchNorm_0' in variables['batch_stats']
      (record,) = sweep.run(config, data.load(config.data), experiment='t')
      print('trained', record['status'], record['identity']['norm'])
  ''')
  out = subprocess.run([sys.executable, '-c', check], capture_output=True, text=True,
                       timeout=HANG_SECONDS, env=_env(str(tmp_path / 'src')), cwd=tmp_path,
                       check=False)  # cwd: not the checkout, whose bn_jax would come first
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'trained ok plain_batch' in out.stdout
