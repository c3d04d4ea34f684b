"""The norms (`bn_jax.norms`, `bn_jax.norm_modules`): BN, ghost BN, Batch Renorm, LayerNorm and
GroupNorm on hand-made inputs with closed-form expectations, the constructors, and each norm
wired into the models."""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import models
from bn_jax import norms
from bn_jax import train

X = np.array([[1., 2., -1.], [3., 0., -1.], [5., 4., -1.], [7., 2., 3.]], np.float32)


class _Norm(nn.Module):
  """One norm layer, called as the models call it (mask in train mode only)."""
  norm: Callable

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    return norms.normalize(self.norm, x, train, mask)


def _bn(momentum=0.9, epsilon=1e-3):
  norm = _Norm(norms.norm_layer('batch', momentum=momentum, epsilon=epsilon))
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
  norm = _Norm(norms.norm_layer('batch', momentum=0.9))
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
  norm = _Norm(norms.norm_layer('batch', epsilon=0.0))
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


# --- Batch Renorm ----------------------------------------------------------------------------

NO_SCHEDULE = dict(warmup_steps=0, rmax_steps=0, dmax_steps=0)  # the final limits at once

# Four features, each a case of r and d against r_max = 3, d_max = 5 (epsilon 0):
#   x               batch mean, var  running mean, var  r = sigma_B / sigma  d = (mu_B - mu) / sigma
#   1, 3, 1, 3       2,  1            1.5, 4             1/2                  1/4
#   0, 8, 0, 8       4, 16            0,   1             4 -> 3 (clipped)     4
#   10, 10, 14, 14  12,  4            0,   1             2                    12 -> 5 (clipped)
#   0, 1, 0, 1      1/2, 1/4          1/2, 9             1/6 -> 1/3 (clipped) 0
X_R = np.array([[1, 0, 10, 0], [3, 8, 10, 1], [1, 0, 14, 0], [3, 8, 14, 1]], np.float32)
RUNNING = {'mean': np.array([1.5, 0, 0, 0.5], np.float32),
           'var': np.array([4, 1, 1, 9], np.float32)}
# (x - batch mean) / batch std of every column is -1 or +1:
X_HAT = np.array([[-1, -1, -1, -1], [1, 1, -1, 1], [-1, -1, 1, -1], [1, 1, 1, 1]], np.float32)


def _renorm_variables(steps, gamma=np.ones(4, np.float32), beta=np.zeros(4, np.float32)):
  return {'params': {'scale': gamma, 'bias': beta},
          'batch_stats': dict(RUNNING, steps=np.float32(steps))}


@pytest.mark.parametrize('steps, kwargs, r, d', [
    (7, NO_SCHEDULE, [1 / 2, 3, 2, 1 / 3], [1 / 4, 4, 5, 0]),
    # The default schedule at step 22500: r_max = 1 + 2 * 17.5k / 35k = 2, d_max = 5 * 17.5k /
    # 20k = 4.375.
    (22500, {}, [1 / 2, 2, 2, 1 / 2], [1 / 4, 4, 4.375, 0]),
    (100, {}, [1, 1, 1, 1], [0, 0, 0, 0]),  # warm-up: plain BN
])
def test_renorm_r_and_d_have_their_closed_forms_and_clip(steps, kwargs, r, d):
  layer = norms.BatchRenorm(momentum=0.9, epsilon=0.0, **kwargs)
  y, state = layer.apply(_renorm_variables(steps), X_R, mutable=['batch_stats', 'intermediates'])
  np.testing.assert_allclose(state['intermediates']['r'][0], r, rtol=1e-6)
  np.testing.assert_allclose(state['intermediates']['d'][0], d, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(y, X_HAT * np.array(r) + np.array(d), rtol=1e-6, atol=1e-6)
  # The running averages move after r and d used the old ones: 0.9 * old + 0.1 * batch.
  stats = state['batch_stats']
  np.testing.assert_allclose(stats['mean'], [1.55, 0.4, 1.2, 0.5], rtol=1e-6)
  np.testing.assert_allclose(stats['var'], [3.7, 2.5, 1.3, 8.125], rtol=1e-6)
  assert float(stats['steps']) == steps + 1


def test_renorm_scale_and_bias_and_eval_mode():
  gamma, beta = np.array([2, 1, 1, 3], np.float32), np.array([0, 1, 0, -1], np.float32)
  variables = _renorm_variables(7, gamma, beta)
  layer = norms.BatchRenorm(momentum=0.9, epsilon=0.0, **NO_SCHEDULE)
  y, _ = layer.apply(variables, X_R, mutable=['batch_stats'])
  r, d = np.array([1 / 2, 3, 2, 1 / 3]), np.array([1 / 4, 4, 5, 0])
  np.testing.assert_allclose(y, gamma * (X_HAT * r + d) + beta, rtol=1e-6, atol=1e-6)
  # Eval mode: the running averages, as BN; nothing changes.
  y, updates = layer.clone(use_running_average=True).apply(variables, X_R, mutable=['batch_stats'])
  expected = gamma * (X_R - RUNNING['mean']) / np.sqrt(RUNNING['var']) + beta
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])


