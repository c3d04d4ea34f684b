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

The CNN and the ResNet take their convolution as a module constructor (`conv`, Flax's
`ModuleDef` pattern); `create_model` picks it by backend (`convs.conv_layer`: on CPU, forms
whose gradients stay fast inside the training loop).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax import convs
from bn_jax import norms
from bn_jax import resnet

ModuleDef = Any

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
  conv: ModuleDef = nn.Conv  # the conv constructor (`create_model` picks one by backend)
  dtype: Any = jnp.float32  # compute dtype of convs and Dense layers (params stay float32)
  dense_norm: bool = False  # also normalize the hidden Dense layer (its bias then dropped)

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    init, out_init = _inits(self.init_scale, self.init_std)
    x = x.astype(self.dtype)
    for i, width in enumerate(self.features):
      x = self.conv(width, (3, 3), use_bias=norms.resolve(self.norm) is None, kernel_init=init,
                    dtype=self.dtype)(x)
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
CPU_CONVS = {'cnn': 'patches', 'resnet': 'forward'}  # `conv='auto'` on CPU (docs/speed.md)


def min_image_size(model):
  """The smallest height and width `model` (a module) takes: the CNN's 2x2 max-pools round
  down, so its `pools` pooled blocks need 2^pools pixels to leave one; the MLP and the ResNet
  (padded convolutions, strided ones too, then a global average pool) take any size."""
  if isinstance(model, CNN):
    return 2 ** min(model.pools, len(model.features))
  return 1


def create_model(name='mlp', *, norm='batch', bn_axis_name=None, conv='auto', **kwargs):
  """Builds a model by name ('mlp', 'cnn' or 'resnet') normalized by `norm`: a constructor,
  or one of `norms.NORMS` built from the norm settings among `kwargs` (named as in
  `settings.base_config`: `bn_momentum`, `bn_epsilon`, `bn_group_size`, `norm_groups`,
  `renorm_*`, `bn_noise`; `norms.REGISTRY` says which norm reads which), its statistics synced
  over `bn_axis_name`. The CNN's and ResNet's `conv`: a constructor, or a name of
  `convs.NAMES` ('auto': `CPU_CONVS` on CPU, else XLA's). The other `kwargs` override the
  model's fields."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}: choose one of {tuple(MODELS)}.')
  values = {k: kwargs.pop(k) for k in list(kwargs) if k in norms.SETTINGS}
  layer = (norms.from_settings(norm, values, bn_axis_name) if isinstance(norm, str) else norm)
  if name in CPU_CONVS:
    kwargs['conv'] = convs.conv_layer(conv, CPU_CONVS[name]) if isinstance(conv, str) else conv
  return MODELS[name](norm=layer, **kwargs)


def _activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}: choose one of {tuple(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def num_params(params):
  """Total number of scalars in a parameter tree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
