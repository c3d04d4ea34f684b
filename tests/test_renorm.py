"""Batch Renormalization (Ioffe 2017; `bn_jax.norm_modules`): r and d in closed form and
clipped, no gradient through them, the warm-up schedule, masks, synced statistics, and its
equivalence to BN at rmax=1, dmax=0."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import models
from bn_jax import norms
from _norm_layer import NormLayer


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
  renorm = NormLayer(norms.norm_layer('batch_renorm', momentum=0.9, **kwargs))
  bn = NormLayer(norms.norm_layer('batch', momentum=0.9))
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
