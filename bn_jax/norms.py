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
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NORMS = ('none', 'batch', 'ghost', 'batch_renorm', 'layer', 'group', 'noisy_batch')


class GhostBatchNorm(nn.Module):
  """BatchNorm whose training statistics come from groups of `group_size` examples.

  Variables are named as in `nn.BatchNorm` (params scale/bias, batch_stats mean/var); the
  running averages move towards the mean over (non-empty) groups of the group statistics.
  With one group per batch it computes what `nn.BatchNorm` computes.
  """
  group_size: int
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x, mask=None):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      return (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon) * scale + bias

    batch, size = x.shape[0], self.group_size
    if size <= 0 or batch % size:
      raise ValueError(f'bn_group_size={size} must divide the batch of {batch} examples '
                       '(per device): choose a divisor of the batch size.')
    groups = x.reshape((batch // size, size) + x.shape[1:])  # (groups, G, ..., features)
    axes = tuple(range(1, groups.ndim - 1))  # within a group: examples (and pixels)
    m = jnp.ones((batch,), x.dtype) if mask is None else mask.astype(x.dtype)
    m = m.reshape((batch // size, size) + (1,) * (x.ndim - 1))
    count = jnp.sum(jnp.broadcast_to(m, groups.shape[:-1] + (1,)), axes, keepdims=True)
    mean = jnp.sum(groups * m, axes, keepdims=True) / jnp.maximum(count, 1.0)
    mean2 = jnp.sum(groups**2 * m, axes, keepdims=True) / jnp.maximum(count, 1.0)
    var = jnp.maximum(0.0, mean2 - mean**2)  # E[x^2] - E[x]^2, as nn.BatchNorm computes it
    y = (groups - mean) * jax.lax.rsqrt(var + self.epsilon)
    if not self.is_initializing():
      weight = (count > 0) / jnp.maximum(jnp.sum(count > 0), 1)  # average non-empty groups
      batch_mean = jnp.sum(mean * weight, range(groups.ndim - 1))
      batch_var = jnp.sum(var * weight, range(groups.ndim - 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch_mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch_var
    return y.reshape(x.shape) * scale + bias


class _GhostBatchNormAsBatchNorm(GhostBatchNorm):
  """`GhostBatchNorm` that Flax auto-names like `nn.BatchNorm` (`BatchNorm_<i>`): Flax names an
  unnamed submodule after its class's `__name__`."""


_GhostBatchNormAsBatchNorm.__name__ = 'BatchNorm'


def renorm_limits(steps, *, rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000,
                  dmax_steps=25000):
  """Batch Renorm's clip limits (r_max, d_max) after `steps` train-mode steps.

  (1, 0), i.e. plain BN, while steps <= warmup_steps; then linear in the step to (rmax, dmax),
  reached at step rmax_steps and dmax_steps and kept from then on:
    r_max = 1 + (rmax - 1) * clip((steps - warmup_steps) / (rmax_steps - warmup_steps), 0, 1),
    d_max = dmax * clip((steps - warmup_steps) / (dmax_steps - warmup_steps), 0, 1);
  a limit whose end step is <= warmup_steps jumps to its final value at warmup_steps. Ioffe
  2017 (the defaults): 5k steps of BN, r_max = 3 by 40k steps and d_max = 5 by 25k.
  """
  steps = jnp.asarray(steps, jnp.float32)

  def ramp(end):  # 0 -> 1 from warmup_steps to end
    if end <= warmup_steps:
      return (steps >= warmup_steps).astype(jnp.float32)
    return jnp.clip((steps - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

  return 1.0 + (rmax - 1.0) * ramp(rmax_steps), dmax * ramp(dmax_steps)


def _batch_moments(x, mask, axis_name):
  """Mean and biased variance per feature (last axis) over the other axes of the real
  (mask) examples, synced over `axis_name`: what `nn.BatchNorm` computes (E[x^2] - E[x]^2 in
  float32, one pmean of the per-device means)."""
  x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
  axes = tuple(range(x.ndim - 1))
  where = None if mask is None else jnp.asarray(mask, bool)
  mean, mean2 = x.mean(axes, where=where), (x * x).mean(axes, where=where)
  if axis_name is not None:
    mean, mean2 = lax.pmean(jnp.stack([mean, mean2]), axis_name)
  return mean, jnp.maximum(0.0, mean2 - mean**2)


class BatchRenorm(nn.Module):
  """Batch Renormalization (Ioffe 2017): BN whose training output is corrected towards the
  running statistics, so that training and inference normalize alike.

  Train mode, with the batch's mean mu_B and sigma_B = sqrt(var_B + epsilon) (padding left out
  by `mask`, synced over `axis_name` when set) and the running mu, sigma = sqrt(var + epsilon):
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max)),
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max)),
    y = scale * ((x - mu_B) / sigma_B * r + d) + bias;
  then, r and d computed from the old values, the running mean and var move towards mu_B and
  var_B as EMAs and `steps` counts one more step. (r_max, d_max) = `renorm_limits(steps, ...)`
  of the steps before this one. With r_max = 1 and d_max = 0 this is `nn.BatchNorm`. Eval mode
  normalizes with the running averages, as BN does. r and d are sown into 'intermediates'.

  Attributes:
    use_running_average: eval mode: normalize with the running averages, update nothing.
    momentum: decay of the running averages' EMA (`nn.BatchNorm`'s meaning).
    epsilon: added to the variances.
    axis_name: device axis over which the batch moments are averaged (None: this device's).
    rmax: final r_max (>= 1); dmax: final d_max (>= 0).
    warmup_steps: steps of plain BN (r_max = 1, d_max = 0) before the limits relax.
    rmax_steps, dmax_steps: the step at which r_max, d_max reach rmax, dmax.
    scale_init, bias_init: initializers of the params `scale` and `bias`.

  Variables: params scale, bias; batch_stats mean, var (as `nn.BatchNorm`) and steps (float32,
  the train-mode steps so far).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[str] = None
  rmax: float = 3.0
  dmax: float = 5.0
  warmup_steps: int = 5000
  rmax_steps: int = 40000
  dmax_steps: int = 25000
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, mask=None):
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,))
    bias = self.param('bias', self.bias_init, (features,))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    steps = self.variable('batch_stats', 'steps', jnp.zeros, (), jnp.float32)
    if self.use_running_average:
      return (x - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon) * scale + bias

    mean, var = _batch_moments(x, mask, self.axis_name)
    std, ra_std = jnp.sqrt(var + self.epsilon), jnp.sqrt(ra_var.value + self.epsilon)
    r_max, d_max = renorm_limits(steps.value, rmax=self.rmax, dmax=self.dmax,
                                 warmup_steps=self.warmup_steps, rmax_steps=self.rmax_steps,
                                 dmax_steps=self.dmax_steps)
    r = lax.stop_gradient(jnp.clip(std / ra_std, 1.0 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip((mean - ra_mean.value) / ra_std, -d_max, d_max))
    self.sow('intermediates', 'r', r)
    self.sow('intermediates', 'd', d)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
      steps.value = steps.value + 1
    return ((x - mean) / std * r + d) * scale + bias


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


class ChannelNoise(nn.Module):
  """Santurkar et al. 2018's "noisy BN" perturbation: y = x * a + b with, per step and per
  channel, a ~ U(1, 1 + amount) and b ~ U(-amount, amount), drawn from the 'dropout' rng
  stream (a fresh key every step); the identity when no such rng is given (evaluation,
  statistics passes). amount = 0 gives a = 1, b = 0: plain BN."""
  amount: float

  @nn.compact
  def __call__(self, x):
    if not self.has_rng('dropout'):
      return x
    scale_key, shift_key = jax.random.split(self.make_rng('dropout'))
    channels = x.shape[-1:]
    scale = jax.random.uniform(scale_key, channels, minval=1.0, maxval=1.0 + self.amount)
    shift = jax.random.uniform(shift_key, channels, minval=-self.amount, maxval=self.amount)
    return x * scale + shift


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
    return _GhostBatchNormAsBatchNorm(self.group_size, use_running_average, self.momentum,
                                      self.epsilon, **kwargs)


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


class GroupNorm(nn.Module):
  """`nn.GroupNorm` (same variables `scale`, `bias`; same numbers up to float32 rounding) with
  its per-group sums computed as matmuls with a channel-to-group indicator matrix.

  Why not `nn.GroupNorm` itself: on XLA's CPU backend (jax 0.10.2), a jitted gradient through
  `nn.GroupNorm` -> ReLU -> 2x2 max-pool -> Dense -> ReLU -> Dense returned NaN for whole
  channel groups in some shapes (8 channels in 4 or 2 groups, 64 in 16), finite without jit
  or with `--xla_cpu_use_fusion_emitters=false`: a miscompiled reduction fusion. Matmul sums
  avoid that fusion (tests/test_norms.py checks the gradient in those shapes).
  """
  num_groups: int = 32
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    flat = x.reshape(x.shape[0], -1, channels).astype(jnp.float32)  # (B, H*W, C)
    member = (jnp.arange(channels)[:, None] // (channels // self.num_groups) ==
              jnp.arange(self.num_groups)[None, :]).astype(jnp.float32)  # (C, G)
    count = flat.shape[1] * (channels // self.num_groups)
    mean = jnp.einsum('bnc,cg->bg', flat, member) / count
    centered = flat - (mean @ member.T)[:, None, :]
    var = jnp.einsum('bnc,cg->bg', centered * centered, member) / count
    inv = (lax.rsqrt(var + self.epsilon) @ member.T)[:, None, :]
    return (centered * inv * scale + bias).reshape(x.shape)


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


def normalize(norm, x, train, mask):
  """`norm(...)(x)`, the example mask (B,) passed as (B, 1, ..., 1) bool in train mode only;
  `x` itself when `norm` is None."""
  if norm is None:
    return x
  if not train:
    mask = None
  elif mask is not None:  # (B,) -> broadcastable to x: (B, 1, ..., 1)
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1)).astype(bool)
  return norm(use_running_average=not train)(x, mask=mask)

