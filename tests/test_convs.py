"""The conv layers of `bn_jax.convs`: the CPU forms against XLA's convolution, values and
gradients, and the choice by name and backend."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bn_jax import convs

DIMS = ('NHWC', 'HWIO', 'NHWC')


def _close(got, want):
  """Float32 sums in another order differ by rounding relative to the result's scale: the
  absolute tolerance is 1e-5 of the largest entry (as on any x86-64 CPU)."""
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_patch_conv_of_ones_counts_the_pixels_under_the_kernel():
  # A 3x3 all-ones kernel over an all-ones image, SAME padding: 9 inside, 6 on edges, 4 at
  # corners; VALID: 9 everywhere, 2 pixels smaller.
  x, w = jnp.ones((1, 5, 4, 1)), jnp.ones((3, 3, 1, 1))
  expected = np.full((5, 4), 9.0)
  expected[[0, -1], :] = 6
  expected[:, [0, -1]] = 6
  expected[[0, 0, -1, -1], [0, -1, 0, -1]] = 4
  same = convs.patch_conv(x, w, (1, 1), 'SAME')
  np.testing.assert_array_equal(same[0, :, :, 0], expected)
  np.testing.assert_array_equal(convs.patch_conv(x, w, (1, 1), 'VALID'), np.full((1, 3, 2, 1), 9))
  # Stride 2 keeps every other window: a 1x1 kernel of ones picks pixels (0, 0), (0, 2), ...
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  strided = convs.patch_conv(x, jnp.ones((1, 1, 1, 1)), (2, 2), 'VALID', dimension_numbers=DIMS)
  np.testing.assert_array_equal(strided[0, :, :, 0], [[0, 2], [8, 10]])


@pytest.mark.parametrize('strides', [(2, 2), (1, 1), (2, 1)])
@pytest.mark.parametrize('size,padding', [(8, ((1, 1), (1, 1))), (7, ((1, 1), (1, 1))),
                                          (8, 'SAME'), (7, 'SAME'), (9, 'VALID'),
                                          (8, ((0, 2), (1, 0)))])
@pytest.mark.slow
def test_patch_conv_equals_lax_with_gradients(size, padding, strides):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, size, size, 3))
  w = jax.random.normal(kw, (3, 3, 3, 5))
  ours = lambda x, w: convs.patch_conv(x, w, strides, padding, dimension_numbers=DIMS)
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS)
  _close(ours(x, w), ref(x, w))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for got, want in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    _close(got, want)


@pytest.mark.parametrize('size,padding', [(8, ((1, 1), (1, 1))), (7, 'SAME'), (6, 'VALID'),
                                          (8, ((0, 2), (2, 0))), (5, ((3, 0), (0, 0)))])
@pytest.mark.slow
def test_forward_conv_equals_lax_with_gradients(size, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, size, size, 3))
  w = jax.random.normal(kw, (3, 3, 3, 5))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, (1, 1), padding, dimension_numbers=DIMS)))
  ours, ref = loss(convs.forward_conv), loss(lax.conv_general_dilated)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    _close(got, want)
  # Seeds are vmapped in the training loop: the custom gradient batches too.
  ws = jnp.stack([w, 2 * w])
  batched = jax.vmap(jax.grad(ours, 1), (None, 0))(x, ws)
  _close(batched[1], jax.grad(ref, 1)(x, 2 * w))


def test_conv_layer_by_name_and_backend():
  assert convs.conv_layer('xla') is nn.Conv
  assert convs.conv_layer('auto', 'forward', backend='cpu') is convs.LAYERS['forward']
  assert convs.conv_layer('auto', 'forward', backend='gpu') is nn.Conv
  assert convs.conv_layer('auto', backend='tpu') is nn.Conv
  assert convs.conv_layer('patches') is convs.conv_layer('patches')  # equal models: one jit
  with pytest.raises(ValueError, match="unknown conv 'fft': choose one of"):
    convs.conv_layer('fft')
