"""Flax linen models that receive their normalization as a norm constructor.

`MLP(norm=...)` and `CNN(norm=...)` take `norm`, a callable that builds a norm module,
`norm(use_running_average=not train)(x, mask=...)`, as Flax's examples/imagenet passes
`partial(nn.BatchNorm, ...)`; `None` means no normalization (the layer before keeps its bias).
`norm_layer(kind, ...)` is the one place that turns the setting `'none' | 'batch' | 'ghost'`
into that constructor; its constructors compare and hash equal for equal settings (models are
static arguments of jitted functions) and change settings with `.replace(momentum=0.0)`.
`create_model(name, norm=..., bn_momentum=..., ...)` builds a model by name from the settings.

BatchNorm keeps its running mean and variance in the mutable `batch_stats` collection:
`train=True` normalizes with the batch's statistics and updates the running averages,
`train=False` uses the running averages. `mask` marks the real examples of a padded batch, so
padding never enters the batch statistics (the models pass it to the norm in train mode only,
shaped (B, 1, ..., 1) as `nn.BatchNorm` takes it). `ghost` normalizes each group of
`group_size` consecutive examples by the group's own statistics (ghost / virtual BN, Hoffer et
al. 2017), which separates the BN statistics batch from the optimization batch. Its variables
have `nn.BatchNorm`'s names (`BatchNorm_<i>`: params scale/bias, batch_stats mean/var), so a
batch and a ghost model have the same variable tree.

The CNN's 3x3 convolutions are `nn.Conv` layers computed as patches x kernel matmuls on CPU
(`patch_conv`): XLA's CPU convolutions are ~17x slower inside a loop body (the `lax.scan` of
`train_chunk`; jax-ml/jax#12868) because their gradients stay in non-canonical layouts there.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NORMS = ('none', 'batch', 'ghost')
ACTIVATIONS = {'relu': nn.relu, 'sigmoid': nn.sigmoid, 'tanh': nn.tanh, 'gelu': nn.gelu}


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


class _NormLayer:
  """Base of the norm constructors: frozen dataclasses, so equal settings compare and hash
  equal (a model holding one is a static argument of jitted functions)."""

  def replace(self, **changes):
    """This constructor with some settings changed, e.g. `replace(momentum=0.0)`."""
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


def norm_layer(kind, *, momentum=0.99, epsilon=1e-3, axis_name=None, group_size=0):
  """The norm constructor for `kind` ('none' | 'batch' | 'ghost'): None for 'none'.

  'batch' is `nn.BatchNorm` with statistics synced over `axis_name` when set (`group_size` is
  unused); 'ghost' is `GhostBatchNorm` over groups of `group_size` > 0 examples (its
  statistics are each device's own: `axis_name` is unused).
  """
  if kind == 'none':
    return None
  if kind == 'batch':
    return BatchNormLayer(momentum, epsilon, axis_name)
  if kind == 'ghost':
    return GhostBatchNormLayer(group_size, momentum, epsilon)
  raise ValueError(f'unknown norm {kind!r}: choose one of {NORMS}.')


def _normalize(norm, x, train, mask):
  """`norm(...)(x)`, the example mask (B,) passed as (B, 1, ..., 1) bool in train mode only;
  `x` itself when `norm` is None."""
  if norm is None:
    return x
  if not train:
    mask = None
  elif mask is not None:  # (B,) -> broadcastable to x: (B, 1, ..., 1)
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1)).astype(bool)
  return norm(use_running_average=not train)(x, mask=mask)


class MLP(nn.Module):
  """Flatten -> [Dense(h) -> norm -> activation -> Dropout] per hidden layer -> Dense(classes)."""
  hidden: Sequence[int] = (128,)
  num_classes: int = 10
  norm: Optional[Callable] = None  # a norm constructor (see norm_layer); None: no norm
  dropout: float = 0.2
  activation: str = 'relu'
  init_scale: float = 1.0  # hidden weights at init: this times LeCun-normal

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    init = nn.initializers.variance_scaling(self.init_scale**2, 'fan_in', 'truncated_normal')
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      # No bias before BN: BN subtracts it again, so its gradient is rounding noise, which
      # Adam would blow up into random steps (the original Keras model had the redundant bias).
      x = nn.Dense(width, use_bias=self.norm is None, kernel_init=init)(x)
      x = _normalize(self.norm, x, train, mask)
      x = act(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for what `nn.Conv` passes (NHWC inputs, HWIO kernel), as one
  matmul of the kernel with the stacked shifted copies of the input (im2col). Its gradients
  are matmuls and pads, fast on CPU also inside `lax.scan`; strided, dilated or grouped
  convolutions fall back to `lax.conv_general_dilated`."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and set(window_strides) == {1} and
           all(d is None or set(d) == {1} for d in (lhs_dilation, rhs_dilation)))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  kh, kw, cin, cout = rhs.shape
  if padding == 'SAME':
    padding = [((k - 1) // 2, k // 2) for k in (kh, kw)]
  elif padding == 'VALID':
    padding = [(0, 0), (0, 0)]
  x = jnp.pad(lhs, [(0, 0), *padding, (0, 0)])
  height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate([x[:, i:i + height, j:j + width] for i in range(kh)
                             for j in range(kw)], axis=-1)  # (B, H, W, kh*kw*cin)
  # A 2-D matmul: with a 4-D dot_general the CNN's scanned step was ~50% slower on CPU.
  out = jnp.dot(patches.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                precision=precision)
  return out.reshape(patches.shape[:3] + (cout,))


def max_pool_2x2(x):
  """2x2 max-pool, stride 2 (a reshape and a max: its gradient is cheaper on CPU than
  `nn.max_pool`'s select-and-scatter)."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
  """Conv(3x3) -> norm -> activation per entry of `features`, the first `pools` blocks ending in
  a 2x2 max-pool; then Dense -> activation -> Dropout -> Dense. The default is two blocks."""
  features: Sequence[int] = (32, 64)
  pools: int = 2
  dense: int = 128
  num_classes: int = 10
  norm: Optional[Callable] = None  # a norm constructor (see norm_layer); None: no norm
  dropout: float = 0.2
  activation: str = 'relu'
  init_scale: float = 1.0  # conv and hidden Dense weights at init: this times LeCun-normal
  conv: str = 'auto'  # 'patches' (patch_conv) | 'xla' | 'auto': patches on CPU, else xla

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    init = nn.initializers.variance_scaling(self.init_scale**2, 'fan_in', 'truncated_normal')
    if self.conv not in ('auto', 'patches', 'xla'):
      raise ValueError(f"unknown conv {self.conv!r}: choose 'auto', 'patches' or 'xla'.")
    patches = self.conv == 'patches' or (self.conv == 'auto' and jax.default_backend() == 'cpu')
    conv = patch_conv if patches else None  # None: nn.Conv's own lax.conv_general_dilated
    for i, width in enumerate(self.features):
      x = nn.Conv(width, (3, 3), use_bias=self.norm is None, kernel_init=init,
                  conv_general_dilated=conv)(x)
      x = _normalize(self.norm, x, train, mask)  # BN on conv maps: statistics per channel
      x = act(x)
      if i < self.pools:
        x = max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(self.dense, kernel_init=init)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


MODELS = {'mlp': MLP, 'cnn': CNN}


def create_model(name='mlp', *, norm='batch', bn_momentum=0.99, bn_epsilon=1e-3,
                 bn_axis_name=None, bn_group_size=0, **kwargs):
  """Builds a model by name ('mlp' or 'cnn') normalized by `norm_layer(norm, ...)` ('none' |
  'batch' | 'ghost'), with keyword overrides of its other fields."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}: choose one of {tuple(MODELS)}.')
  layer = norm_layer(norm, momentum=bn_momentum, epsilon=bn_epsilon, axis_name=bn_axis_name,
                     group_size=bn_group_size)
  return MODELS[name](norm=layer, **kwargs)


def _activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}: choose one of {tuple(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def num_params(params):
  """Total number of scalars in a parameter tree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
