"""GroupNorm as bn_jax computes it (`norms.GroupNorm`): nn.GroupNorm's numbers, and a finite
jitted gradient in the CNN shapes where XLA's CPU fusion of nn.GroupNorm gave NaN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import models
from bn_jax import norms


def test_group_norm_equals_the_closed_form_and_flax():
  x = np.random.default_rng(0).normal(2.0, 3.0, (3, 5, 4, 8)).astype(np.float32)
  module = norms.GroupNorm(num_groups=4, epsilon=1e-3)
  variables = {'params': {'scale': np.arange(1, 9, dtype=np.float32),
                          'bias': np.linspace(-1, 1, 8, dtype=np.float32)}}
  groups = x.reshape(3, 5, 4, 4, 2)  # channels 2g, 2g+1 form group g
  mean = groups.mean(axis=(1, 2, 4), keepdims=True)
  var = groups.var(axis=(1, 2, 4), keepdims=True)
  expected = ((groups - mean) / np.sqrt(var + 1e-3)).reshape(x.shape)
  expected = expected * variables['params']['scale'] + variables['params']['bias']
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  flax_out = nn.GroupNorm(num_groups=4, epsilon=1e-3).apply(variables, x)
  np.testing.assert_allclose(module.apply(variables, x), flax_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('features, groups', [((8,), 4), ((8,), 2), ((32, 64), 16)])
def test_jitted_cnn_gradient_with_group_norm_is_finite(features, groups):
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(0, 1, (32, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 32))
  model = models.create_model('cnn', norm='group', dropout=0.0, features=features,
                              norm_groups=groups, pools=len(features))
  params = model.init(jax.random.key(0), images[:1], train=False)['params']
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, images, train=True), labels).mean()
  grads = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  eager = jax.grad(loss)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads, eager)
