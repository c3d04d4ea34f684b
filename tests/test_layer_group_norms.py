"""LayerNorm and GroupNorm (`bn_jax.norms`, `bn_jax.norm_modules`): per-example statistics in
closed form, group counts, both wired into the models, and one train step with each of the
norms beyond BN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import models
from bn_jax import norms
from _norm_layer import NormLayer
from _norm_layer import X
from bn_jax import train

def test_layernorm_normalizes_each_example_over_all_its_axes():
  # Wu & He 2018: LN on a conv map normalizes over (H, W, C); scale and bias per channel.
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 4)) * jnp.array([1., 5., 10., 2.]) + 3
  norm = NormLayer(norms.norm_layer('layer', epsilon=1e-3))
  variables = norm.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params'}
  assert variables['params']['LayerNorm_0']['scale'].shape == (4,)
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean((1, 2, 3), keepdims=True), x64.var((1, 2, 3), keepdims=True)
  for training in (True, False):
    y = norm.apply(variables, x, train=training, mask=np.array([1, 1, 0]))
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-5)
  # It equals GroupNorm with one group; on Dense outputs it normalizes over the features.
  one_group = NormLayer(norms.norm_layer('group', groups=1, epsilon=1e-3))
  as_group = {'params': {'GroupNorm_0': variables['params']['LayerNorm_0']}}
  np.testing.assert_allclose(one_group.apply(as_group, x, train=True),
                             norm.apply(variables, x, train=True), rtol=1e-5, atol=1e-5)
  y = norm.apply(norm.init(jax.random.key(0), X, train=False), X, train=True)
  m, v = X.mean(1, keepdims=True), X.var(1, keepdims=True)
  np.testing.assert_allclose(y, (X - m) / np.sqrt(v + 1e-3), rtol=1e-5, atol=1e-5)


def test_groupnorm_normalizes_groups_of_channels_per_example():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 3, 6)), np.float64) * 4 + 1
  norm = NormLayer(norms.norm_layer('group', groups=3, epsilon=1e-3))
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
  capped = NormLayer(norms.norm_layer('group', groups=32))  # 16 channels: 16 groups of one
  variables = capped.init(jax.random.key(0), x, train=False)
  y = capped.apply(variables, x, train=True)
  for groups, same in ((16, True), (8, False)):
    other = NormLayer(norms.norm_layer('group', groups=groups)).apply(
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
@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.slow
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
