"""Every check on the run settings, each once, with one message: `validate` (a resolved config,
before anything trains or is written), `check_sweep` (what needs the data and the workdir,
before a sweep opens its workdir). Each failure is a `settings.ConfigError` naming the
setting and the fix. Command-line settings a script would ignore: `bn_jax.overrides`."""

import math
import os
import warnings

from bn_jax import augment
from bn_jax import data
from bn_jax import models
from bn_jax import norms
from bn_jax import optim
from bn_jax import parallel
from bn_jax import resnet
from bn_jax import schedule
from bn_jax import settings
from bn_jax import shards
from bn_jax import summaries


def _check(ok, message):
  if not ok:
    raise settings.ConfigError(message)


def _choice(config, key, choices):
  _check(config[key] in choices, f'unknown {key} {config[key]!r}: choose one of '
         f'{tuple(choices)}.')


def _at_least(config, key, low):
  value = config[key]
  _check(isinstance(value, int) and value >= low, f'{key} must be an integer >= {low}, got '
         f'{value!r}.')


def _fraction(config, key, low_open=False):
  value = config[key]
  ok = (0 < value < 1) if low_open else (0 <= value < 1)
  _check(ok, f'{key} must be in {"(" if low_open else "["}0, 1), got {value!r}.')


def _positive(config, key):
  value = config[key]
  _check(math.isfinite(value) and value > 0, f'{key} must be a positive number, got {value!r}.')


def _widths(config, key, example):
  value = tuple(config[key])
  _check(value and all(isinstance(w, int) and w >= 1 for w in value),
         f'{key} must list at least one positive integer width, got {value}: e.g. '
         f'--config.{key}="{example}".')


# Checks of settings that only some scripts have (their grid lists and inputs), applied where
# present.
GRID_CHECKS = {
    'norms': lambda c: [_check(n in settings.NORMS, f'norms must list some of '
                               f'{settings.NORMS}, got {tuple(c.norms)}.')
                        for n in c.norms or (None,)],
    'batch_sizes': lambda c: _widths(c, 'batch_sizes', '(16,32)'),
    'base_batch_size': lambda c: _at_least(c, 'base_batch_size', 1),
    'lr_scaling': lambda c: settings.scaled_learning_rate(1.0, 1, 1, c.lr_scaling),
    'lrs': lambda c: _check(c.lrs and all(math.isfinite(x) and x > 0 for x in c.lrs),
                            f'lrs must list positive rates, got {tuple(c.lrs)}.'),
    'init_scales': lambda c: _check(c.init_scales and all(x > 0 for x in c.init_scales),
                                    f'init_scales must list positive scales, got '
                                    f'{tuple(c.init_scales)}.'),
    'depths': lambda c: _widths(c, 'depths', '(2,5)'),
    'depth_width': lambda c: _at_least(c, 'depth_width', 1),
    'activations': lambda c: _check(c.activations and set(c.activations) <= set(
        models.ACTIVATIONS), f'activations must list some of {tuple(models.ACTIVATIONS)}, got '
        f'{tuple(c.activations)}.'),
    'momenta': lambda c: _check(c.momenta and all(0 <= m < 1 for m in c.momenta),
                                f'momenta must list numbers in [0, 1), got {tuple(c.momenta)}.'),
    'precise_examples': lambda c: _check(c.precise_examples and all(
        isinstance(n, int) and n >= 0 for n in c.precise_examples), 'precise_examples must '
        f'list example counts >= 0 (0: every training example), got {tuple(c.precise_examples)}'
        ": e.g. --config.precise_examples='(1000,0)'."),
    'batch_sizes_workdir': lambda c: _check_batch_sizes_workdir(c.batch_sizes_workdir),
}

def _from_value_error(check, *args):
  """`check(*args)`, its ValueError (a check of the module that owns the rule) raised as a
  `settings.ConfigError` with the same message."""
  try:
    return check(*args)
  except ValueError as e:
    raise settings.ConfigError(str(e)) from None


