"""Flax linen models that receive their normalization as a norm constructor.

`MLP(norm=...)` and `CNN(norm=...)` take `norm`, a constructor from `norms.norm_layer` (or
any callable building a norm module, e.g. `partial(nn.BatchNorm, ...)`); `None` means no
normalization (the layer before it then keeps its bias). `create_model(name, norm=...,
bn_momentum=..., ...)` builds a model by name from the settings. The norms themselves are in
`bn_jax/norms.py` (their names are also importable from here).

Mixed precision (`dtype=jnp.bfloat16`, as Flax's examples/imagenet): convolutions and Dense
layers compute in bfloat16 while their parameters stay float32; the norms compute in float32
(their output is promoted to their float32 parameters' dtype, and Flax reduces batch
statistics in float32), and the logits are float32 for the loss.

The CNN's 3x3 convolutions are `nn.Conv` layers computed as patches x kernel matmuls on CPU
(`patch_conv`): XLA's CPU convolutions are ~17x slower inside a loop body (the `lax.fori_loop` of
`train_chunk`; jax-ml/jax#12868) because their gradients stay in non-canonical layouts there.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import norms
from bn_jax import resnet

ACTIVATIONS = {'relu': nn.relu, 'sigmoid': nn.sigmoid, 'tanh': nn.tanh, 'gelu': nn.gelu}


class MLP(nn.Module):
  """Flatten -> [Dense(h) -> norm -> activation -> Dropout] per hidden layer -> Dense(classes)."""
  hidden: Sequence[int] = (128,)
  num_classes: int = 10
  norm: Optional[Callable] = None  # a norm constructor (see norms.norm_layer); None: no norm
  dropout: float = 0.2
  activation: str = 'relu'
  init_scale: float = 1.0  # hidden weights at init: this times LeCun-normal
  init_std: float = 0.0  # > 0: every Dense kernel N(0, init_std^2) instead (Ioffe 2015)
  dtype: Any = jnp.float32  # compute dtype of the Dense layers (params stay float32)

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    init, out_init = _inits(self.init_scale, self.init_std)
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for width in self.hidden:
      # No bias before BN: BN subtracts it again, so its gradient is rounding noise, which
      # Adam would blow up into random steps (the original Keras model had the redundant bias).
      x = nn.Dense(width, use_bias=norms.resolve(self.norm) is None, kernel_init=init,
                   dtype=self.dtype)(x)
      x = norms.normalize(self.norm, x, train, mask)
      # Each hidden layer's activation inputs, kept only when asked for (mutable=['intermediates'],
      # `papers.preactivations`), e.g. Ioffe & Szegedy's sigmoid-input percentiles.
      self.sow('intermediates', 'preactivations', x)
      x = act(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=out_init,
                    dtype=self.dtype)(x).astype(jnp.float32)


def _inits(init_scale, init_std):
  """Kernel initializers (hidden, output): N(0, init_std^2) for both when init_std > 0, else
  init_scale times LeCun-normal (truncated) and Flax's default LeCun-normal."""
  if init_std:
    return nn.initializers.normal(init_std), nn.initializers.normal(init_std)
  return (nn.initializers.variance_scaling(init_scale**2, 'fan_in', 'truncated_normal'),
          nn.linear.default_kernel_init)


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for what `nn.Conv` passes (NHWC inputs, HWIO kernel), as one
  matmul of the kernel with the stacked shifted copies of the input (im2col). Its gradients
  are matmuls and pads, fast on CPU also inside the training loop; strided, dilated or grouped
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
  # A 2-D matmul: with a 4-D dot_general the CNN's in-loop step was ~50% slower on CPU.
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
  a 2x2 max-pool; then Dense -> activation -> Dropout -> Dense (with `dense_norm`, Dense -> norm
  -> activation: the hidden Dense layer normalized too). The default is two blocks."""
  features: Sequence[int] = (32, 64)
  pools: int = 2
  dense: int = 128
  num_classes: int = 10
  norm: Optional[Callable] = None  # a norm constructor (see norms.norm_layer); None: no norm
  dropout: float = 0.2
  activation: str = 'relu'
  init_scale: float = 1.0  # conv and hidden Dense weights at init: this times LeCun-normal
  init_std: float = 0.0  # > 0: every conv and Dense kernel N(0, init_std^2) instead
  conv: str = 'auto'  # 'patches' (patch_conv) | 'xla' | 'auto': patches on CPU, else xla
  dtype: Any = jnp.float32  # compute dtype of convs and Dense layers (params stay float32)
  dense_norm: bool = False  # also normalize the hidden Dense layer (its bias then dropped)

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    init, out_init = _inits(self.init_scale, self.init_std)
    if self.conv not in ('auto', 'patches', 'xla'):
      raise ValueError(f"unknown conv {self.conv!r}: choose 'auto', 'patches' or 'xla'.")
    patches = self.conv == 'patches' or (self.conv == 'auto' and jax.default_backend() == 'cpu')
    conv = patch_conv if patches else None  # None: nn.Conv's own lax.conv_general_dilated
    x = x.astype(self.dtype)
    for i, width in enumerate(self.features):
      x = nn.Conv(width, (3, 3), use_bias=norms.resolve(self.norm) is None, kernel_init=init,
                  conv_general_dilated=conv, dtype=self.dtype)(x)
      x = norms.normalize(self.norm, x, train, mask)  # BN on conv maps: statistics per channel
      x = act(x)
      if i < self.pools:
        x = max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    normed = self.dense_norm and norms.resolve(self.norm) is not None
    x = nn.Dense(self.dense, use_bias=not normed, kernel_init=init, dtype=self.dtype)(x)
    if normed:
      x = norms.normalize(self.norm, x, train, mask)
    x = act(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=out_init,
                    dtype=self.dtype)(x).astype(jnp.float32)


MODELS = {'mlp': MLP, 'cnn': CNN, 'resnet': resnet.ResNet}


def min_image_size(model):
  """The smallest height and width `model` (a module) takes: the CNN's 2x2 max-pools round
  down, so its `pools` pooled blocks need 2^pools pixels to leave one; the MLP and the ResNet
  (padded convolutions, strided ones too, then a global average pool) take any size."""
  if isinstance(model, CNN):
    return 2 ** min(model.pools, len(model.features))
  return 1


def create_model(name='mlp', *, norm='batch', bn_axis_name=None, **kwargs):
  """Builds a model by name ('mlp', 'cnn' or 'resnet') normalized by `norm`: a constructor,
  or one of `norms.NORMS` built from the norm settings among `kwargs` (named as in
  `settings.base_config`: `bn_momentum`, `bn_epsilon`, `bn_group_size`, `norm_groups`,
  `renorm_*`, `bn_noise`; `norms.REGISTRY` says which norm reads which), its statistics synced
  over `bn_axis_name`; the other `kwargs` override the model's fields."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}: choose one of {tuple(MODELS)}.')
  values = {k: kwargs.pop(k) for k in list(kwargs) if k in norms.SETTINGS}
  layer = (norms.from_settings(norm, values, bn_axis_name) if isinstance(norm, str) else norm)
  return MODELS[name](norm=layer, **kwargs)


def _activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}: choose one of {tuple(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def num_params(params):
  """Total number of scalars in a parameter tree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
