"""The command line's error contract: a user error is one line and exit 2; a bug in a script's
own code shows its full traceback and exit 1."""

import os
import subprocess
import sys

import pytest

from _limits import HANG_SECONDS

from bn_jax import cli
from bn_jax import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = '''
from bn_jax import checks, cli, errors, settings

def main(config, workdir):
  checks.validate(config)
  if config.raise_ == 'key':  # a bug in the script's own summary code
    raise KeyError(('batch', 0.1))
  if config.raise_ == 'data':
    raise errors.DataError('data_batch_1 is not a CIFAR-10 batch: extract it again.')
  print('ran', workdir)

def get_config():
  config = settings.base_config()
  config.raise_ = ''
  return config

cli.run(main, get_config)
'''


def _run(tmp_path, *flags):
  script = tmp_path / 'script.py'
  script.write_text(SCRIPT)
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, str(script), f'--workdir={tmp_path}/w', *flags],
                        capture_output=True, text=True, timeout=HANG_SECONDS, env=env,
                        check=False)


@pytest.mark.parametrize('flags, code, last', [
    (('--config.raise_=key',), 1, "KeyError: ('batch', 0.1)"),
    (('--config.batch_size=0',), 2, 'error: batch_size must be in [1, '),
    (('--config.raise_=data',), 2, 'error: data_batch_1 is not a CIFAR-10 batch: extract it '
                                   'again.'),
])
@pytest.mark.slow
def test_user_errors_are_one_line_and_bugs_show_their_traceback(tmp_path, flags, code, last):
  out = _run(tmp_path, *flags)
  assert out.returncode == code, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith(last), out.stderr[-2000:]
  if code == 1:
    assert 'Traceback (most recent call last)' in out.stderr and 'in main' in out.stderr
  else:
    assert 'Traceback' not in out.stderr


@pytest.mark.parametrize('arg, words', [
    ('--config.seeds=two', 'seeds takes a whole number (default 3)'),
    ('--config.epochs=0.5', 'epochs takes a whole number'),
    ('--config.learning_rate=abc', 'learning_rate takes a number'),
    ('--config.hidden=(16', 'hidden takes a tuple'),
    ('--config.progress=maybe', 'progress takes true or false')])
def test_a_value_of_the_wrong_type_is_one_line(arg, words, capsys):
  with pytest.raises(SystemExit) as stop:
    cli._refuse_unknown_keys(settings.base_config(), [arg])  # pylint: disable=protected-access
  assert stop.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and words in err and err.startswith(f'error: {arg}:')
  cli._refuse_unknown_keys(settings.base_config(), [  # pylint: disable=protected-access
      '--config.seeds=4', '--config.learning_rate=1', '--config.hidden=(8,)',
      '--config.progress=false', '--config.data=synthetic:9'])  # right types pass
