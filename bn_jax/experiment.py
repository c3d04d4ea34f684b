"""Config -> model -> `loop.fit` -> result records; sweeps that resume where they stopped.

A result record is one JSON object per run, the same shape in every experiment:
`experiment, model, norm, seed, batch_size, learning_rate, epochs, data, config, history,
final, wall_seconds, status, versions, devices` (see README, "Result records").
"""

import concurrent.futures
import contextlib
import math
import os
import platform
import time
import warnings

import flax
import jax
import ml_collections
import optax

from bn_jax import checkpoint
from bn_jax import data
from bn_jax import loop
from bn_jax import models
from bn_jax import parallel
from bn_jax import results
from bn_jax import train


def base_config():
  """Settings every experiment shares; scripts start from these and add their own."""
  c = ml_collections.ConfigDict()
  c.data = 'tfds:mnist'  # tfds:NAME | idx:DIR | synthetic[:N]
  c.data_dir = ''  # TFDS data directory ('' = TFDS's default)
  c.val_fraction = 0.1
  c.split_seed = 42  # the validation split is the same for every run
  c.train_examples = 0  # > 0: train on this many examples (a fixed random subset); 0: all
  c.model = 'mlp'  # mlp | cnn
  c.norm = 'batch'  # none | batch
  # Where BN's training statistics come from: 'sync' = the whole (global) batch; 'local' = each
  # device's part; 'ghost' = groups of bn_group_size examples (ghost BN), separating the
  # statistics batch from the optimizer's batch.
  c.bn_stats = 'sync'
  c.bn_group_size = 0
  c.hidden = (128,)  # MLP hidden widths
  c.features = (32, 64)  # CNN: channels of each 3x3 conv block (the first two max-pool)
  c.init_scale = 1.0  # hidden (and conv) weights at init: this times LeCun-normal
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
  # Checkpoints and resuming: the same command with the same workdir resumes a sweep, skipping
  # finished runs; resume=false starts afresh (refusing to delete results unless overwrite).
  c.resume = True
  c.overwrite = False
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  c.checkpoint_min_seconds = 10.0  # but never more often than this
  c.checkpoint_keep = 3
  c.keep_checkpoints = False  # delete a run's checkpoints once its results are recorded
  c.bn_batch_of_one = 'error'  # BN over 1 example outputs just beta: 'error' | 'warn'
  return c


def load_data(config):
  """Everything a script does before its sweep: compilation cache on, data loaded."""
  enable_compilation_cache(config)
  dataset = data.load(config.data, val_fraction=config.val_fraction,
                      split_seed=config.split_seed, data_dir=config.data_dir or None,
                      train_examples=config.train_examples)
  if results.is_writer():
    print(f'{config.data}: {dataset.sizes()}')
  return dataset


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
  kwargs['init_scale'] = c['init_scale']
  if c['model'] == 'mlp':
    kwargs['hidden'] = tuple(c['hidden'])
  else:
    kwargs['features'] = tuple(c['features'])
  return models.create_model(c['model'], **kwargs)


def make_runner(config):
  """One device, or data-parallel over `config.devices` (joining other hosts if configured)."""
  parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                  config.process_id)
  if (config.devices or jax.device_count()) == 1 and jax.process_count() == 1:
    return train.ONE_DEVICE
  return parallel.DataParallel(config.devices, config.parallel)


def run(config, dataset, *, experiment, programs=None, runner=train.ONE_DEVICE,
        checkpointer=None, **overrides):
  """Trains every seed of one configuration; returns one result record per seed."""
  config = resolve(config, **overrides)
  data = (dataset if isinstance(dataset, train.DeviceData) else
          train.DeviceData.put(dataset, runner))
  model = make_model(config, isinstance(runner, parallel.DataParallel))
  t0 = time.perf_counter()
  results, _ = loop.fit(
      model, data, seeds=range(config.seeds),
      learning_rate=config.learning_rate, batch_size=config.batch_size, epochs=config.epochs,
      max_steps=config.max_steps, chunk_steps=config.chunk_steps,
      evals_per_epoch=config.evals_per_epoch, eval_batch_size=config.eval_batch_size,
      progress=config.progress, programs=programs, runner=runner, checkpointer=checkpointer,
      desc=f'{config.model}/{config.norm} bs={config.batch_size}')
  wall = time.perf_counter() - t0
  devices = {'platform': jax.default_backend(), 'count': runner.num_devices,
             'processes': jax.process_count()}
  return [make_record(experiment, config, r, wall_seconds=wall, devices=devices)
          for r in results]


