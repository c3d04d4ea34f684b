"""Flax linen models whose normalization is a switch: `norm='none' | 'batch'`.

BatchNorm keeps its running mean and variance in the mutable `batch_stats` collection:
`train=True` normalizes with the batch's statistics and updates the running averages,
`train=False` uses the running averages. `mask` marks the real examples of a padded batch, so
padding never enters the batch statistics.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ('none', 'batch')
ACTIVATIONS = {'relu': nn.relu, 'sigmoid': nn.sigmoid, 'tanh': nn.tanh, 'gelu': nn.gelu}


class Norm(nn.Module):
  """Identity for `norm='none'`, `nn.BatchNorm` for `norm='batch'`."""
  norm: str = 'batch'
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[str] = None  # set for BN statistics synced across devices

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    if self.norm == 'none':
      return x
    if self.norm != 'batch':
      raise ValueError(f'unknown norm {self.norm!r}: choose one of {NORMS}.')
    if mask is not None:  # (B,) -> broadcastable to x: (B, 1, ..., 1)
      mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1)).astype(bool)
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                        epsilon=self.epsilon, axis_name=self.axis_name,
                        name='BatchNorm')(x, mask=mask if train else None)


class MLP(nn.Module):
  """Flatten -> [Dense(h) -> norm -> activation -> Dropout] per hidden layer -> Dense(classes)."""
  hidden: Sequence[int] = (128,)
  num_classes: int = 10
  norm: str = 'batch'
  dropout: float = 0.2
  activation: str = 'relu'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      # No bias before BN: BN subtracts it again, so its gradient is rounding noise, which
      # Adam would blow up into random steps (the original Keras model had the redundant bias).
      x = nn.Dense(width, use_bias=self.norm == 'none')(x)
      x = Norm(self.norm, self.bn_momentum, self.bn_epsilon, self.bn_axis_name)(
          x, train=train, mask=mask)
      x = act(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Two blocks of Conv(3x3) -> norm -> activation -> max-pool, then Dense -> Dropout -> Dense."""
  features: Sequence[int] = (32, 64)
  dense: int = 128
  num_classes: int = 10
  norm: str = 'batch'
  dropout: float = 0.2
  activation: str = 'relu'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    act = _activation(self.activation)
    for width in self.features:
      x = nn.Conv(width, (3, 3), use_bias=self.norm == 'none')(x)
      x = Norm(self.norm, self.bn_momentum, self.bn_epsilon, self.bn_axis_name)(
          x, train=train, mask=mask)  # BN on conv maps: statistics per channel
      x = nn.max_pool(act(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(self.dense)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


MODELS = {'mlp': MLP, 'cnn': CNN}


def create_model(name='mlp', **kwargs):
  """Builds a model by name ('mlp' or 'cnn') with keyword overrides."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}: choose one of {tuple(MODELS)}.')
  if kwargs.get('norm', 'batch') not in NORMS:
    raise ValueError(f'unknown norm {kwargs["norm"]!r}: choose one of {NORMS}.')
  return MODELS[name](**kwargs)


def _activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}: choose one of {tuple(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def num_params(params):
  """Total number of scalars in a parameter tree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
