"""BatchNorm against closed forms; parameter counts; the norm constructors."""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import models

X = np.array([[1., 2., -1.], [3., 0., -1.], [5., 4., -1.], [7., 2., 3.]], np.float32)


class _Norm(nn.Module):
  """One norm layer, called as the models call it (mask in train mode only)."""
  norm: Callable

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    return models._normalize(self.norm, x, train, mask)


def _bn(momentum=0.9, epsilon=1e-3):
  norm = _Norm(models.norm_layer('batch', momentum=momentum, epsilon=epsilon))
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
  norm = _Norm(models.norm_layer('batch', momentum=0.9))
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
  norm = _Norm(models.norm_layer('batch', epsilon=0.0))
  x = jax.random.normal(jax.random.key(1), (8, 5, 5, 3)) * jnp.array([1., 10., 100.])
  x = x + jnp.array([-5., 0., 50.])
  variables = norm.init(jax.random.key(0), x, train=False)
  assert variables['batch_stats']['BatchNorm_0']['mean'].shape == (3,)
  y, _ = norm.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


@pytest.mark.parametrize('norm, params, stats', [
    ('none', 784 * 128 + 128 + 128 * 10 + 10, 0),  # 101,770
    # No Dense bias before BN (beta replaces it); + gamma, beta; running mean, var.
    ('batch', 784 * 128 + 2 * 128 + 128 * 10 + 10, 2 * 128),  # 101,898
])
def test_mlp_parameter_counts(norm, params, stats):
  model = models.create_model('mlp', norm=norm)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  assert models.num_params(variables['params']) == params
  assert models.num_params(variables.get('batch_stats', {})) == stats


