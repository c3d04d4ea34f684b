"""Normalization layers and their constructors: the one place that turns the `norm` setting
into what the models call.

A norm constructor builds a norm module, `norm(use_running_average=not train)(x, mask=...)`,
as Flax's examples/imagenet passes `partial(nn.BatchNorm, ...)`. Each kind is declared once in
`REGISTRY` (constructor, settings, running statistics, `bn_stats` modes); the settings' lists,
run identities and checks derive from it, so adding a norm is its constructor class plus one
entry. `norm_layer(kind, ...)` makes one for each kind in `NORMS` (None for 'none');
constructors compare and hash equal for equal
settings (models are static arguments of jitted functions) and change settings with
`.replace(momentum=0.0)`. `normalize(norm, x, train, mask)` is how a model applies one.

BatchNorm keeps its running mean and variance in the mutable `batch_stats` collection:
`train=True` normalizes with the batch's statistics and updates the running averages,
`train=False` uses the running averages. `mask` marks the real examples of a padded batch, so
padding never enters the batch statistics (passed in train mode only, shaped (B, 1, ..., 1) as
`nn.BatchNorm` takes it). `ghost` normalizes each group of `group_size` consecutive examples by
the group's own statistics (ghost / virtual BN, Hoffer et al. 2017), which separates the BN
statistics batch from the optimization batch; its variables have `nn.BatchNorm`'s names
(`BatchNorm_<i>`), so a batch and a ghost model have the same variable tree. `batch_renorm` is
Batch Renormalization (Ioffe 2017, `BatchRenorm`): BN whose train-mode output is corrected
towards the running statistics by r and d, clipped to limits that a warm-up schedule relaxes
(`renorm_limits`).

`layer` and `group` normalize each example on its own (Ba et al. 2016; Wu & He 2018), with no
`batch_stats`, the same in train and eval mode (the mask and `use_running_average` are
accepted and ignored): `nn.LayerNorm` over all axes but the batch axis (the features of a
Dense layer; H, W and C of a conv map, as Wu & He define LN) with a scale and bias per channel;
`GroupNorm` (`nn.GroupNorm`'s numbers, its sums as matmuls: see there) over groups of
channels (and H, W), `min(groups, channels)` groups.
"""

import dataclasses
from typing import Mapping, Optional

import flax.linen as nn

from bn_jax import norm_modules
# The modules, importable from here as well (norms.BatchRenorm, norms.renorm_limits, ...).
from bn_jax.norm_modules import BatchRenorm
from bn_jax.norm_modules import ChannelNoise
from bn_jax.norm_modules import GhostBatchNorm
from bn_jax.norm_modules import GroupNorm
from bn_jax.norm_modules import renorm_limits

__all__ = ['BatchRenorm', 'ChannelNoise', 'GhostBatchNorm', 'GroupNorm', 'renorm_limits',
           'BN_MOMENTUM', 'BN_EPSILON', 'Norm', 'REGISTRY', 'NORMS', 'SETTINGS', 'norm_layer',
           'from_settings', 'resolve', 'normalize']

# BN's defaults everywhere in bn_jax: Keras' momentum and epsilon, as in the original study
# (Flax's nn.BatchNorm: 0.99 / 1e-5; PyTorch: momentum 0.1, i.e. 0.9 here, eps 1e-5).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


class _NormLayer:
  """Base of the norm constructors: frozen dataclasses, so equal settings compare and hash
  equal (a model holding one is a static argument of jitted functions)."""

  def replace(self, **changes):
    """This constructor with some settings changed, e.g. `replace(momentum=0.0)`."""
    names = tuple(f.name for f in dataclasses.fields(self))
    unknown = sorted(set(changes) - set(names))
    if unknown:
      raise ValueError(f'{type(self).__name__} has no setting {", ".join(unknown)} (it has '
                       f'{", ".join(names)}): replace only those.')
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class BatchNormLayer(_NormLayer):
  """Builds `nn.BatchNorm(use_running_average, momentum, epsilon, axis_name)`."""
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  axis_name: Optional[str] = None  # set for BN statistics synced across devices

  def __call__(self, use_running_average, **kwargs):
    return nn.BatchNorm(use_running_average=use_running_average, momentum=self.momentum,
                        epsilon=self.epsilon, axis_name=self.axis_name, **kwargs)


@dataclasses.dataclass(frozen=True)
class NoisyBatchNormLayer(_NormLayer):
  """`nn.BatchNorm` (as 'batch') followed by `ChannelNoise(noise)`: in training the normalized
  activations get a random mean and variance that change every step; in evaluation the
  noise's mean (scale 1 + noise / 4, shift 0)."""
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  axis_name: Optional[str] = None
  noise: float = 0.5

  def __call__(self, use_running_average, **kwargs):
    def apply(x, mask=None):
      y = nn.BatchNorm(use_running_average=use_running_average, momentum=self.momentum,
                       epsilon=self.epsilon, axis_name=self.axis_name, **kwargs)(x, mask=mask)
      return ChannelNoise(self.noise)(y, deterministic=use_running_average)
    return apply


