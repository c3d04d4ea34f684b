"""Normalization layers and their constructors: the one place that turns the `norm` setting
into what the models call.

A norm constructor builds a norm module, `norm(use_running_average=not train)(x, mask=...)`,
as Flax's examples/imagenet passes `partial(nn.BatchNorm, ...)`. `norm_layer(kind, ...)` makes
one for each kind in `NORMS` (None for 'none'); constructors compare and hash equal for equal
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
from typing import Optional

import flax.linen as nn

from bn_jax import norm_modules
# The modules, importable from here as well (norms.BatchRenorm, norms.renorm_limits, ...).
from bn_jax.norm_modules import BatchRenorm
from bn_jax.norm_modules import ChannelNoise
from bn_jax.norm_modules import GhostBatchNorm
from bn_jax.norm_modules import GroupNorm
from bn_jax.norm_modules import renorm_limits

__all__ = ['BatchRenorm', 'ChannelNoise', 'GhostBatchNorm', 'GroupNorm', 'renorm_limits',
           'NORMS', 'norm_layer', 'normalize']

NORMS = ('none', 'batch', 'ghost', 'batch_renorm', 'layer', 'group', 'noisy_batch')


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
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[str] = None  # set for BN statistics synced across devices

  def __call__(self, use_running_average, **kwargs):
    return nn.BatchNorm(use_running_average=use_running_average, momentum=self.momentum,
                        epsilon=self.epsilon, axis_name=self.axis_name, **kwargs)


@dataclasses.dataclass(frozen=True)
class NoisyBatchNormLayer(_NormLayer):
  """`nn.BatchNorm` (as 'batch') followed in train mode by `ChannelNoise(noise)`: the
  normalized activations get a random mean and variance that change every step."""
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[str] = None
  noise: float = 1.0

  def __call__(self, use_running_average, **kwargs):
    def apply(x, mask=None):
      y = nn.BatchNorm(use_running_average=use_running_average, momentum=self.momentum,
                       epsilon=self.epsilon, axis_name=self.axis_name, **kwargs)(x, mask=mask)
      return y if use_running_average else ChannelNoise(self.noise)(y)
    return apply


@dataclasses.dataclass(frozen=True)
class GhostBatchNormLayer(_NormLayer):
  """Builds `GhostBatchNorm(group_size, use_running_average, momentum, epsilon)`, named as
  `nn.BatchNorm` would be in its place."""
  group_size: int  # examples per ghost-BN group
  momentum: float = 0.99
  epsilon: float = 1e-3

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
  momentum: float = 0.99
  epsilon: float = 1e-3
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
  epsilon: float = 1e-3

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
  epsilon: float = 1e-3

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


def norm_layer(kind, *, momentum=0.99, epsilon=1e-3, axis_name=None, group_size=0, groups=32,
               rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000,
               noise=1.0):
  """The norm constructor for `kind` (one of `NORMS`): None for 'none'.

  'batch' is `nn.BatchNorm` with statistics synced over `axis_name` when set; 'ghost' is
  `GhostBatchNorm` over groups of `group_size` > 0 examples (its statistics are each device's
  own: `axis_name` is unused); 'batch_renorm' is `BatchRenorm` with `momentum`, `axis_name`
  and the clip schedule `rmax`, `dmax`, `warmup_steps`, `rmax_steps`, `dmax_steps` (see
  `renorm_limits`); 'layer' is `nn.LayerNorm` over each example; 'group' is `nn.GroupNorm` with
  min(`groups`, channels) groups; 'noisy_batch' is 'batch' plus `ChannelNoise(noise)` in train
  mode. `epsilon` is every kind's; the other arguments are unused by
  the kinds they do not name.
  """
  if kind == 'none':
    return None
  if kind == 'batch':
    return BatchNormLayer(momentum, epsilon, axis_name)
  if kind == 'ghost':
    return GhostBatchNormLayer(group_size, momentum, epsilon)
  if kind == 'batch_renorm':
    return BatchRenormLayer(momentum, epsilon, axis_name, rmax, dmax, warmup_steps, rmax_steps,
                            dmax_steps)
  if kind == 'noisy_batch':
    return NoisyBatchNormLayer(momentum, epsilon, axis_name, noise)
  if kind == 'layer':
    return LayerNormLayer(epsilon)
  if kind == 'group':
    return GroupNormLayer(groups, epsilon)
  raise ValueError(f'unknown norm {kind!r}: choose one of {NORMS}.')


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