def validate(config, num_devices=1, num_train=None):
  """Checks every setting of a resolved config before anything trains or is written; raises a
  `settings.ConfigError` naming the setting and the fix."""
  c = config
  kind, spec = _from_value_error(data.parse_spec, c.data)
  _check_choices(c)
  _check_numbers(c)
  _check_together(c, num_devices, num_train)
  _check_inputs(c, spec[1] if kind == 'synthetic' else None)
  if c.compilation_cache and c.compilation_cache_dir:
    _check_directory(settings.compilation_cache_path(c), 'compilation_cache_dir',
                     'pass --config.compilation_cache_dir=DIR with a directory, or '
                     '--config.compilation_cache=false')


def _check_choices(c):
  """Settings that take one of a few values (and the optimizer's own numbers)."""
  _fraction(c, 'val_fraction', low_open=True)
  _choice(c, 'model', models.MODELS)
  _choice(c, 'standardize', (True, False))
  _choice(c, 'augment', augment.AUGMENTATIONS)
  _choice(c, 'norm', settings.NORMS)
  _choice(c, 'bn_stats', parallel.BN_STATS)
  _choice(c, 'activation', models.ACTIVATIONS)
  _choice(c, 'parallel', parallel.KINDS)
  _choice(c, 'placement', ('data_parallel', 'per_device'))
  shards.parse(c.shard, environ={})  # a malformed I/N: one line (SLURM's variables are read later)
  _choice(c, 'on_code_change', ('refuse', 'retrain', 'reuse'))
  _choice(c, 'bn_batch_of_one', ('error', 'warn'))
  _choice(c, 'tensorboard', (True, False))
  _choice(c, 'half_precision', (True, False))
  _choice(c, 'half_precision_dtype', ('bfloat16', 'float16'))
  _choice(c, 'optimizer', optim.OPTIMIZERS)
  _choice(c, 'lr_schedule', optim.SCHEDULES)
  _choice(c, 'weight_decay_norms_and_biases', (True, False))
  _fraction(c, 'momentum')
  _check(c.weight_decay >= 0, f'weight_decay must be >= 0, got {c.weight_decay}.')
  _check(c.warmup_epochs >= 0, f'warmup_epochs must be >= 0, got {c.warmup_epochs}.')
  _check(0 < c.lr_decay_factor <= 1, f'lr_decay_factor must be in (0, 1], got '
         f'{c.lr_decay_factor}.')
  _choice(c, 'progress', (True, False))


def _check_numbers(c):
  """Each number in its range: widths, rates, counts, fractions, the grid lists."""
  if c.model == 'resnet':
    _from_value_error(resnet.check_depth, c.resnet_depth)
    _at_least(c, 'resnet_width', 1)
  else:
    _widths(c, 'hidden' if c.model == 'mlp' else 'features',
            '(128,)' if c.model == 'mlp' else '(32,64)')
  if c.model == 'cnn' and 'cnn_pools' in c:
    _at_least(c, 'cnn_pools', 0)
    _choice(c, 'cnn_dense_norm', (True, False))
  _fraction(c, 'dropout')
  _fraction(c, 'bn_momentum')
  for key in ('init_scale', 'bn_epsilon', 'learning_rate'):
    _positive(c, key)
  _check(c.checkpoint_min_seconds >= 0, f'checkpoint_min_seconds must be >= 0, got '
         f'{c.checkpoint_min_seconds}.')
  _check(c.init_std >= 0, f'init_std must be >= 0 (0: init_scale x LeCun-normal), got '
         f'{c.init_std}.')
  for key in ('train_examples', 'epochs', 'max_steps', 'chunk_steps', 'checkpoint_every_steps',
              'devices', 'bn_group_size', 'precise_bn_examples', 'concurrent_runs',
              'first_seed'):
    _at_least(c, key, 0)
  for key in ('seeds', 'evals_per_epoch', 'eval_batch_size', 'checkpoint_keep'):
    _at_least(c, key, 1)
  _check(c.epochs or c.max_steps, 'nothing to train: set epochs > 0 (or max_steps > 0).')
  _check(0 <= c.target_val_accuracy <= 1, f'target_val_accuracy must be in [0, 1], got '
         f'{c.target_val_accuracy}.')
  for key, check in GRID_CHECKS.items():
    if key in c:
      check(c)


