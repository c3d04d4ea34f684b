"""Flax modules for the norms Flax does not have (`bn_jax.norms` builds every norm from
these or from Flax's own): ghost BN, Batch Renormalization (Ioffe 2017) with its clip
schedule, noisy BN's channel noise (Santurkar et al. 2018), and GroupNorm with matmul sums."""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


class GhostBatchNormAsBatchNorm(GhostBatchNorm):
  """`GhostBatchNorm` that Flax auto-names like `nn.BatchNorm` (`BatchNorm_<i>`): Flax names an
  unnamed submodule after its class's `__name__`."""


GhostBatchNormAsBatchNorm.__name__ = 'BatchNorm'


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


class ChannelNoise(nn.Module):
  """Santurkar et al. 2018's "noisy BN" perturbation (their Appendix A): time-varying noise of
  non-zero mean and non-unit variance on the normalized activations,
    y = x * (a + e_a) + (b + e_b),
  per step and channel a ~ U(1, 1 + amount / 2) and b ~ U(-amount, amount), per activation
  (example, position, channel) a small jitter e_a, e_b ~ U(-jitter * amount, jitter * amount);
  amount = 0.5 (`bn_noise`'s default) gives the paper's scale U(1, 1.25) and shift
  U(-0.5, 0.5). The draws come from the 'dropout' rng stream (a fresh key every step) in
  training; in evaluation (`deterministic`) or without that rng (statistics passes) the noise's
  mean is applied: y = x * (1 + amount / 4), shift 0 (scale 1.125 at amount 0.5), the
  network the training noise averages to. amount = 0 is plain BN."""
  amount: float = 0.5
  jitter: float = 0.1  # per-activation half-width, as a fraction of `amount`

  def mean_scale(self):
    return 1.0 + self.amount / 4

  @nn.compact
  def __call__(self, x, deterministic=False):
    if deterministic or not self.has_rng('dropout'):
      return x * self.mean_scale()
    keys = jax.random.split(self.make_rng('dropout'), 3)
    channels, width = x.shape[-1:], self.jitter * self.amount
    scale = jax.random.uniform(keys[0], channels, minval=1.0, maxval=1.0 + self.amount / 2)
    shift = jax.random.uniform(keys[1], channels, minval=-self.amount, maxval=self.amount)
    if width:  # both jitters from one draw of 32 random bits per activation (the costly part)
      bits = jax.random.bits(keys[2], x.shape, jnp.uint32)
      scale = scale + _symmetric(bits >> 16, width)
      shift = shift + _symmetric(bits & 0xFFFF, width)
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _symmetric(bits16, width):
  """Uniform on (-width, width) from 16 random bits: the 65536 midpoints of equal cells."""
  return ((bits16.astype(jnp.float32) + 0.5) / 32768.0 - 1.0) * width


class GroupNorm(nn.Module):
  """`nn.GroupNorm` (same variables `scale`, `bias`; same numbers up to float32 rounding) with
  its per-group sums computed as matmuls with a channel-to-group indicator matrix.

  Why not `nn.GroupNorm` itself: on XLA's CPU backend (jax 0.10.2), a jitted gradient through
  `nn.GroupNorm` -> ReLU -> 2x2 max-pool -> Dense -> ReLU -> Dense returned NaN for whole
  channel groups in some shapes (8 channels in 4 or 2 groups, 64 in 16), finite without jit
  or with `--xla_cpu_use_fusion_emitters=false`: a miscompiled reduction fusion. Matmul sums
  avoid that fusion (tests/test_layer_group_norms.py checks the gradient in those shapes).
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
