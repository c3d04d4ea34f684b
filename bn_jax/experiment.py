"""Config -> model -> `train.fit` -> result records, and the results file they go to.

A result record is one JSON object per run, the same shape in every experiment:
`experiment, model, norm, seed, batch_size, learning_rate, epochs, data, config, history,
final, wall_seconds, status, versions, devices` (see README, "Result records").
"""

import json
import os
import platform
import tempfile
import time

import flax
import jax
import ml_collections
import optax

from bn_jax import models
from bn_jax import train


def base_config():
  """Settings every experiment shares; scripts start from these and add their own."""
  c = ml_collections.ConfigDict()
  c.data = 'tfds:mnist'  # tfds:NAME | idx:DIR | synthetic[:N]
  c.data_dir = ''  # TFDS data directory ('' = TFDS's default)
  c.val_fraction = 0.1
  c.split_seed = 42  # the validation split is the same for every run
  c.model = 'mlp'  # mlp | cnn
  c.norm = 'batch'  # none | batch
  c.hidden = (128,)  # MLP hidden widths
  c.dropout = 0.2
  c.activation = 'relu'
  c.bn_momentum = 0.99  # Keras' default, as in the original study (PyTorch's 0.1 is 0.9 here)
  c.bn_epsilon = 1e-3  # Keras' default (Flax and PyTorch use 1e-5)
  c.learning_rate = 1e-3
  c.batch_size = 32
  c.epochs = 5
  c.seeds = 3  # seeds 0 .. seeds-1, trained together in one program
  c.chunk_steps = 0  # train steps per dispatched program; 0 = a whole epoch
  c.eval_batch_size = 1000
  c.progress = True
  return c


def make_model(config, **overrides):
  """The model a config describes; `overrides` replace config entries (e.g. norm='none')."""
  c = {**config.to_dict(), **overrides}
  kwargs = dict(norm=c['norm'], dropout=c['dropout'], activation=c['activation'],
                bn_momentum=c['bn_momentum'], bn_epsilon=c['bn_epsilon'])
  if c['model'] == 'mlp':
    kwargs['hidden'] = tuple(c['hidden'])
  return models.create_model(c['model'], **kwargs)


def run(config, dataset, *, experiment, **overrides):
  """Trains every seed of one configuration; returns one result record per seed."""
  config = _resolved(config, overrides)
  model = make_model(config)
  t0 = time.perf_counter()
  results, _ = train.fit(
      model, dataset, seeds=range(config.seeds), learning_rate=config.learning_rate,
      batch_size=config.batch_size, epochs=config.epochs, chunk_steps=config.chunk_steps,
      eval_batch_size=config.eval_batch_size, progress=config.progress,
      desc=f'{config.model}/{config.norm} bs={config.batch_size}')
  wall = time.perf_counter() - t0
  return [make_record(experiment, config, r, wall_seconds=wall) for r in results]


def make_record(experiment, config, result, *, wall_seconds):
  """The shared result record of one run (one seed)."""
  config_dict = _jsonable(config.to_dict())
  config_dict['seed'] = result['seed']
  return {
      'experiment': experiment,
      'model': config.model,
      'norm': config.norm,
      'seed': result['seed'],
      'batch_size': config.batch_size,
      'learning_rate': config.learning_rate,
      'epochs': config.epochs,
      'data': config.data,
      'config': config_dict,
      'history': result['history'],
      'final': result['final'],
      # Seeds of a configuration train together; this is their shared wall time.
      'wall_seconds': wall_seconds,
      'compile_seconds': result['compile_seconds'],
      'status': result['status'],
      'diverged_at': result['diverged_at'],
      'versions': versions(),
      'devices': {'platform': jax.default_backend(), 'count': jax.device_count()},
  }


def versions():
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'flax': flax.__version__, 'optax': optax.__version__}


def _resolved(config, overrides):
  config = ml_collections.ConfigDict(config.to_dict())  # a copy; the caller's stays as it was
  for key, value in overrides.items():
    config[key] = value
  return config


def _jsonable(value):
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


# --- Files: nothing half-written --------------------------------------------------------------

def atomic_write(path, data):
  """Writes text or bytes to `path` via a temporary file and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def append_records(path, records):
  """Appends records to a JSON-lines file, one whole line per write, flushed to disk."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, allow_nan=True) + '\n')
      f.flush()
      os.fsync(f.fileno())


def read_records(path):
  """Reads a JSON-lines results file (ignoring a torn last line from a crash)."""
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.endswith('\n'):
        records.append(json.loads(line))
  return records


def prepare_workdir(workdir):
  """Creates the workdir and starts a fresh results file; returns its path."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'workdir {workdir!r} is a file: pass --workdir=DIR with a '
                             'directory path.')
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'results.jsonl')
  atomic_write(path, '')
  return path