def test_no_gradient_flows_through_r_and_d():
  # With r, d constants, y = gamma * (r * x_hat + d) + beta: the gradient of sum(w * y) is
  # BN's, scaled by r:  dx = r / sigma_B * (g - mean(g) - x_hat * mean(g * x_hat)), g = gamma w.
  gamma = np.array([2, 1, 1, 3], np.float32)
  variables = _renorm_variables(7, gamma)
  layer = norms.BatchRenorm(momentum=0.9, epsilon=0.0, **NO_SCHEDULE)
  w = np.asarray(jax.random.normal(jax.random.key(0), X_R.shape), np.float64)
  loss = lambda x: jnp.sum(w * layer.apply(variables, x, mutable=['batch_stats'])[0])
  grad = jax.grad(loss)(jnp.asarray(X_R))
  r, sigma_b = np.array([1 / 2, 3, 2, 1 / 3]), np.array([1, 4, 2, 1 / 2])
  g = gamma * w
  expected = r / sigma_b * (g - g.mean(0) - X_HAT * (g * X_HAT).mean(0))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  # Were r and d not stopped, the unclipped column 0 would be y = (x - mu) / sigma (its
  # gradient gamma * w / sigma), not the expression above.
  assert not np.allclose(gamma[0] * w[:, 0] / 2, expected[:, 0], atol=1e-3)


@pytest.mark.parametrize('kwargs', [dict(rmax=1.0, dmax=0.0, **NO_SCHEDULE), {}])
@pytest.mark.parametrize('shape', [(6, 5), (6, 3, 3, 2)])
def test_renorm_with_rmax_1_dmax_0_equals_batchnorm(kwargs, shape):
  # r_max = 1, d_max = 0: set directly, or the default schedule's warm-up (step 0).
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
  mask = np.array([1, 1, 1, 0, 1, 0], bool)
  renorm = _Norm(norms.norm_layer('batch_renorm', momentum=0.9, **kwargs))
  bn = _Norm(norms.norm_layer('batch', momentum=0.9))
  features = shape[-1]
  params = {'scale': np.linspace(0.5, 2, features), 'bias': np.linspace(-1, 1, features)}
  stats = {'mean': np.linspace(-3, 3, features), 'var': np.linspace(0.5, 4, features)}
  v_bn = {'params': {'BatchNorm_0': params}, 'batch_stats': {'BatchNorm_0': stats}}
  v_re = {'params': {'BatchRenorm_0': params},
          'batch_stats': {'BatchRenorm_0': dict(stats, steps=np.float32(0))}}
  for train in (True, True, False):  # two steps from far-off running averages, then eval
    y_bn, up_bn = bn.apply(v_bn, x, train=train, mask=mask, mutable=['batch_stats'])
    y_re, up_re = renorm.apply(v_re, x, train=train, mask=mask, mutable=['batch_stats'])
    np.testing.assert_allclose(y_re, y_bn, rtol=1e-5, atol=1e-5)
    new = dict(up_re['batch_stats']['BatchRenorm_0'])
    assert float(new.pop('steps')) == float(v_re['batch_stats']['BatchRenorm_0']['steps']) + train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new,
                 dict(up_bn['batch_stats']['BatchNorm_0']))
    v_bn, v_re = dict(v_bn, **up_bn), dict(v_re, **up_re)


