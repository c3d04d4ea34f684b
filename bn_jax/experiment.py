"""Config -> model -> `train.fit` -> result records, and the results file they go to.

A result record is one JSON object per run, the same shape in every experiment:
`experiment, model, norm, seed, batch_size, learning_rate, epochs, data, config, history,
final, wall_seconds, status, versions, devices` (see README, "Result records").
"""

import concurrent.futures
import json
import math
import os
import platform
import tempfile
import time

import flax
import jax
import ml_collections
import optax

from bn_jax import models
from bn_jax import parallel
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
  # Where BN's training statistics come from: 'sync' = the whole (global) batch; 'local' = each
  # device's part; 'ghost' = groups of bn_group_size examples (ghost BN), separating the
  # statistics batch from the optimizer's batch.
  c.bn_stats = 'sync'
  c.bn_group_size = 0
  c.hidden = (128,)  # MLP hidden widths
  c.dropout = 0.2
  c.activation = 'relu'
  c.bn_momentum = 0.99  # Keras' default, as in the original study (PyTorch's 0.1 is 0.9 here)
  c.bn_epsilon = 1e-3  # Keras' default (Flax and PyTorch use 1e-5)
  c.learning_rate = 1e-3
  c.batch_size = 32
  c.epochs = 5
  c.max_steps = 0  # a budget in steps instead of epochs (0: use epochs)
  c.seeds = 3  # seeds 0 .. seeds-1, trained together in one program
  c.chunk_steps = 0  # train steps per dispatched program; 0 = up to the next evaluation
  c.evals_per_epoch = 1  # validation points per epoch (the `curve` of each record)
  c.target_val_accuracy = 0.0  # > 0: records steps/examples to reach it
  c.eval_batch_size = 1000
  c.progress = True
  # Devices: data-parallel over `devices` (0 = every device JAX sees, of every host) with
  # `parallel` = shard_map | pmap; hosts join through jax.distributed (unset: environment).
  c.devices = 0
  c.parallel = 'shard_map'
  c.coordinator_address = ''  # e.g. 10.0.0.1:1234
  c.num_processes = 0
  c.process_id = -1
  c.compilation_cache = True  # JAX's persistent compilation cache
  c.compilation_cache_dir = ''  # '' = $XDG_CACHE_HOME/bn_jax/jax (~/.cache/bn_jax/jax)
  return c


def make_model(config, data_parallel=False, **overrides):
  """The model a config describes; `overrides` replace config entries (e.g. norm='none').

  `bn_stats` picks where BN's training statistics come from: 'sync' (the whole batch, across
  devices when `data_parallel`), 'local' (each device's part) or 'ghost' (groups of
  `bn_group_size` examples); on one device 'local' is the whole batch too.
  """
  c = {**config.to_dict(), **overrides}
  if c['bn_stats'] not in parallel.BN_STATS:
    raise ValueError(f"unknown bn_stats {c['bn_stats']!r}: choose one of {parallel.BN_STATS}.")
  kwargs = dict(norm=c['norm'], dropout=c['dropout'], activation=c['activation'],
                bn_momentum=c['bn_momentum'], bn_epsilon=c['bn_epsilon'],
                bn_group_size=c['bn_group_size'])
  if c['norm'] == 'batch' and c['bn_stats'] == 'ghost':
    kwargs['norm'] = 'ghost'
  if c['norm'] == 'batch' and c['bn_stats'] == 'sync' and data_parallel:
    kwargs['bn_axis_name'] = parallel.AXIS
  if c['model'] == 'mlp':
    kwargs['hidden'] = tuple(c['hidden'])
  return models.create_model(c['model'], **kwargs)


def make_runner(config):
  """One device, or data-parallel over `config.devices` (joining other hosts if configured)."""
  parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                  config.process_id)
  if (config.devices or jax.device_count()) == 1 and jax.process_count() == 1:
    return train.ONE_DEVICE
  return parallel.DataParallel(config.devices, config.parallel)


