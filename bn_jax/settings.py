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
from bn_jax import models
from bn_jax import norms
from bn_jax import optim
from bn_jax import parallel


ConfigError = errors.ConfigError  # a setting that cannot run (`bn_jax.errors`)


def base_config():
  """Settings every experiment shares; scripts start from these and add their own.

  Some are read only with others (the renorm_* settings with norm=batch_renorm, momentum with
  the momentum optimizers, ...: `checks.READ_ONLY_WITH`); one given on the command line that
  no run of the script reads is an error, never silently ignored.
  """
  c = ml_collections.ConfigDict()
  c.data = 'tfds:mnist'  # tfds:NAME | idx:DIR | cifar:DIR | synthetic[:N[:HxWxC]]
  c.data_dir = ''  # TFDS data directory ('' = TFDS's default)
  c.val_fraction = 0.1
  c.split_seed = 42  # the validation split is the same for every run
  c.train_examples = 0  # > 0: train on this many examples (a fixed random subset); 0: all
  # Inputs: pixel / 255 in [0, 1] (the original study), or standardized per channel by the
  # training split's mean and std; one value per sweep (the data is loaded once).
  c.standardize = False
  # none | crop_flip (pad 4 + random crop + flip, on the device; the CNN and the ResNet only:
  # the MLP, which sees pixels as an unordered vector, is refused it)
  c.augment = 'none'
  c.model = 'mlp'  # mlp | cnn | resnet
  c.resnet_depth = 20  # 6n+2: the CIFAR ResNet of He et al. 2016 (20, 32, 44, 56, 110)
  c.resnet_width = 16  # channels of the first stage (then 2x, 4x)
  c.norm = 'batch'  # batch | none | layer | group | batch_renorm | noisy_batch (bn_jax/norms.py)
  c.norm_groups = 32  # GroupNorm: groups per layer (capped at its channel count)
  # Batch Renorm (Ioffe 2017): r in [1/rmax, rmax], d in [-dmax, dmax]; plain BN for the first
  # renorm_warmup_steps, then relaxed linearly to rmax by renorm_rmax_steps, dmax by ..._dmax_.
  c.renorm_rmax = 3.0
  c.renorm_dmax = 5.0
  c.renorm_warmup_steps = 5000
  c.renorm_rmax_steps = 40000
  c.renorm_dmax_steps = 25000
  # noisy_batch (Santurkar et al. 2018, Appendix A): BN, then in training per step and channel
  # x * U(1, 1 + bn_noise / 2) + U(-bn_noise, bn_noise), each with a per-activation jitter of
  # U(-bn_noise / 10, bn_noise / 10); in evaluation the noise's mean, x * (1 + bn_noise / 4).
  # 0.5: the paper's scale U(1, 1.25) and shift U(-0.5, 0.5) (eval scale 1.125).
  c.bn_noise = 0.5
  # Where BN's training statistics come from: 'sync' = the whole (global) batch; 'local' = each
  # device's part; 'ghost' = groups of bn_group_size examples (ghost BN), separating the
  # statistics batch from the optimizer's batch.
  c.bn_stats = 'sync'
  c.bn_group_size = 0
  c.hidden = (128,)  # MLP hidden widths
  c.features = (32, 64)  # CNN: channels of each 3x3 conv block (the first two max-pool)
  c.cnn_pools = 2  # CNN: how many of the first conv blocks end in a 2x2 max-pool
  c.cnn_dense_norm = False  # CNN: normalize the hidden Dense layer too, as the conv blocks
  c.init_scale = 1.0  # hidden (and conv) weights at init: this times LeCun-normal
  c.init_std = 0.0  # > 0: every kernel of the MLP / CNN N(0, init_std^2) instead
  c.dropout = 0.2
  c.activation = 'relu'
  # bfloat16 compute for convs and Dense layers (GPU/TPU); params, optimizer state and the
  # norms stay float32 (as Flax's examples/imagenet; on CPU bfloat16 is slower)
  c.half_precision = False
  # Its dtype: 'bfloat16' (TPU, GPUs since Ampere) or 'float16' (older GPUs), which trains with
  # dynamic loss scaling (Flax's DynamicScale, as examples/imagenet does on GPU).
  c.half_precision_dtype = 'bfloat16'
  c.bn_momentum = norms.BN_MOMENTUM  # 0.99, Keras' (PyTorch's 0.1 is 0.9 here)
  c.bn_epsilon = norms.BN_EPSILON  # 1e-3, Keras' (Flax and PyTorch use 1e-5)
  # Optimizer (bn_jax/optim.py): adam (the original study) | sgd | momentum | nesterov | adamw
  c.optimizer = 'adam'
  c.learning_rate = 1e-3
  c.momentum = 0.9  # of momentum / nesterov
  c.weight_decay = 0.0  # L2 (decoupled for adamw) on kernels ...
  c.weight_decay_norms_and_biases = False  # ... and, if true, on biases and norm scales/shifts
  c.lr_schedule = 'constant'  # constant | cosine | step | warmup_cosine
  c.warmup_epochs = 0.0  # linear warm-up from 0 (constant, step, warmup_cosine)
  # step: multiply the rate by lr_decay_factor at these epochs (each within the budget of some
  # run: a decay that no run reaches is an error)
  c.lr_decay_epochs = ()
  c.lr_decay_factor = 0.1
  c.batch_size = 32
  c.epochs = 5
  c.max_steps = 0  # a budget in steps instead of epochs (0: use epochs)
  c.seeds = 3  # seeds first_seed .. first_seed + seeds - 1, trained together in one program
  c.first_seed = 0  # e.g. a selection (of rates, budgets) on seeds disjoint from the tested
  c.chunk_steps = 0  # train steps per dispatched program; 0 = up to the next evaluation
  # Validation points per epoch (the `curve` of each record); at most the steps of an epoch
  # (of the longest epoch among a sweep's runs): more is an error, not silently fewer points.
  c.evals_per_epoch = 1
  c.target_val_accuracy = 0.0  # > 0: tables report steps/examples to reach it
  # > 0: PreciseBN after training, BN statistics recomputed from this many training examples
  # (records gain precise_val_* and precise_test_*)
  c.precise_bn_examples = 0
  # Also evaluate with the running averages bias-corrected for their initial 0/1 (divided by
  # 1 - momentum^steps, as Adam does): `final['corrected_val_accuracy']` etc.
  c.bn_ema_bias_correction = False
  # Steps (from the start) where a run is measured and, in a study, keeps its state: records
  # gain `saved` (train/val/test metrics per step); one run gives a whole budget curve.
  c.save_states_at = ()
  c.eval_batch_size = 1000
  c.progress = True
  c.tensorboard = True  # event files in WORKDIR/tensorboard/<run key>/seed_<s>/
  # Devices: data-parallel over `devices` (0 = every device JAX sees, of every host) with
  # `parallel` = shard_map | pmap; hosts join through jax.distributed (unset: environment).
  c.devices = 0
  c.parallel = 'shard_map'
  # data_parallel: each configuration over all `devices`; per_device: up to one configuration
  # per local device at once, each on its own device (numbers as alone on one device).
  c.placement = 'data_parallel'
  # 'I/N': train only the (configuration, seed) pairs of shard I of N, N processes sharing the
  # workdir (`bn_jax.shards`; '' = SLURM's array variables if set, else everything).
  c.shard = ''
  c.coordinator_address = ''  # e.g. 10.0.0.1:1234
  c.num_processes = 0
  c.process_id = -1
  # Configurations trained at the same time (threads); 0 = auto: one per CPU core (at most 8)
  # on a single CPU device, else 1. Each run's numbers do not depend on it.
  c.concurrent_runs = 0
  c.compilation_cache = True  # JAX's persistent compilation cache
  # '' = $XDG_CACHE_HOME/bn_jax/jax (~/.cache/bn_jax/jax); one set must be a writable directory
  # (or creatable): anything else is an error before training, not a cache silently off
  c.compilation_cache_dir = ''
  # Checkpoints and resuming: the same command with the same workdir resumes a sweep, skipping
  # finished runs; resume=false starts afresh (refusing to delete results unless overwrite).
  c.resume = True
  c.overwrite = False
  # A finished run made by other code (bn_jax sources or the script changed): 'refuse' (stop
  # and say so), 'retrain' (train it again; the old record moves to superseded.jsonl) or
  # 'reuse' (use it as it is; its record keeps its own code version).
  c.on_code_change = 'refuse'
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  c.checkpoint_min_seconds = 10.0  # but never more often than this
  c.checkpoint_keep = 3
  c.keep_checkpoints = False  # delete a run's checkpoints once its results are recorded
  c.bn_batch_of_one = 'error'  # BN over 1 example outputs just beta: 'error' | 'warn'
  return c


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
