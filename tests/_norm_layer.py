"""What the norm tests share: one norm layer as a module, and a small hand-made batch."""

from typing import Callable

import flax.linen as nn
import numpy as np

from bn_jax import norms

X = np.array([[1., 2., -1.], [3., 0., -1.], [5., 4., -1.], [7., 2., 3.]], np.float32)


class NormLayer(nn.Module):
  """One norm layer, called as the models call it (mask in train mode only)."""
  norm: Callable

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    return norms.normalize(self.norm, x, train, mask)