def test_renorm_masks_padding_out_of_its_statistics():
  layer = norms.BatchRenorm(momentum=0.9, epsilon=0.0, **NO_SCHEDULE)
  padded = np.concatenate([X_R, 100 * np.ones((2, 4), np.float32)])
  mask = np.array([1, 1, 1, 1, 0, 0], bool)[:, None]
  y, up = layer.apply(_renorm_variables(7), padded, mask=mask, mutable=['batch_stats'])
  y4, up4 = layer.apply(_renorm_variables(7), X_R, mutable=['batch_stats'])
  np.testing.assert_allclose(y[:4], y4, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, up, up4)


def test_renorm_statistics_synced_over_a_device_axis_equal_one_batch():
  # Two "devices" of four examples each (vmap with an axis name, as under pmap / shard_map).
  x = jax.random.normal(jax.random.key(0), (8, 3)) * 3 + 2
  running = {'mean': np.array([0., 1., 2.]), 'var': np.array([1., 4., 9.]), 'steps': 0.0}
  variables = {'params': {'scale': np.ones(3), 'bias': np.zeros(3)}, 'batch_stats': running}
  layer = norms.BatchRenorm(momentum=0.9, **NO_SCHEDULE)
  synced = layer.clone(axis_name='devices')
  y, up = jax.vmap(lambda x: synced.apply(variables, x, mutable=['batch_stats']),
                   axis_name='devices')(x.reshape(2, 4, 3))
  y_one, up_one = layer.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y.reshape(8, 3), y_one, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5), up, up_one)


@pytest.mark.parametrize('steps, r_max, d_max', [
    (0, 1.0, 0.0),
    (3000, 1.0, 0.0),  # warm-up: 5k steps of BN
    (5000, 1.0, 0.0),  # the ramps start here
    (15000, 1 + 2 * 10 / 35, 5 * 10 / 20),  # r: 10k of 35k steps to 3; d: 10k of 20k to 5
    (25000, 1 + 2 * 20 / 35, 5.0),  # d_max reached
    (40000, 3.0, 5.0),
    (10**6, 3.0, 5.0),
])
def test_renorm_schedule(steps, r_max, d_max):
  got = norms.renorm_limits(steps)  # Ioffe 2017's schedule is the default
  np.testing.assert_allclose(got, (r_max, d_max), rtol=1e-6)


def test_renorm_schedule_edges_and_step_counter():
  # A ramp that ends when the warm-up does jumps there; no warm-up: the final limits at once.
  limits = functools.partial(norms.renorm_limits, rmax=2.0, dmax=1.0, warmup_steps=10,
                             rmax_steps=10, dmax_steps=20)
  np.testing.assert_allclose(limits(9), (1.0, 0.0))
  np.testing.assert_allclose(limits(10), (2.0, 0.0))
  np.testing.assert_allclose(limits(15), (2.0, 0.5))
  np.testing.assert_allclose(norms.renorm_limits(0, **NO_SCHEDULE), (3.0, 5.0))
  # The counter counts train-mode steps only (not init, not eval).
  layer = norms.BatchRenorm()
  variables = layer.init(jax.random.key(0), X_R)
  assert float(variables['batch_stats']['steps']) == 0
  _, up = layer.clone(use_running_average=True).apply(variables, X_R, mutable=['batch_stats'])
  assert float(up['batch_stats']['steps']) == 0
  for step in (1, 2):
    _, up = layer.apply(dict(variables, **up), X_R, mutable=['batch_stats'])
    assert float(up['batch_stats']['steps']) == step