def run(config, dataset, *, experiment, programs=None, runner=train.ONE_DEVICE, **overrides):
  """Trains every seed of one configuration; returns one result record per seed."""
  config = resolve(config, **overrides)
  data = (dataset if isinstance(dataset, train.DeviceData) else
          train.DeviceData.put(dataset, runner))
  t0 = time.perf_counter()
  results, _ = train.fit(
      make_model(config, runner is not train.ONE_DEVICE), data, seeds=range(config.seeds),
      learning_rate=config.learning_rate, batch_size=config.batch_size, epochs=config.epochs,
      max_steps=config.max_steps, chunk_steps=config.chunk_steps,
      evals_per_epoch=config.evals_per_epoch, eval_batch_size=config.eval_batch_size,
      progress=config.progress, programs=programs, runner=runner,
      desc=f'{config.model}/{config.norm} bs={config.batch_size}')
  wall = time.perf_counter() - t0
  devices = {'platform': jax.default_backend(), 'count': runner.num_devices,
             'processes': jax.process_count()}
  return [make_record(experiment, config, r, wall_seconds=wall, devices=devices)
          for r in results]


def sweep(config, dataset, grid, *, experiment, results_path=None, compile_threads=0):
  """Runs every configuration of `grid` (a list of overrides); returns all records.

  All configurations' programs are compiled at once from a thread pool, so compiling overlaps
  with itself and with the training of the configurations that are ready.
  """
  configs = [resolve(config, **overrides) for overrides in grid]
  runner = make_runner(config)
  data = train.DeviceData.put(dataset, runner)
  parallel_run = runner is not train.ONE_DEVICE

  def compile_one(c):
    schedule = train.Schedule(data.size('train'), c.batch_size, c.epochs, c.max_steps,
                              c.chunk_steps, c.evals_per_epoch, runner.num_devices)
    return train.compile_programs(make_model(c, parallel_run), data, schedule,
                                  seeds=list(range(c.seeds)), learning_rate=c.learning_rate,
                                  eval_batch_size=c.eval_batch_size, runner=runner)

  records = []
  workers = compile_threads or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(compile_one, c) for c in configs]
    for c, future in zip(configs, futures):
      runs = run(c, data, experiment=experiment, programs=future.result(), runner=runner)
      if results_path:
        append_records(results_path, runs)
      records += runs
  return records


def scaled_learning_rate(learning_rate, batch_size, base_batch_size, rule='none'):
  """The rate for `batch_size` under a scaling rule relative to `base_batch_size`."""
  ratio = batch_size / base_batch_size
  rules = {'none': 1.0, 'linear': ratio, 'sqrt': math.sqrt(ratio)}
  if rule not in rules:
    raise ValueError(f'unknown lr_scaling {rule!r}: choose one of {tuple(rules)}.')
  return learning_rate * rules[rule]


def to_target(curve, target):
  """The first validation point at or above `target`: {'step', 'examples'}, or None."""
  for point in curve:
    if point['val_accuracy'] >= target:
      return {'step': point['step'], 'examples': point['examples']}
  return None


def enable_compilation_cache(config):
  """Turns on JAX's persistent compilation cache (every program, however quick); its path."""
  if not config.compilation_cache:
    return None
  path = config.compilation_cache_dir or os.path.join(
      os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'bn_jax', 'jax')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path


def make_record(experiment, config, result, *, wall_seconds, devices=None):
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
      'curve': result['curve'],  # validation at every eval point, with steps and examples
      'steps': result['steps'],
      'to_target': (to_target(result['curve'], config.target_val_accuracy)
                    if config.target_val_accuracy > 0 else None),
      # Seeds of a configuration train together; this is their shared wall time.
      'wall_seconds': wall_seconds,
      'compile_seconds': result['compile_seconds'],
      'status': result['status'],
      'diverged_at': result['diverged_at'],
      'versions': versions(),
      'devices': devices or {'platform': jax.default_backend(), 'count': 1, 'processes': 1},
  }


def versions():
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'flax': flax.__version__, 'optax': optax.__version__}


def resolve(config, **overrides):
  """A copy of `config` with `overrides` applied (the caller's config stays as it was)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f'unknown config key {key!r}')
    config[key] = value
  return config


def _jsonable(value):
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


# --- Files: nothing half-written --------------------------------------------------------------

def is_writer():
  """Only process 0 writes results, plots and logs when several hosts train together."""
  return jax.process_index() == 0


def atomic_write(path, data):
  """Writes text or bytes to `path` via a temporary file and a rename (process 0 only)."""
  if not is_writer():
    return
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
  """Appends records to a JSON-lines file, one whole line per write, flushed (process 0)."""
  if not is_writer():
    return
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
