"""Every check on the run settings, each once, with one message: `validate` (a resolved config,
before anything trains or is written) and `check_overrides` (command-line settings a script
would ignore). Each failure is a `settings.ConfigError` naming the setting and the fix."""

import math
import warnings

from bn_jax import augment
from bn_jax import data
from bn_jax import models
from bn_jax import norms
from bn_jax import optim
from bn_jax import parallel
from bn_jax import settings


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


# Checks of settings that only some scripts have (their grid lists), applied where present.
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
}


def validate(config, num_devices=1, num_train=None):
  """Checks every setting of a resolved config before anything trains or is written; raises a
  `settings.ConfigError` naming the setting and the fix."""
  c = config
  try:
    data.parse_spec(c.data)
  except ValueError as e:
    raise settings.ConfigError(str(e)) from None
  _fraction(c, 'val_fraction', low_open=True)
  _choice(c, 'model', models.MODELS)
  _choice(c, 'standardize', (True, False))
  _choice(c, 'augment', augment.AUGMENTATIONS)
  _choice(c, 'norm', settings.NORMS)
  _choice(c, 'bn_stats', parallel.BN_STATS)
  _choice(c, 'activation', models.ACTIVATIONS)
  _choice(c, 'parallel', parallel.KINDS)
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
  if c.model == 'resnet':
    _check(isinstance(c.resnet_depth, int) and c.resnet_depth >= 8 and
           (c.resnet_depth - 2) % 6 == 0, f'resnet_depth must be 6n+2 (20, 32, 44, 56, '
           f'110), got {c.resnet_depth}.')
    _at_least(c, 'resnet_width', 1)
  else:
    _widths(c, 'hidden' if c.model == 'mlp' else 'features',
            '(128,)' if c.model == 'mlp' else '(32,64)')
  _fraction(c, 'dropout')
  _fraction(c, 'bn_momentum')
  for key in ('init_scale', 'bn_epsilon', 'learning_rate'):
    _positive(c, key)
  _check(c.checkpoint_min_seconds >= 0, f'checkpoint_min_seconds must be >= 0, got '
         f'{c.checkpoint_min_seconds}.')
  _check(c.init_std >= 0, f'init_std must be >= 0 (0: init_scale x LeCun-normal), got '
         f'{c.init_std}.')
  for key in ('train_examples', 'epochs', 'max_steps', 'chunk_steps', 'checkpoint_every_steps',
              'devices', 'bn_group_size', 'precise_bn_examples', 'concurrent_runs'):
    _at_least(c, key, 0)
  for key in ('seeds', 'evals_per_epoch', 'eval_batch_size', 'checkpoint_keep'):
    _at_least(c, key, 1)
  _check(c.epochs or c.max_steps, 'nothing to train: set epochs > 0 (or max_steps > 0).')
  _check(0 <= c.target_val_accuracy <= 1, f'target_val_accuracy must be in [0, 1], got '
         f'{c.target_val_accuracy}.')
  for key, check in GRID_CHECKS.items():
    if key in c:
      check(c)
  _check(c.batch_size >= 1 and (not num_train or c.batch_size <= num_train),
         f'batch_size must be in [1, {num_train or "the training set size"}], got '
         f'{c.batch_size}.')
  _check(c.batch_size % num_devices == 0,
         f'batch_size {c.batch_size} is not divisible by the {num_devices} devices: choose a '
         'multiple of the device count (or --config.devices).')
  if c.norm in settings.RUNNING_STATS:
    _check_bn_group(c, num_devices)
  if c.norm == 'group':
    _check_groups(c)
  if c.norm in ('batch_renorm', 'noisy_batch'):
    _check(c.bn_stats != 'ghost', f"bn_stats='ghost' is ghost BN: with norm={c.norm} use "
           "bn_stats='sync' or 'local'.")
  _check(c.bn_noise >= 0, f'bn_noise must be >= 0, got {c.bn_noise}.')
  if c.norm == 'batch_renorm':
    try:
      norms.norm_layer('batch_renorm', **{k[len('renorm_'):]: c[k] for k in settings.RENORM_KEYS})
    except ValueError as e:
      raise settings.ConfigError(str(e)) from None
  if num_train:  # the schedule's own checks (decay epochs, warm-up within the budget)
    steps = -(-num_train // c.batch_size) if num_devices == 1 else num_train // c.batch_size
    try:
      settings.make_optimizer(c, steps, c.max_steps or c.epochs * steps)
    except ValueError as e:
      raise settings.ConfigError(str(e)) from None


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


def check_overrides(config, overridden, grid_keys=()):
  """Refuses command-line settings that this script would ignore: a key its grid sets (e.g.
  `norm` where the script compares `norms`), or the other model's layer widths."""
  for key in overridden:
    top = key.split('.')[0]
    if top in grid_keys:
      lists = {'norm': 'norms', 'batch_size': 'batch_sizes', 'learning_rate': 'lrs'}
      hint = f' (set --config.{lists[top]} instead)' if lists.get(top) in config else ''
      raise settings.ConfigError(f'--config.{top} is not used by this script: its grid sets '
                                 f'{top} for every run{hint}.')
    own = {'mlp': ('hidden',), 'cnn': ('features',), 'resnet': ('resnet_depth', 'resnet_width')}
    unused = {k for keys in own.values() for k in keys} - set(own.get(config.model, ()))
    if top in unused and 'depths' not in config:
      raise settings.ConfigError(f'--config.{top} is not used with model={config.model} (the '
                                 'MLP has `hidden`, the CNN `features`, the ResNet '
                                 '`resnet_depth` and `resnet_width`): set its own, or '
                                 '--config.model.')
