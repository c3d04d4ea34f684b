"""Santurkar et al.'s measures against hand computations (noisy BN: tests/test_noisy_bn.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import ics
from bn_jax import models


def _linear_net():
  rng = np.random.default_rng(0)
  w1, w2 = rng.normal(size=(3, 4)), rng.normal(size=(4, 2))  # x @ w1 @ w2
  x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
  params = {'Dense_0': {'kernel': jnp.asarray(w1)}, 'Dense_1': {'kernel': jnp.asarray(w2)}}
  loss = lambda p: 0.5 * jnp.sum((x @ p['Dense_0']['kernel'] @ p['Dense_1']['kernel'] - y)**2)
  return params, loss, (w1, w2, x, y)


def test_ics_of_a_two_layer_linear_network_equals_the_hand_computation():
  jax.config.update('jax_enable_x64', True)
  try:
    params, loss, (w1, w2, x, y) = _linear_net()
    lr = 0.05
    r = x @ w1 @ w2 - y
    g1, g2 = x.T @ r @ w2.T, (x @ w1).T @ r  # dL/dW1, dL/dW2
    w1_moved = w1 - lr * g1  # layer 1, before layer 2, takes its SGD step
    g2_after = (x @ w1_moved).T @ (x @ w1_moved @ w2 - y)
    (n1, l2_1, cos_1), (n2, l2_2, cos_2) = ics.internal_covariate_shift(
        loss, params, ics.sgd_step(lr))
  finally:
    jax.config.update('jax_enable_x64', False)
  assert (n1, n2) == ('Dense_0', 'Dense_1')
  assert l2_1 == 0.0 and abs(cos_1 - 1.0) < 1e-12  # nothing precedes the first layer
  np.testing.assert_allclose(l2_2, np.linalg.norm(g2 - g2_after), rtol=1e-10)
  expected_cos = np.sum(g2 * g2_after) / (np.linalg.norm(g2) * np.linalg.norm(g2_after))
  np.testing.assert_allclose(cos_2, expected_cos, rtol=1e-10)
  assert l2_2 > 0


def test_landscape_of_a_quadratic_has_its_curvature_as_beta():
  # L(w) = 0.5 w^T A w: along -s g the gradient changes by s A g, so beta = |A g| / |g| and
  # the losses are 0.5 (w - s g)^T A (w - s g).
  a = jnp.diag(jnp.array([1.0, 4.0]))
  w = {'w': {'kernel': jnp.array([1.0, 1.0])}}
  loss = lambda p: 0.5 * p['w']['kernel'] @ a @ p['w']['kernel']
  out = ics.landscape(loss, w, [0.1, 0.2])
  g = a @ w['w']['kernel']
  np.testing.assert_allclose(out['beta'], np.linalg.norm(a @ g) / np.linalg.norm(g), rtol=1e-5)
  expected = [float(loss({'w': {'kernel': w['w']['kernel'] - s * g}})) for s in (0.1, 0.2)]
  np.testing.assert_allclose(out['losses'], expected, rtol=1e-6)
  np.testing.assert_allclose(out['loss_range'], max(expected) - min(expected), rtol=1e-5)


@pytest.mark.slow
def test_a_loss_taking_its_data_gives_the_closures_numbers():
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.uniform(0, 1, (8, 6, 6, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  model = models.create_model('mlp', norm='batch', hidden=(5, 4), dropout=0.0)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  closure = ics.train_loss(model, variables, images, labels)
  loss, data = ics.batch_loss(model), ({'batch_stats': variables['batch_stats']}, images, labels)
  assert ics.batch_loss(model) is loss  # one function (and one compiled program) per model
  update = ics.sgd_step(0.1)
  for (n1, l1, c1), (n2, l2, c2) in zip(
      ics.internal_covariate_shift(closure, variables['params'], update),
      ics.internal_covariate_shift(loss, variables['params'], update, data)):
    assert n1 == n2
    np.testing.assert_allclose([l1, c1], [l2, c2], rtol=1e-5, atol=1e-7)
  a, b = (ics.landscape(closure, variables['params'], [0.1, 0.3]),
          ics.landscape(loss, variables['params'], [0.1, 0.3], data))
  np.testing.assert_allclose(a['losses'] + [a['beta']], b['losses'] + [b['beta']], rtol=1e-5)