def test_cnn_has_bn_per_conv_channel_and_runs():
  model = models.create_model('cnn', norm='batch')
  variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
  assert [v['mean'].shape for v in variables['batch_stats'].values()] == [
      (32,), (64,)]
  logits, updates = model.apply(variables, jnp.ones((2, 28, 28, 1)), train=True,
                                mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
  assert logits.shape == (2, 10)
  assert set(updates['batch_stats']) == set(variables['batch_stats'])
  no_bn = models.create_model('cnn', norm='none').init(
      jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
  assert 'batch_stats' not in no_bn


def test_patch_conv_of_ones_counts_the_pixels_under_the_kernel():
  # A 3x3 all-ones kernel over an all-ones image, SAME padding: 9 inside, 6 on edges, 4 at
  # corners; VALID: 9 everywhere, 2 pixels smaller.
  x, w = jnp.ones((1, 5, 4, 1)), jnp.ones((3, 3, 1, 1))
  expected = np.full((5, 4), 9.0)
  expected[[0, -1], :] = 6
  expected[:, [0, -1]] = 6
  expected[[0, 0, -1, -1], [0, -1, 0, -1]] = 4
  same = models.patch_conv(x, w, (1, 1), 'SAME')
  np.testing.assert_array_equal(same[0, :, :, 0], expected)
  np.testing.assert_array_equal(models.patch_conv(x, w, (1, 1), 'VALID'), np.full((1, 3, 2, 1), 9))


@pytest.mark.parametrize('padding', ['SAME', 'VALID', [(2, 0), (1, 1)]])
def test_patch_conv_and_its_gradients_equal_lax_convolution(padding):
  x = jax.random.normal(jax.random.key(0), (3, 9, 8, 5))
  w = jax.random.normal(jax.random.key(1), (3, 3, 5, 7))
  dims = ('NHWC', 'HWIO', 'NHWC')
  reference = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                                        dimension_numbers=dims)
  ours = lambda x, w: models.patch_conv(x, w, (1, 1), padding, dimension_numbers=dims)
  np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for got, want in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(reference), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_patch_conv_falls_back_for_strided_convolutions():
  x, w = jnp.arange(16.0).reshape(1, 4, 4, 1), jnp.ones((1, 1, 1, 1))
  out = models.patch_conv(x, w, (2, 2), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(out[0, :, :, 0], [[0, 2], [8, 10]])


def test_cnn_with_patch_convolutions_equals_xla_convolutions():
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  patches = models.create_model('cnn', norm='batch', conv='patches', dropout=0.0)
  variables = patches.init(jax.random.key(1), x, train=False)
  xla = models.create_model('cnn', norm='batch', conv='xla', dropout=0.0)
  for train in (True, False):
    run = lambda m: m.apply(variables, x, train=train, mutable=['batch_stats'])[0]
    np.testing.assert_allclose(run(patches), run(xla), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unknown conv 'fft'"):
    models.create_model('cnn', conv='fft').init(jax.random.key(1), x, train=False)


def test_max_pool_2x2_takes_the_max_of_each_block():
  x = jnp.array([[1, 5, 2, 0], [3, 4, 7, 1], [0, 0, -1, -2], [9, 0, -3, -4]], jnp.float32)
  out = models.max_pool_2x2(x[None, :, :, None])
  np.testing.assert_array_equal(out[0, :, :, 0], [[5, 7], [9, -1]])
  odd = jnp.ones((1, 5, 5, 1))  # odd sizes: nn.max_pool's VALID pooling
  assert models.max_pool_2x2(odd).shape == (1, 2, 2, 1)


def test_cnn_depth_pools_and_init_scale():
  model = models.create_model('cnn', norm='batch', features=(8,) * 5, dense=16)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
  params = variables['params']
  assert [params[f'Conv_{i}']['kernel'].shape for i in range(5)] == [
      (3, 3, 1, 8)] + [(3, 3, 8, 8)] * 4
  assert params['Dense_0']['kernel'].shape == (7 * 7 * 8, 16)  # two 2x2 pools: 28 -> 7
  assert len(variables['batch_stats']) == 5
  scaled = models.create_model('cnn', norm='batch', features=(8,) * 5, dense=16, init_scale=3.0)
  big = scaled.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)['params']
  for name in ('Conv_3', 'Dense_0'):  # the same draw, times the scale
    np.testing.assert_allclose(big[name]['kernel'], 3 * params[name]['kernel'], rtol=1e-6)
  np.testing.assert_array_equal(big['Dense_1']['kernel'], params['Dense_1']['kernel'])


def test_bad_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.create_model('resnet')
  with pytest.raises(ValueError, match="unknown norm 'layer'"):
    models.create_model('mlp', norm='layer')


# --- Ghost BN --------------------------------------------------------------------------------

def _ghost(group_size, momentum=0.9, epsilon=1e-3):
  return models.GhostBatchNorm(group_size, momentum=momentum, epsilon=epsilon)


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
  assert models.norm_layer('none') is None
  assert models.create_model('mlp', norm='none').norm is None


def test_norm_layer_errors_name_the_choices():
  with pytest.raises(ValueError, match=r"unknown norm 'layer': choose one of \('none', 'batch'"):
    models.norm_layer('layer')
  for size in (0, -2):
    with pytest.raises(ValueError, match='needs bn_group_size > 0'):
      models.norm_layer('ghost', group_size=size)
  with pytest.raises(ValueError, match='needs bn_group_size > 0'):
    models.norm_layer('ghost', group_size=4).replace(group_size=0)


def test_equal_settings_give_equal_constructors_and_one_trace():
  a = models.norm_layer('batch', momentum=0.9, axis_name='batch')
  b = models.norm_layer('batch', momentum=0.9, axis_name='batch')
  assert a == b and hash(a) == hash(b) and a is not b
  assert a != models.norm_layer('batch', momentum=0.99, axis_name='batch')
  assert a.replace(momentum=0.99) == models.norm_layer('batch', axis_name='batch')
  ghost = models.norm_layer('ghost', group_size=4)
  assert ghost == models.norm_layer('ghost', group_size=4)
  assert hash(ghost) == hash(models.norm_layer('ghost', group_size=4))
  assert ghost != models.norm_layer('ghost', group_size=8) and ghost != a
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


@pytest.mark.parametrize('kind, kwargs', [('batch', {}), ('ghost', dict(group_size=10))])
def test_momentum_zero_running_averages_are_the_batch_statistics(kind, kwargs):
  x = jax.random.uniform(jax.random.key(0), (10, 28, 28, 1))
  model = models.MLP(hidden=(6,), dropout=0.0, norm=models.norm_layer(kind, **kwargs))
  variables = model.init(jax.random.key(1), x, train=False)
  exact = model.clone(norm=model.norm.replace(momentum=0.0))
  assert exact.norm.momentum == 0.0 and model.norm.momentum == 0.99
  _, updates = exact.apply(variables, x, train=True, mutable=['batch_stats'])
  # The BN layer's input by hand: the flattened images times the bias-free Dense kernel.
  h = np.asarray(x, np.float64).reshape(10, -1) @ np.asarray(
      variables['params']['Dense_0']['kernel'], np.float64)
  stats = updates['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], h.var(0), rtol=1e-4, atol=1e-6)
  assert 'bias' not in variables['params']['Dense_0']