def _check_together(c, num_devices, num_train):
  """Settings checked together: the batch against the data and devices, the norm's settings,
  the schedule against the budget."""
  _from_value_error(schedule.check_batch, c.batch_size, num_train or None, num_devices)
  if c.norm in settings.RUNNING_STATS:
    _check_bn_group(c, num_devices)
  if c.norm == 'group':
    _check_groups(c)
  if c.norm in settings.RUNNING_STATS:
    modes = norms.REGISTRY[c.norm].bn_stats
    _check(c.bn_stats in modes, f"bn_stats={c.bn_stats!r} is not one of norm={c.norm}'s: "
           f'use one of {modes}' + (" (bn_stats='ghost' is ghost BN, norm=batch)."
                                    if c.bn_stats == 'ghost' else '.'))
  _check(c.bn_noise >= 0, f'bn_noise must be >= 0, got {c.bn_noise}.')
  # each norm's own checks (e.g. Batch Renorm's clip schedule)
  _from_value_error(norms.from_settings, settings.norm_kind(c), c)
  if num_train:  # the schedule's own checks (decay epochs, warm-up within the budget)
    steps = schedule.Schedule(num_train, c.batch_size, num_devices=num_devices).steps_per_epoch
    _from_value_error(settings.make_optimizer, c, steps, c.max_steps or c.epochs * steps)


def _check_inputs(c, image_shape=None):
  """The model suits the inputs: augmentation only for the convolutional models, and images
  of `image_shape` (H, W, C) when known no smaller than the model takes."""
  _check(c.augment == 'none' or c.model != 'mlp', f'augment={c.augment!r} crops and flips '
         'images for the convolutional models; the MLP sees the pixels as an unordered '
         'vector: use --config.model=cnn (or resnet), or --config.augment=none.')
  if image_shape is None:
    return
  low = models.min_image_size(settings.make_model(c))
  pools = low.bit_length() - 1
  _check(min(image_shape[:2]) >= low, f'model={c.model} needs images of at least {low}x{low} '
         f'pixels ({pools} 2x2 max-pool{"s" * (pools > 1)}, each halving them, rounding down), '
         f'got {image_shape[0]}x{image_shape[1]} ({c.data}): use larger images, or '
         '--config.model=mlp or resnet.')


def _check_directory(path, what, fix):
  """`path` is, or can be made, a writable directory: it, or the nearest of its parents that
  exists, is a directory this process may write."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  where = f'{what} {path}' + ('' if existing == os.path.abspath(path) else
                               f' cannot be created: {existing}')
  _check(os.path.isdir(existing), f'{where} is a file, not a directory: {fix}.')
  _check(os.access(existing, os.W_OK | os.X_OK), f'{where} is not writable: {fix}.')


def _check_batch_sizes_workdir(path):
  if not path:
    return  # claim 8 is then reported as 'not run'
  _check(os.path.isdir(path), f'batch_sizes_workdir {path!r} does not exist: pass the '
         '--workdir of a finished experiments/batch_sizes.py run, or leave it empty.')
  _check(os.path.isfile(os.path.join(path, 'results.jsonl')), f'batch_sizes_workdir {path!r} '
         'holds no results.jsonl: pass the --workdir of a finished experiments/batch_sizes.py '
         'run, or leave it empty.')


def check_workdir(workdir):
  """A script's --workdir: not empty (its tables would land in the current directory and its
  runs nowhere). None, a sweep without a workdir (`sweep.run`), writes nothing and passes."""
  _check(workdir is None or str(workdir).strip(), '--workdir is empty: pass --workdir=DIR, the '
         "directory for the script's results (or leave the flag out for its default).")


def check_sweep(configs, dataset, num_devices, workdir):
  """What needs the data and the workdir, checked before a sweep opens its workdir or trains:
  the workdir, the image size each model needs, the TensorBoard directory, and settings no
  run of the sweep reads in full (`_check_reach`). `configs` are the sweep's validated runs."""
  check_workdir(workdir)
  for c in configs:
    _check_inputs(c, dataset.image_shape)
  _check_reach(configs, len(dataset.train_labels), num_devices)
  board = summaries.root(workdir) if workdir else ''
  # One that exists; a new one is made in the workdir, which `results.Workdir` checks.
  if os.path.lexists(board) and any(c.tensorboard for c in configs):
    _check_directory(board, 'the TensorBoard directory',
                     'move it away, or pass --config.tensorboard=false')