def validate(config, num_devices=1, num_train=None):
  """Checks a resolved config before anything trains; raises a ValueError naming the fix."""
  if config.model not in models.MODELS:
    raise ValueError(f'unknown model {config.model!r}: choose one of {tuple(models.MODELS)}.')
  if config.norm not in ('none', 'batch'):
    raise ValueError(f"unknown norm {config.norm!r}: choose 'batch' or 'none' (where BN's "
                     'statistics come from is --config.bn_stats).')
  for key in ('epochs', 'max_steps', 'chunk_steps', 'checkpoint_every_steps'):
    if config[key] < 0:
      raise ValueError(f'{key} must be >= 0, got {config[key]}.')
  if config.epochs == 0 and config.max_steps == 0:
    raise ValueError('nothing to train: set epochs > 0 (or max_steps > 0).')
  if config.seeds < 1:
    raise ValueError(f'seeds must be >= 1, got {config.seeds}.')
  if not config.learning_rate > 0:  # also rejects NaN
    raise ValueError(f'learning_rate must be a positive number, got {config.learning_rate}.')
  if config.batch_size < 1 or (num_train and config.batch_size > num_train):
    raise ValueError(f'batch_size must be in [1, {num_train or "the training set size"}], got '
                     f'{config.batch_size}.')
  if config.batch_size % num_devices:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the {num_devices} '
                     'devices: choose a multiple of the device count (or --config.devices).')
  layers = config.hidden if config.model == 'mlp' else config.features
  name = 'hidden' if config.model == 'mlp' else 'features'
  if not layers or any(int(width) < 1 for width in layers):
    raise ValueError(f'{name} must list at least one positive width for the {config.model}, got '
                     f'{tuple(layers)}: e.g. --config.{name}="(128,)".')
  if config.bn_stats not in parallel.BN_STATS:
    raise ValueError(f'unknown bn_stats {config.bn_stats!r}: choose one of '
                     f'{parallel.BN_STATS}.')
  if config.norm != 'batch':
    return
  per_device = config.batch_size // num_devices
  group = {'sync': config.batch_size, 'local': per_device,
           'ghost': config.bn_group_size}[config.bn_stats]
  if config.bn_stats == 'ghost' and group < 1:
    raise ValueError("bn_stats='ghost' needs --config.bn_group_size=G, the examples per BN "
                     'group.')
  if config.bn_stats == 'ghost' and per_device % group:
    raise ValueError(f'bn_group_size={group} must divide the batch of {per_device} examples '
                     'per device: choose a divisor of it.')
  if group == 1:
    message = ('BatchNorm over a single example: its variance is 0, so the layer outputs '
               'beta whatever the input. Use a larger batch / bn_group_size, or set '
               "--config.bn_batch_of_one=warn to run anyway.")
    if config.bn_batch_of_one != 'warn':
      raise ValueError(message)
    warnings.warn(message)


def sweep(config, dataset, grid, *, experiment, workdir=None, runner=None,
          compile_threads=0):
  """Runs every configuration of `grid` (a list of overrides); returns all their records.

  With a `workdir`, each finished run is appended to its results.jsonl at once, finished runs
  are skipped on a restart (`config.resume`), and each configuration checkpoints to
  `checkpoints/<run key>/` and resumes from there. All configurations' programs compile at
  once from a thread pool, overlapping with the training of those that are ready.
  """
  runner = runner or make_runner(config)
  configs = [resolve(config, **overrides) for overrides in grid]
  for c in configs:
    validate(c, runner.num_devices, len(dataset.train_labels))
  work = None
  if workdir:
    work = results.Workdir(workdir, experiment, resume=config.resume,
                           overwrite=config.overwrite)
  finished = work.finished if work else {}
  todo = [c for c in configs
          if not all((results.run_key(c), s) in finished for s in range(c.seeds))]
  if len(todo) < len(configs) and results.is_writer():
    print(f'{workdir}: {len(configs) - len(todo)} of {len(configs)} configurations already '
          'finished (results.jsonl); running the rest.')
  data = train.DeviceData.put(dataset, runner)
  parallel_run = isinstance(runner, parallel.DataParallel)

  def compile_one(c):
    schedule = loop.Schedule(data.size('train'), c.batch_size, c.epochs, c.max_steps,
                              c.chunk_steps, c.evals_per_epoch, runner.num_devices)
    return loop.compile_programs(make_model(c, parallel_run), data, schedule,
                                  seeds=list(range(c.seeds)), learning_rate=c.learning_rate,
                                  eval_batch_size=c.eval_batch_size, runner=runner)

  new = {}
  workers = compile_threads or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(compile_one, c) for c in todo]
    for c, future in zip(todo, futures):
      key = results.run_key(c)
      checkpointer = None
      if work:
        checkpointer = checkpoint.Checkpointer(work.checkpoint_dir(key),
                                               keep=c.checkpoint_keep,
                                               every_steps=c.checkpoint_every_steps,
                                               min_seconds=c.checkpoint_min_seconds)
      new[key] = run(c, data, experiment=experiment, programs=future.result(), runner=runner,
                     checkpointer=checkpointer)
      if work:
        results.append_records(work.results_path, new[key])
        if not c.keep_checkpoints and results.is_writer():
          checkpointer.delete()
          with contextlib.suppress(OSError):  # checkpoints/ too, when no run's are left
            os.rmdir(os.path.dirname(work.checkpoint_dir(key)))
  records = []  # in grid order: this call's runs and the runs finished before
  for c in configs:
    key = results.run_key(c)
    records += new[key] if key in new else [finished[(key, s)] for s in range(c.seeds)]
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
  config_dict = results.jsonable(config.to_dict())
  config_dict['seed'] = result['seed']
  return {
      'experiment': experiment,
      'run_key': results.run_key(config),
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
