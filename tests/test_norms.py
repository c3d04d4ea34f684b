"""BatchNorm and ghost BN (`bn_jax.norms`, `bn_jax.norm_modules`) on hand-made inputs with
closed-form expectations, the norm constructors, and BN wired into the models (Batch Renorm:
test_renorm.py; LayerNorm and GroupNorm: test_layer_group_norms.py)."""

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import models
from bn_jax import norms
from _norm_layer import NormLayer
from _norm_layer import X


def _bn(momentum=0.9, epsilon=1e-3):
  norm = NormLayer(norms.norm_layer('batch', momentum=momentum, epsilon=epsilon))
  variables = norm.init(jax.random.key(0), jnp.asarray(X), train=False)
  return norm, variables


def test_train_mode_normalizes_with_batch_statistics():
  norm, variables = _bn(epsilon=1e-3)
  gamma, beta = np.array([2., 0.5, 1.], np.float32), np.array([0., 1., -3.], np.float32)
  params = {'BatchNorm_0': {'scale': gamma, 'bias': beta}}
  y, _ = norm.apply({'params': params, 'batch_stats': variables['batch_stats']}, X, train=True,
                    mutable=['batch_stats'])
  # By hand: column means (4, 2, 0), biased variances (5, 2, 3).
  mean, var = np.array([4., 2., 0.]), np.array([5., 2., 3.])
  expected = gamma * (X - mean) / np.sqrt(var + 1e-3) + beta
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_running_averages_follow_closed_form_and_eval_uses_them():
  m, k = 0.9, 3
  norm, variables = _bn(momentum=m)
  stats = variables['batch_stats']
  for _ in range(k):  # the same batch k times: ra = m^k * init + (1 - m^k) * batch statistic
    _, updates = norm.apply({'params': variables['params'], 'batch_stats': stats}, X,
                            train=True, mutable=['batch_stats'])
    stats = updates['batch_stats']
  w = 1 - m**k  # = 0.271
  mean, var = np.array([4., 2., 0.]), np.array([5., 2., 3.])
  np.testing.assert_allclose(stats['BatchNorm_0']['mean'], w * mean, rtol=1e-5)
  np.testing.assert_allclose(stats['BatchNorm_0']['var'], (1 - w) * 1.0 + w * var, rtol=1e-5)

  # Eval mode: normalizes with the running averages (gamma=1, beta=0 at init) ...
  variables = {'params': variables['params'], 'batch_stats': stats}
  y, updates = norm.apply(variables, X, train=False, mutable=['batch_stats'])
  expected = (X - w * mean) / np.sqrt((1 - w) + w * var + 1e-3)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  # ... and changes nothing.
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], stats)


def test_running_mean_of_two_different_batches():
  # Batches of constant blocks, values 1 then 2, momentum 0.9:
  # after 1: 0.1 * 1 = 0.1; after 2: 0.9 * 0.1 + 0.1 * 2 = 0.29.
  norm = NormLayer(norms.norm_layer('batch', momentum=0.9))
  ones = jnp.ones((4, 3))
  variables = norm.init(jax.random.key(0), ones, train=False)
  stats = variables['batch_stats']
  for value in (1.0, 2.0):
    _, updates = norm.apply({'params': variables['params'], 'batch_stats': stats},
                            value * ones, train=True, mutable=['batch_stats'])
    stats = updates['batch_stats']
  np.testing.assert_allclose(stats['BatchNorm_0']['mean'], [0.29] * 3, rtol=1e-6)
  # Constant batches have variance 0: var = 0.9 * 0.9 * 1 = 0.81.
  np.testing.assert_allclose(stats['BatchNorm_0']['var'], [0.81] * 3, rtol=1e-6)


def test_mask_keeps_padding_out_of_batch_statistics():
  norm, variables = _bn()
  padded = np.concatenate([X, 100 * np.ones((2, 3), np.float32)])
  mask = np.array([1, 1, 1, 1, 0, 0], bool)
  y_pad, up_pad = norm.apply(variables, padded, train=True, mask=mask, mutable=['batch_stats'])
  y, up = norm.apply(variables, X, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y_pad[:4], y, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), up_pad, up)


def test_conv_batchnorm_is_per_channel():
  norm = NormLayer(norms.norm_layer('batch', epsilon=0.0))
  x = jax.random.normal(jax.random.key(1), (8, 5, 5, 3)) * jnp.array([1., 10., 100.])
  x = x + jnp.array([-5., 0., 50.])
  variables = norm.init(jax.random.key(0), x, train=False)
  assert variables['batch_stats']['BatchNorm_0']['mean'].shape == (3,)
  y, _ = norm.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


def _ghost(group_size, momentum=0.9, epsilon=1e-3):
  return norms.GhostBatchNorm(group_size, momentum=momentum, epsilon=epsilon)


