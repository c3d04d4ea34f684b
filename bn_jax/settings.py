"""Run settings: the defaults every experiment shares, a run's identity, and the one mapping
from a config to the model, the optimizer and `loop.fit`'s arguments (the checks on them:
`bn_jax.checks`).

A run is identified by the settings that change its numbers (`identity`): data and split, model
and its widths, normalization and BN settings, optimizer settings, batch size, rate, budget and
the device count; a run record adds the seed and the code version. Grid lists (`norms`,
`batch_sizes`, `lrs`, ...), process and output settings never enter it, so growing a grid or
the seed count re-uses every finished run.
"""

import math
import os

import jax.numpy as jnp
import ml_collections

from bn_jax import errors
from bn_jax.defaults import base_config  # pylint: disable=unused-import  (settings.base_config)
from bn_jax import models
from bn_jax import norms
from bn_jax import optim
from bn_jax import parallel


ConfigError = errors.ConfigError  # a setting that cannot run (`bn_jax.errors`)


# The values of `norm` (ghost BN is norm=batch, bn_stats=ghost), and those with running averages
# of batch statistics: both from `norms.REGISTRY`, where each norm is declared once.
NORMS = tuple(n.name for n in norms.REGISTRY.values() if n.configurable)
RUNNING_STATS = tuple(n for n in NORMS if norms.REGISTRY[n].running_stats)
# BN's evaluation settings, read (and in the identity) with running statistics only.
RUNNING_STATS_KEYS = ('bn_stats', 'bn_batch_of_one', 'precise_bn_examples',
                      'bn_ema_bias_correction')


def identity(config, num_devices=1, data_content=None):
  """The settings that change a run's numbers (all its seeds): the run identity.

  Only the settings that matter for this run enter: the MLP's `hidden` or the CNN's
  `features`; BN's settings only with BN; `epochs` only without a `max_steps` budget.
  `data_content` (`Dataset.fingerprint`, as a sweep passes it) names the data itself, so files
  replaced under the same `data` spec make other runs.
  """
  c = config
  run = {'data': c.data, 'val_fraction': c.val_fraction, 'split_seed': c.split_seed,
         'train_examples': c.train_examples, 'model': c.model, 'norm': c.norm,
         'compute_dtype': c.half_precision_dtype if c.half_precision else 'float32',
         'optimizer': c.optimizer, 'learning_rate': c.learning_rate, 'batch_size': c.batch_size,
         'lr_schedule': c.lr_schedule, 'weight_decay': c.weight_decay,
         'evals_per_epoch': c.evals_per_epoch, 'num_devices': num_devices}
  if data_content:
    run['data_content'] = data_content
  if c.standardize:  # non-default values only: existing run keys stay as they were
    run['standardize'] = True
  if c.augment != 'none':
    run['augment'] = c.augment
  run.update({k: list(v) if isinstance(v, tuple) else v for k, v in _layers(c).items()
              if k != 'dtype'})  # compute_dtype names it
  run.update({'max_steps': c.max_steps} if c.max_steps else {'epochs': c.epochs})
  if c.optimizer in ('momentum', 'nesterov'):
    run['momentum'] = c.momentum
  if c.weight_decay:
    run['weight_decay_norms_and_biases'] = c.weight_decay_norms_and_biases
  if c.warmup_epochs:
    run['warmup_epochs'] = c.warmup_epochs
  if c.save_states_at:  # what the records hold (non-default values only, as above)
    run['save_states_at'] = list(c.save_states_at)
  if c.lr_schedule == 'step':
    run.update(lr_decay_epochs=list(c.lr_decay_epochs), lr_decay_factor=c.lr_decay_factor)
  declared = norms.REGISTRY[norm_kind(c)]  # its settings, from the one declaration
  run.update({setting: c[setting] for setting in declared.settings.values()})
  if declared.running_stats:
    run['bn_stats'] = c.bn_stats
    if c.precise_bn_examples:
      run['precise_bn_examples'] = c.precise_bn_examples
    if c.bn_ema_bias_correction:
      run['bn_ema_bias_correction'] = True
  return run


def norm_kind(config):
  """The norm a config builds: `norm`, except ghost BN for norm=batch with bn_stats=ghost."""
  return 'ghost' if config.norm == 'batch' and config.bn_stats == 'ghost' else config.norm


