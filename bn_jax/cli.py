"""The command line every experiment script shares: `--config.KEY=VALUE` overrides of the
script's `get_config()`, presets (e.g. `--config.quick=true`) applied *before* those
overrides so that a flag always wins, `--workdir`, and bad input (`errors.UserError`) reported
as one line; any other exception is a bug and shows its traceback.

  if __name__ == '__main__':
    cli.run(main, get_config, presets={'quick': quick}, grid_keys=('norm',))

calls `main(config, workdir)` with the resolved config.
"""

import ast
import difflib
import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bn_jax import errors
from bn_jax import interrupt
from bn_jax import overrides
from bn_jax import results
from bn_jax import shards
from bn_jax import threefry



def run(main, get_config, *, presets=None, grid_keys=(), workdir='runs/experiment'):
  """Parses the command line and calls `main(config, workdir)`.

  Args:
    main: the script's body.
    get_config: returns the script's default ConfigDict.
    presets: name -> function(config) that edits the config in place; applied when
      `--config.<name>=true` (or the default is true), before the command-line overrides; a
      name 'key=value' (e.g. 'scale=paper') applies when the setting `key` is `value`.
    grid_keys: settings the script's grid sets for every run; setting one on the command
      line is an error rather than silently ignored.
    workdir: the default `--workdir`.
  """
  presets = presets or {}
  threefry.install()  # before any program compiles: less compiling on CPU, the same bits
  _refuse_unknown_keys(get_config(), sys.argv[1:])
  flags.DEFINE_string('workdir', workdir, 'Directory for results, tables and plots.')
  config_flags.DEFINE_config_dict('config', get_config())

  def absl_main(argv):
    del argv
    interrupt.handle_signals()
    logging.set_verbosity(logging.WARNING)  # JAX's INFO lines ('no TPU found') are noise here
    overridden = config_flags.get_override_values(flags.FLAGS['config'])
    try:
      config = resolve(get_config(), overridden, presets)
      overrides.check_overrides(config, overridden, grid_keys)
      main(config, flags.FLAGS.workdir)
    except shards.ShardDone as e:  # this shard's part is done; not an error
      print(e, flush=True)
    except interrupt.Interrupted as e:
      if results.is_writer():
        print(e, file=sys.stderr, flush=True)
      sys.exit(128 + e.signum)
    except errors.UserError as e:  # bad settings, data or workdir: one line; a bug: traceback
      if results.is_writer():
        print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(absl_main)


def resolve(config, overridden, presets):
  """`config` with the presets switched on (by default or on the command line) applied first,
  then the command-line overrides (a flat dict of dotted keys -> values)."""
  for name, preset in presets.items():
    key, _, value = name.partition('=')
    now = overridden.get(key, config[key])
    if (str(now) == value) if value else now:
      preset(config)
  for key, value in overridden.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _refuse_unknown_keys(config, argv):
  """`--config.batchsize=3` -> one line naming the closest known key, and `--config.seeds=two`
  -> one line naming the type the setting takes (not absl's flag-parsing error)."""
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    name, _, value = arg[len('--config.'):].partition('=')
    key = name.split('.')[0]
    if key not in config:
      close = difflib.get_close_matches(key, list(config.keys()), n=1)
      hint = f' (did you mean --config.{close[0]}?)' if close else ''
      _fail(f'unknown setting --config.{key}{hint}; the settings are those of the '
            "script's get_config() and bn_jax/defaults.py.")
    if '=' in arg and '.' not in name:
      _check_type(key, value, config[key])


_TYPES = ((bool, 'true or false'), (int, 'a whole number'), (float, 'a number'),
          (tuple, 'a tuple, e.g. "(16,32)"'))


def _check_type(key, value, default):
  """Exits with one line when `value` cannot be read as the type of `default`."""
  for kind, words in _TYPES:
    if isinstance(default, kind):
      break
  else:
    return  # strings and others: any text
  try:
    if kind is bool:
      ok = value.lower() in ('true', 'false', '1', '0')
    elif kind is tuple:
      ok = isinstance(ast.literal_eval(value), (tuple, list, int, float, str))
    else:
      kind(value)
      ok = kind is float or float(value) == int(value)
  except (ValueError, SyntaxError):
    ok = False
  if not ok:
    if kind is tuple and default:  # an example of the default's kind: '("batch","none")'
      words = f"a tuple, e.g. '({','.join(json.dumps(v) for v in default)})'"
    _fail(f'--config.{key}={value}: {key} takes {words} (default {default!r}).')


def _fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