def _check_reach(configs, num_train, num_devices):
  """Refuses evaluation points and rate decays that no run of the sweep reaches:
  evals_per_epoch above the steps of the longest epoch, lr_decay_epochs at or past the end of
  the longest step-schedule run."""
  if not configs:
    return
  plans = [(c, schedule.Schedule(num_train, c.batch_size, c.epochs, c.max_steps,
                                 num_devices=num_devices)) for c in configs]
  steps = max(s.steps_per_epoch for _, s in plans)
  evals = max(c.evals_per_epoch for c in configs)
  _check(evals <= steps, f'evals_per_epoch={evals} is more than the {steps} steps of an '
         f'epoch ({num_train} training examples, batch {min(c.batch_size for c in configs)}): '
         f'at most {steps} validation points fit; pass --config.evals_per_epoch={steps} or '
         'fewer.')
  for c, s in plans:
    outside = [p for p in c.save_states_at if not 0 < p <= s.total_steps]
    first = outside[0] if outside else 0
    _check(not outside, f'save_states_at={tuple(c.save_states_at)}: step {first} is '
           f'outside the run of {s.total_steps} steps ({c.model}/{c.norm} batch '
           f'{c.batch_size}): list steps from 1 to {s.total_steps}.' if outside else '')
  stepped = [(c, s) for c, s in plans if c.lr_schedule == 'step']
  longest = max((s.total_steps / s.steps_per_epoch for _, s in stepped), default=0)
  for decay in sorted({e for c, _ in stepped for e in c.lr_decay_epochs}):
    _check(any(round(decay * s.steps_per_epoch) < s.total_steps for _, s in stepped),
           f'lr_decay_epochs={tuple(stepped[0][0].lr_decay_epochs)}: the decay at epoch '
           f'{decay:g} comes at or after the end of training (epoch {longest:g}), so it never '
           f'happens: list epochs below {longest:g}, or train longer (--config.epochs).')


def _check_groups(c):
  _at_least(c, 'norm_groups', 1)
  widths = {'mlp': c.hidden, 'cnn': c.features}.get(
      c.model, (c.resnet_width, 2 * c.resnet_width, 4 * c.resnet_width))
  for width in widths:
    groups = min(c.norm_groups, width)
    _check(width % groups == 0, f'norm_groups={c.norm_groups} must divide the {width} channels '
           f'of every normalized layer ({c.model} widths {tuple(widths)}): choose a divisor of '
           f'{width}.')


def _check_bn_group(c, num_devices):
  per_device = c.batch_size // num_devices
  group = {'sync': c.batch_size, 'local': per_device, 'ghost': c.bn_group_size}[c.bn_stats]
  _check(c.bn_stats != 'ghost' or group >= 1, "bn_stats='ghost' needs "
         '--config.bn_group_size=G, the examples per BN group.')
  _check(c.bn_stats != 'ghost' or per_device % group == 0, f'bn_group_size={group} must '
         f'divide the batch of {per_device} examples per device: choose a divisor of it.')
  if group == 1:
    message = ('BatchNorm over a single example: its variance is 0, so the layer outputs beta '
               'whatever the input. Use a larger batch / bn_group_size, or set '
               '--config.bn_batch_of_one=warn to run anyway.')
    _check(c.bn_batch_of_one == 'warn', message)
    warnings.warn(message)