def test_ghost_bn_with_one_group_equals_batchnorm():
  x = jax.random.normal(jax.random.key(0), (8, 5)) * 3 + 1
  ghost, bn = _ghost(8), nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  variables = bn.init(jax.random.key(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ghost.init(jax.random.key(1), x))
  y_ghost, up_ghost = ghost.apply(variables, x, mutable=['batch_stats'])
  y_bn, up_bn = bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y_ghost, y_bn, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               up_ghost, up_bn)


def test_ghost_bn_normalizes_each_group_by_its_own_statistics():
  # Two groups of two: (1, 3) has mean 2, variance 1; (10, 14) has mean 12, variance 4.
  x = jnp.array([[1.], [3.], [10.], [14.]])
  eps = 1e-3
  ghost = _ghost(2, epsilon=eps)
  variables = ghost.init(jax.random.key(0), x)
  y, _ = ghost.apply(variables, x, mutable=['batch_stats'])
  expected = [-1 / np.sqrt(1 + eps), 1 / np.sqrt(1 + eps), -2 / np.sqrt(4 + eps),
              2 / np.sqrt(4 + eps)]
  np.testing.assert_allclose(y[:, 0], expected, rtol=1e-5)
  # Full-batch BN differs: mean 7, variance 27.5.
  full, _ = _ghost(4, epsilon=eps).apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(full[:, 0], (x[:, 0] - 7) / np.sqrt(27.5 + eps), rtol=1e-5)
  assert not np.allclose(full, y)

  # Running averages after two steps move towards the mean of the group statistics:
  # mean 0.19 * (2 + 12) / 2 = 1.33; var 0.81 * 1 + 0.19 * (1 + 4) / 2 = 1.285.
  stats = variables['batch_stats']
  for _ in range(2):
    _, updates = ghost.apply({'params': variables['params'], 'batch_stats': stats}, x,
                             mutable=['batch_stats'])
    stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], [1.33], rtol=1e-5)
  np.testing.assert_allclose(stats['var'], [1.285], rtol=1e-5)


def test_ghost_bn_masks_padding_within_a_group():
  x = jnp.array([[1.], [3.], [10.], [99.]])  # the last row is padding
  ghost = _ghost(2, epsilon=1e-3)
  variables = ghost.init(jax.random.key(0), x)
  y, updates = ghost.apply(variables, x, mask=jnp.array([1, 1, 1, 0]), mutable=['batch_stats'])
  np.testing.assert_allclose(y[:2, 0], np.array([-1, 1]) / np.sqrt(1 + 1e-3), rtol=1e-5)
  assert float(y[2, 0]) == 0.0  # a group of one real example: x - mean = 0
  # Running mean: 0.1 * mean of group means (2, 10).
  np.testing.assert_allclose(updates['batch_stats']['mean'], [0.1 * 6], rtol=1e-5)


def test_ghost_group_size_must_divide_the_batch():
  ghost = _ghost(3)
  with pytest.raises(ValueError, match='bn_group_size=3 must divide the batch of 4'):
    ghost.init(jax.random.key(0), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match='needs bn_group_size > 0'):
    models.create_model('mlp', norm='ghost')


def test_ghost_mlp_trains_with_group_statistics():
  model = models.create_model('mlp', norm='ghost', bn_group_size=4, hidden=(8,), dropout=0.0)
  x = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  assert set(variables['batch_stats']['BatchNorm_0']) == {'mean', 'var'}
  logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (16, 10)


# --- Norm constructors -----------------------------------------------------------------------


def test_norm_layer_none_means_no_normalization():
  assert norms.norm_layer('none') is None
  assert models.create_model('mlp', norm='none').norm is None


def test_norm_layer_errors_name_the_choices():
  with pytest.raises(ValueError, match=r"unknown norm 'instance': choose one of \('none', 'batch'"):
    norms.norm_layer('instance')
  for size in (0, -2):
    with pytest.raises(ValueError, match='needs bn_group_size > 0'):
      norms.norm_layer('ghost', group_size=size)
  with pytest.raises(ValueError, match='needs bn_group_size > 0'):
    norms.norm_layer('ghost', group_size=4).replace(group_size=0)