@dataclasses.dataclass(frozen=True)
class GhostBatchNormLayer(_NormLayer):
  """Builds `GhostBatchNorm(group_size, use_running_average, momentum, epsilon)`, named as
  `nn.BatchNorm` would be in its place."""
  group_size: int = 0  # examples per ghost-BN group (> 0)
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  def __post_init__(self):
    if self.group_size <= 0:
      raise ValueError("norm='ghost' needs bn_group_size > 0, the examples per BN group "
                       f'(got group_size={self.group_size}).')

  def __call__(self, use_running_average, **kwargs):
    return norm_modules.GhostBatchNormAsBatchNorm(self.group_size, use_running_average,
                                                  self.momentum, self.epsilon, **kwargs)


@dataclasses.dataclass(frozen=True)
class BatchRenormLayer(_NormLayer):
  """Builds `BatchRenorm(use_running_average, momentum, epsilon, axis_name, rmax, dmax,
  warmup_steps, rmax_steps, dmax_steps)` (see `BatchRenorm` and `renorm_limits`)."""
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  axis_name: Optional[str] = None  # set for statistics synced across devices
  rmax: float = 3.0
  dmax: float = 5.0
  warmup_steps: int = 5000
  rmax_steps: int = 40000
  dmax_steps: int = 25000

  def __post_init__(self):
    if self.rmax < 1:
      raise ValueError(f'renorm_rmax={self.rmax} must be >= 1 (r is clipped to '
                       '[1/r_max, r_max]): set renorm_rmax >= 1.')
    if self.dmax < 0:
      raise ValueError(f'renorm_dmax={self.dmax} must be >= 0: set renorm_dmax >= 0.')
    if self.warmup_steps < 0:
      raise ValueError(f'renorm_warmup_steps={self.warmup_steps} must be >= 0: set it to the '
                       'steps of plain BN before r_max, d_max relax.')
    for name in ('rmax_steps', 'dmax_steps'):
      if getattr(self, name) < self.warmup_steps:
        raise ValueError(f'renorm_{name}={getattr(self, name)} is before the warm-up ends '
                         f'(renorm_warmup_steps={self.warmup_steps}): set it >= '
                         'renorm_warmup_steps.')

  def __call__(self, use_running_average, **kwargs):
    return BatchRenorm(use_running_average, self.momentum, self.epsilon, self.axis_name,
                       self.rmax, self.dmax, self.warmup_steps, self.rmax_steps,
                       self.dmax_steps, **kwargs)


@dataclasses.dataclass(frozen=True)
class LayerNormLayer(_NormLayer):
  """Builds `nn.LayerNorm(epsilon)` over all axes of an example (the features of a Dense
  layer; H, W, C of a conv map), with a scale and bias per channel (last axis); the mask and
  `use_running_average` are ignored (no batch statistics)."""
  epsilon: float = BN_EPSILON

  def __call__(self, use_running_average=None, **kwargs):
    del use_running_average  # the same in train and eval mode

    def apply(x, mask=None):
      del mask  # each example on its own: padding cannot leak into the others
      axes = tuple(range(1 - x.ndim, 0))  # all but the batch axis
      return nn.LayerNorm(epsilon=self.epsilon, reduction_axes=axes, feature_axes=-1,
                          **kwargs)(x)
    return apply


@dataclasses.dataclass(frozen=True)
class GroupNormLayer(_NormLayer):
  """Builds `GroupNorm(num_groups=min(groups, channels), epsilon)`: each example's
  channels (last axis) in equal groups, normalized over the group's channels and H, W; on a
  Dense layer's output the features are grouped. The mask and `use_running_average` are
  ignored (no batch statistics)."""
  groups: int = 32  # Wu & He 2018
  epsilon: float = BN_EPSILON

  def __post_init__(self):
    if self.groups <= 0:
      raise ValueError(f"norm='group' needs norm_groups > 0, the channel groups per layer "
                       f'(got groups={self.groups}).')

  def __call__(self, use_running_average=None, **kwargs):
    del use_running_average  # the same in train and eval mode

    def apply(x, mask=None):
      del mask  # each example on its own: padding cannot leak into the others
      channels = x.shape[-1]
      groups = min(self.groups, channels)
      module = GroupNorm(num_groups=groups, epsilon=self.epsilon, **kwargs)
      if channels % groups:
        layer = '/'.join(module.parent.path + (module.name,)) if module.parent else module.name
        raise ValueError(f'norm_groups={groups} must divide the {channels} channels of layer '
                         f'{layer}: choose a divisor of {channels}.')
      return module(x)
    return apply