def test_renorm_settings_are_checked():
  for kwargs, message in [(dict(rmax=0.5), 'renorm_rmax=0.5 must be >= 1'),
                          (dict(dmax=-1.0), 'renorm_dmax=-1.0 must be >= 0'),
                          (dict(warmup_steps=-1), 'renorm_warmup_steps=-1 must be >= 0'),
                          (dict(rmax_steps=100), 'renorm_rmax_steps=100 is before the warm-up'),
                          (dict(dmax_steps=100), 'renorm_dmax_steps=100 is before the warm-up')]:
    with pytest.raises(ValueError, match=message):
      norms.norm_layer('batch_renorm', **kwargs)
  with pytest.raises(ValueError, match='renorm_rmax=0.9 must be >= 1'):
    models.create_model('mlp', norm='batch_renorm', renorm_rmax=0.9)


# --- LayerNorm and GroupNorm -----------------------------------------------------------------

def test_layernorm_normalizes_each_example_over_all_its_axes():
  # Wu & He 2018: LN on a conv map normalizes over (H, W, C); scale and bias per channel.
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 4)) * jnp.array([1., 5., 10., 2.]) + 3
  norm = _Norm(norms.norm_layer('layer', epsilon=1e-3))
  variables = norm.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params'}
  assert variables['params']['LayerNorm_0']['scale'].shape == (4,)
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean((1, 2, 3), keepdims=True), x64.var((1, 2, 3), keepdims=True)
  for train in (True, False):
    y = norm.apply(variables, x, train=train, mask=np.array([1, 1, 0]))
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-5)
  # It equals GroupNorm with one group; on Dense outputs it normalizes over the features.
  one_group = _Norm(norms.norm_layer('group', groups=1, epsilon=1e-3))
  as_group = {'params': {'GroupNorm_0': variables['params']['LayerNorm_0']}}
  np.testing.assert_allclose(one_group.apply(as_group, x, train=True),
                             norm.apply(variables, x, train=True), rtol=1e-5, atol=1e-5)
  y = norm.apply(norm.init(jax.random.key(0), X, train=False), X, train=True)
  m, v = X.mean(1, keepdims=True), X.var(1, keepdims=True)
  np.testing.assert_allclose(y, (X - m) / np.sqrt(v + 1e-3), rtol=1e-5, atol=1e-5)


def test_groupnorm_normalizes_groups_of_channels_per_example():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 3, 6)), np.float64) * 4 + 1
  norm = _Norm(norms.norm_layer('group', groups=3, epsilon=1e-3))
  variables = norm.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params'}
  groups = x.reshape(2, 3, 3, 3, 2)  # 3 groups of 2 channels: over H, W and the group's channels
  mean, var = groups.mean((1, 2, 4), keepdims=True), groups.var((1, 2, 4), keepdims=True)
  expected = ((groups - mean) / np.sqrt(var + 1e-3)).reshape(x.shape)
  np.testing.assert_allclose(norm.apply(variables, x, train=True), expected, rtol=1e-4, atol=1e-5)
  # Dense outputs: the features in groups, (1, 2, -1 | 0, 4, 2) -> means 0.5 and 2, etc.
  h = np.array([[1, 2, -1, 0, 4, 2]], np.float32)
  y = norm.apply(norm.init(jax.random.key(0), h, train=False), h, train=True)
  pairs = h.reshape(1, 3, 2)
  expected = (pairs - pairs.mean(-1, keepdims=True)) / np.sqrt(pairs.var(-1, keepdims=True) + 1e-3)
  np.testing.assert_allclose(y, expected.reshape(1, 6), rtol=1e-5, atol=1e-5)


def test_groups_are_capped_at_the_channels_and_must_divide_them():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 16))
  capped = _Norm(norms.norm_layer('group', groups=32))  # 16 channels: 16 groups of one
  variables = capped.init(jax.random.key(0), x, train=False)
  y = capped.apply(variables, x, train=True)
  for groups, same in ((16, True), (8, False)):
    other = _Norm(norms.norm_layer('group', groups=groups)).apply(
        {'params': variables['params']}, x, train=True)
    assert np.allclose(y, other, atol=1e-6) == same
  model = models.create_model('cnn', norm='group', features=(16, 48), norm_groups=32)
  with pytest.raises(ValueError, match='norm_groups=32 must divide the 48 channels of layer '
                     'GroupNorm_1: choose a divisor of 48.'):
    model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
  with pytest.raises(ValueError, match="norm='group' needs norm_groups > 0"):
    models.create_model('mlp', norm='group', norm_groups=0)