def make_model(config, data_parallel=False):
  """The model a config describes. `bn_stats` picks where BN's training statistics come from:
  'sync' (the whole batch, across devices when `data_parallel`), 'local' (each device's part;
  on one device the whole batch) or 'ghost' (groups of `bn_group_size` examples)."""
  c = config
  kind = norm_kind(c)
  synced = norms.REGISTRY[kind].running_stats and c.bn_stats == 'sync' and data_parallel
  layer = norms.from_settings(kind, c, parallel.AXIS if synced else None)
  return models.create_model(c.model, norm=layer, **_layers(c))


def _layers(c):
  """The model-specific settings of `c.model` (the others do not apply to it)."""
  dtype = {'dtype': jnp.dtype(c.half_precision_dtype)} if c.half_precision else {}
  if c.model == 'resnet':
    return {'depth': c.resnet_depth, 'width': c.resnet_width, **dtype}
  common = {'dropout': c.dropout, 'activation': c.activation, 'init_scale': c.init_scale,
            **dtype}
  if c.init_std:  # non-default values only: existing run keys stay as they were
    common['init_std'] = c.init_std
  if c.model == 'mlp':
    return {'hidden': tuple(c.hidden), **common}
  cnn = {'features': tuple(c.features), **common}
  if c.get('cnn_pools', 2) != 2:  # non-default values only: existing run keys stay as they were
    cnn['pools'] = c.cnn_pools
  if c.get('cnn_dense_norm', False):
    cnn['dense_norm'] = True
  return cnn


def make_optimizer(config, steps_per_epoch, total_steps):
  """The Optax optimizer (with its rate schedule) a config describes, for a run of
  `total_steps` steps of which `steps_per_epoch` make an epoch."""
  c = config
  rate = optim.lr_schedule(c.lr_schedule, base_lr=c.learning_rate,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           warmup_epochs=c.warmup_epochs, decay_epochs=tuple(c.lr_decay_epochs),
                           decay_factor=c.lr_decay_factor)
  return optim.make_optimizer(c.optimizer, learning_rate=rate, momentum=c.momentum,
                              weight_decay=c.weight_decay,
                              weight_decay_norms_and_biases=c.weight_decay_norms_and_biases)


def fit_args(config):
  """`loop.fit`'s keyword arguments (all but the model, data, seeds and runner) from a config."""
  c = config
  return dict(learning_rate=c.learning_rate, batch_size=c.batch_size, epochs=c.epochs,
              max_steps=c.max_steps, chunk_steps=c.chunk_steps,
              evals_per_epoch=c.evals_per_epoch, eval_batch_size=c.eval_batch_size,
              progress=c.progress, precise_bn_examples=c.precise_bn_examples,
              augment=c.augment, loss_scale=loss_scale(c),
              save_states_at=tuple(c.save_states_at),
              bn_ema_bias_correction=(c.bn_momentum if c.bn_ema_bias_correction and
                                      c.norm in RUNNING_STATS else None))


def seed_list(config):
  """The seeds a configuration trains: first_seed .. first_seed + seeds - 1."""
  return list(range(config.first_seed, config.first_seed + config.seeds))


def loss_scale(config):
  """Whether the run trains with dynamic loss scaling: float16 compute."""
  return bool(config.half_precision and config.half_precision_dtype == 'float16')


def compilation_cache_path(config):
  """The directory of JAX's persistent compilation cache: `compilation_cache_dir`, or by
  default $XDG_CACHE_HOME/bn_jax/jax (~/.cache/bn_jax/jax)."""
  return config.compilation_cache_dir or os.path.join(
      os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'bn_jax', 'jax')


def resolve(config, **overrides):
  """A copy of `config` with `overrides` applied (the caller's config stays as it was)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key not in config:
      raise ConfigError(f'unknown config key {key!r}: choose one of {sorted(config.keys())}.')
    config[key] = value
  return config


def scaled_learning_rate(learning_rate, batch_size, base_batch_size, rule='none'):
  """The rate for `batch_size` under a scaling rule relative to `base_batch_size`."""
  ratio = batch_size / base_batch_size
  rules = {'none': 1.0, 'linear': ratio, 'sqrt': math.sqrt(ratio)}
  if rule not in rules:
    raise ConfigError(f'unknown lr_scaling {rule!r}: choose one of {tuple(rules)}.')
  return learning_rate * rules[rule]