@dataclasses.dataclass(frozen=True)
class Norm:
  """A norm kind, declared once; everything else about norms derives from `REGISTRY`.

  Attributes:
    name: its name (`norm_layer(name)`, the `norm` setting).
    layer: its constructor class (None: no norm).
    settings: constructor field -> the `settings.base_config` key it comes from; exactly
      these settings (and, with running statistics, BN's evaluation settings) enter a run's
      identity and are read only with this norm.
    running_stats: whether it keeps running averages in `batch_stats` (then `bn_stats`,
      `bn_batch_of_one`, `precise_bn_examples` and `bn_ema_bias_correction` apply).
    bn_stats: the `bn_stats` modes it supports (where its training statistics come from).
    configurable: whether `--config.norm` names it; ghost BN is `norm=batch` with
      `bn_stats=ghost`.
  """
  name: str
  layer: Optional[type] = None
  settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
  running_stats: bool = False
  bn_stats: tuple = ()
  configurable: bool = True


_BN = {'momentum': 'bn_momentum', 'epsilon': 'bn_epsilon'}
REGISTRY = {norm.name: norm for norm in (
    Norm('none'),
    Norm('batch', BatchNormLayer, _BN, True, ('sync', 'local', 'ghost')),
    Norm('ghost', GhostBatchNormLayer, {'group_size': 'bn_group_size', **_BN}, True, ('ghost',),
         configurable=False),
    Norm('batch_renorm', BatchRenormLayer, {**_BN, **{k: f'renorm_{k}' for k in (
        'rmax', 'dmax', 'warmup_steps', 'rmax_steps', 'dmax_steps')}}, True, ('sync', 'local')),
    Norm('layer', LayerNormLayer, {'epsilon': 'bn_epsilon'}),
    Norm('group', GroupNormLayer, {'groups': 'norm_groups', 'epsilon': 'bn_epsilon'}),
    Norm('noisy_batch', NoisyBatchNormLayer, {**_BN, 'noise': 'bn_noise'}, True,
         ('sync', 'local')),
)}
NORMS = tuple(REGISTRY)
# The settings some norm reads: setting -> the norms that read it.
SETTINGS = {s: tuple(n.name for n in REGISTRY.values() if s in n.settings.values())
            for n in REGISTRY.values() for s in n.settings.values()}


def norm_layer(kind, *, axis_name=None, **fields):
  """The norm constructor for `kind` (one of `NORMS`; None for 'none') from its constructor
  fields (e.g. `momentum`, `epsilon`, `group_size`, `groups`, `rmax`, `noise`: see each
  `*Layer` class); fields the kind does not have are ignored, missing ones take their
  defaults. `axis_name` syncs the statistics of the kinds that have one across devices.
  'batch' is `nn.BatchNorm`; 'ghost' `GhostBatchNorm` over groups of `group_size` > 0
  examples; 'batch_renorm' `BatchRenorm` (see `renorm_limits`); 'layer' `nn.LayerNorm` over
  each example; 'group' `nn.GroupNorm` with min(`groups`, channels) groups; 'noisy_batch'
  'batch' plus `ChannelNoise(noise)` (drawn in train mode, its mean in eval mode)."""
  if kind not in REGISTRY:
    raise ValueError(f'unknown norm {kind!r}: choose one of {NORMS}.')
  layer = REGISTRY[kind].layer
  if layer is None:
    return None
  names = {f.name for f in dataclasses.fields(layer)}
  kwargs = {k: v for k, v in fields.items() if k in names}
  if 'axis_name' in names:
    kwargs['axis_name'] = axis_name
  return layer(**kwargs)


def from_settings(kind, values, axis_name=None):
  """The norm constructor for `kind` from setting values (a config, or a dict keyed by
  `settings.base_config` names such as 'bn_momentum'); settings missing take the defaults."""
  declared = REGISTRY[kind].settings if kind in REGISTRY else {}
  return norm_layer(kind, axis_name=axis_name, **{
      field: values[setting] for field, setting in declared.items() if setting in values})


def resolve(norm):
  """A norm given by name (one of `NORMS`, with `norm_layer`'s defaults) or as a constructor
  -> the constructor (None: no norm). Models accept either: `models.MLP(norm='batch')`."""
  return norm_layer(norm) if isinstance(norm, str) else norm


def normalize(norm, x, train, mask):
  """`norm(...)(x)`, the example mask (B,) passed as (B, 1, ..., 1) bool in train mode only;
  `x` itself when `norm` is None (or 'none')."""
  norm = resolve(norm)
  if norm is None:
    return x
  if not train:
    mask = None
  elif mask is not None:  # (B,) -> broadcastable to x: (B, 1, ..., 1)
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1)).astype(bool)
  return norm(use_running_average=not train)(x, mask=mask)