@pytest.mark.parametrize('name, kwargs, before', [
    ('mlp', dict(hidden=(8, 6)), 'Dense'),
    ('cnn', dict(features=(4, 6), dense=5), 'Conv')])
@pytest.mark.parametrize('kind, layer', [('layer', 'LayerNorm'), ('group', 'GroupNorm')])
def test_per_example_norms_in_the_models(name, kwargs, before, kind, layer):
  model = models.create_model(name, norm=kind, norm_groups=2, dropout=0.0, **kwargs)
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
  variables = model.init(jax.random.key(1), x, train=False)
  assert 'batch_stats' not in variables
  params = variables['params']
  assert {f'{layer}_0', f'{layer}_1'} <= set(params) and f'{layer}_2' not in params
  assert set(params[f'{layer}_1']) == {'scale', 'bias'}
  for i in (0, 1):
    assert 'bias' not in params[f'{before}_{i}']  # the norm's bias replaces it, as with BN
  mask = np.array([1, 1, 1, 0])
  y, updates = model.apply(variables, x, train=True, mask=mask, mutable=['batch_stats'])
  assert not updates
  np.testing.assert_allclose(model.apply(variables, x, train=False), y, rtol=1e-6, atol=1e-6)
  changed = x.copy()
  changed[2] = 10 * changed[2] + 5  # another example: the others' outputs stay as they were
  y2 = model.apply(variables, changed, train=True, mask=mask)
  np.testing.assert_allclose(np.delete(y2, 2, 0), np.delete(y, 2, 0), rtol=1e-6, atol=1e-6)
  assert not np.allclose(y2[2], y[2])


def test_new_constructors_compare_hash_and_replace():
  for kind, kwargs, change in [('batch_renorm', dict(rmax=2.0, axis_name='b'), dict(dmax=1.0)),
                               ('layer', dict(epsilon=1e-5), dict(epsilon=1e-3)),
                               ('group', dict(groups=8), dict(groups=4))]:
    a, b = norms.norm_layer(kind, **kwargs), norms.norm_layer(kind, **kwargs)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a.replace(**change) != a and a.replace(**change).replace(**{
        k: getattr(a, k) for k in change}) == a
  renorm = norms.norm_layer('batch_renorm', momentum=0.9)
  assert renorm.replace(momentum=0.0).momentum == 0.0 and renorm.momentum == 0.9
  with pytest.raises(ValueError, match='LayerNormLayer has no setting momentum'):
    norms.norm_layer('layer').replace(momentum=0.0)


@pytest.mark.parametrize('name, kwargs', [('mlp', dict(hidden=(8,))),
                                          ('cnn', dict(features=(4, 8), dense=8))])
@pytest.mark.parametrize('norm', ['batch_renorm', 'layer', 'group'])
def test_one_train_step_with_each_norm_changes_the_params(name, kwargs, norm):
  model = models.create_model(name, norm=norm, norm_groups=4, renorm_warmup_steps=0,
                              renorm_rmax_steps=0, renorm_dmax_steps=0, **kwargs)
  state = train.create_train_state(model, jax.random.key(0), 1e-2)
  images = np.asarray(jax.random.uniform(jax.random.key(1), (8, 28, 28, 1)))
  batch = {'image': images, 'label': np.arange(8) % 10, 'mask': np.arange(8) < 6}
  new, sums = jax.jit(train.train_step)(state, batch, jax.random.key(2))
  assert float(sums['count']) == 6 and np.isfinite(float(sums['loss']))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), new.params, state.params)
  assert all(jax.tree.leaves(changed))
  if norm == 'batch_renorm':
    assert float(new.batch_stats['BatchRenorm_0']['steps']) == 1
    assert np.abs(new.batch_stats['BatchRenorm_0']['mean']).max() > 0
  else:
    assert new.batch_stats == {} and state.batch_stats == {}


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