def test_equal_settings_give_equal_constructors_and_one_trace():
  a = norms.norm_layer('batch', momentum=0.9, axis_name='batch')
  b = norms.norm_layer('batch', momentum=0.9, axis_name='batch')
  assert a == b and hash(a) == hash(b) and a is not b
  assert a != norms.norm_layer('batch', momentum=0.99, axis_name='batch')
  assert a.replace(momentum=0.99) == norms.norm_layer('batch', axis_name='batch')
  ghost = norms.norm_layer('ghost', group_size=4)
  assert ghost == norms.norm_layer('ghost', group_size=4)
  assert hash(ghost) == hash(norms.norm_layer('ghost', group_size=4))
  assert ghost != norms.norm_layer('ghost', group_size=8) and ghost != a
  m1 = models.create_model('mlp', hidden=(8,), bn_momentum=0.9)
  m2 = models.create_model('mlp', hidden=(8,), bn_momentum=0.9)
  assert m1 == m2 and hash(m1) == hash(m2)

  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def predict(model, variables, x):
    traces.append(model)
    return model.apply(variables, x, train=False)

  x = jnp.ones((2, 28, 28, 1))
  variables = m1.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(predict(m1, variables, x), predict(m2, variables, x))
  assert len(traces) == 1  # the equal model hit the cache
  predict(models.create_model('mlp', hidden=(8,), bn_momentum=0.5), variables, x)
  assert len(traces) == 2  # different settings: a new trace


@pytest.mark.parametrize('name, kwargs', [('mlp', dict(hidden=(8, 6))),
                                          ('cnn', dict(features=(4, 3), dense=5))])
@pytest.mark.slow
def test_batch_and_one_group_ghost_models_have_the_same_variables_and_outputs(name, kwargs):
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  mask = jnp.array([1, 1, 1, 1, 1, 1, 0, 0])
  batch = models.create_model(name, norm='batch', dropout=0.0, **kwargs)
  ghost = models.create_model(name, norm='ghost', bn_group_size=8, dropout=0.0, **kwargs)
  variables = batch.init(jax.random.key(1), x, train=False)
  ghost_variables = ghost.init(jax.random.key(1), x, train=False)
  assert 'BatchNorm_1' in variables['batch_stats']
  assert jax.tree.structure(variables) == jax.tree.structure(ghost_variables)
  jax.tree.map(np.testing.assert_array_equal, variables, ghost_variables)
  for train in (True, False):
    for m in (None, mask):
      y_batch, up_batch = batch.apply(variables, x, train=train, mask=m, mutable=['batch_stats'])
      y_ghost, up_ghost = ghost.apply(variables, x, train=train, mask=m, mutable=['batch_stats'])
      np.testing.assert_allclose(y_ghost, y_batch, rtol=1e-4, atol=1e-5)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                   up_ghost, up_batch)


def test_a_flax_style_partial_batchnorm_works_as_the_norm():
  # The models take any nn.BatchNorm-like constructor, masks included.
  x = jax.random.normal(jax.random.key(0), (6, 28, 28, 1))
  mask = jnp.array([1, 1, 1, 1, 0, 0])
  ours = models.create_model('mlp', hidden=(8,), dropout=0.0, bn_momentum=0.9)
  flax_style = models.MLP(hidden=(8,), dropout=0.0,
                          norm=functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-3))
  variables = ours.init(jax.random.key(1), x, train=False)
  for model in (ours, flax_style):
    y, up = model.apply(variables, x, train=True, mask=mask, mutable=['batch_stats'])
    y4, up4 = model.apply(variables, x[:4], train=True, mutable=['batch_stats'])
    np.testing.assert_allclose(y[:4], y4, rtol=1e-5, atol=1e-5)  # padding left out
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), up, up4)
  np.testing.assert_allclose(flax_style.apply(variables, x, train=True, mutable=['batch_stats'])[0],
                             ours.apply(variables, x, train=True, mutable=['batch_stats'])[0])


@pytest.mark.parametrize('kind, kwargs, layer', [('batch', {}, 'BatchNorm_0'),
                                                 ('ghost', dict(group_size=10), 'BatchNorm_0'),
                                                 ('batch_renorm', {}, 'BatchRenorm_0')])
def test_momentum_zero_running_averages_are_the_batch_statistics(kind, kwargs, layer):
  x = jax.random.uniform(jax.random.key(0), (10, 28, 28, 1))
  model = models.MLP(hidden=(6,), dropout=0.0, norm=norms.norm_layer(kind, **kwargs))
  variables = model.init(jax.random.key(1), x, train=False)
  exact = model.clone(norm=model.norm.replace(momentum=0.0))
  assert exact.norm.momentum == 0.0 and model.norm.momentum == 0.99
  _, updates = exact.apply(variables, x, train=True, mutable=['batch_stats'])
  # The BN layer's input by hand: the flattened images times the bias-free Dense kernel.
  h = np.asarray(x, np.float64).reshape(10, -1) @ np.asarray(
      variables['params']['Dense_0']['kernel'], np.float64)
  stats = updates['batch_stats'][layer]
  np.testing.assert_allclose(stats['mean'], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], h.var(0), rtol=1e-4, atol=1e-6)
  assert 'bias' not in variables['params']['Dense_0']
