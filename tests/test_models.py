"""The models: parameter counts, the CNN with its CPU and XLA convolutions, max-pooling, errors, and
half precision (the norms themselves: test_norms.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import loop
from bn_jax import models
from bn_jax import norms

@pytest.mark.parametrize('norm, params, stats', [
    ('none', 784 * 128 + 128 + 128 * 10 + 10, 0),  # 101,770
    # No Dense bias before BN (beta replaces it); + gamma, beta; running mean, var.
    ('batch', 784 * 128 + 2 * 128 + 128 * 10 + 10, 2 * 128),  # 101,898
    ('batch_renorm', 784 * 128 + 2 * 128 + 128 * 10 + 10, 2 * 128 + 1),  # + the step count
    ('layer', 784 * 128 + 2 * 128 + 128 * 10 + 10, 0),  # gamma, beta; no running averages
    ('group', 784 * 128 + 2 * 128 + 128 * 10 + 10, 0),
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


def test_cnn_with_patch_convolutions_equals_xla_convolutions():
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  patches = models.create_model('cnn', norm='batch', conv='patches', dropout=0.0)
  variables = patches.init(jax.random.key(1), x, train=False)
  xla = models.create_model('cnn', norm='batch', conv='xla', dropout=0.0)
  for train in (True, False):
    run = lambda m: m.apply(variables, x, train=train, mutable=['batch_stats'])[0]
    np.testing.assert_allclose(run(patches), run(xla), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unknown conv 'fft'"):
    models.create_model('cnn', conv='fft')


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


@pytest.mark.parametrize('name, layers, size', [
    ('cnn', dict(features=(4, 4)), 4), ('cnn', dict(features=(4,)), 2),
    ('cnn', dict(features=(4, 4, 4)), 4), ('cnn', dict(features=(4,), pools=0), 1),
    ('resnet', dict(width=4), 1), ('mlp', dict(hidden=(4,)), 1),
])
@pytest.mark.slow
def test_min_image_size_is_the_smallest_image_the_model_takes(name, layers, size):
  model = models.create_model(name, norm='batch', **layers)
  assert models.min_image_size(model) == size
  model.init(jax.random.key(0), jnp.zeros((2, size, size, 1)), train=False)
  if size > 1:  # one pixel less: a max-pool leaves no pixel, the Dense layer no inputs
    with pytest.raises(ZeroDivisionError):
      model.init(jax.random.key(0), jnp.zeros((2, size - 1, size - 1, 1)), train=False)


def test_bad_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'vgg'"):
    models.create_model('vgg')
  with pytest.raises(ValueError, match="unknown norm 'instance'"):
    models.create_model('mlp', norm='instance')


# --- Ghost BN --------------------------------------------------------------------------------

@pytest.mark.parametrize('name, layers', [('mlp', {'hidden': (32,)}),
                                          ('cnn', {'features': (8, 8), 'dense': 16})])
@pytest.mark.slow
def test_half_precision_computes_in_bf16_and_keeps_bn_in_float32(name, layers):
  x = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
  full = models.create_model(name, norm='batch', dropout=0.0, **layers)
  half = models.create_model(name, norm='batch', dropout=0.0, dtype=jnp.bfloat16, **layers)
  variables = full.init(jax.random.key(1), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, mutated = half.apply(variables, x, train=True, capture_intermediates=True,
                               mutable=['batch_stats', 'intermediates'])
  updates, inter = mutated['batch_stats'], mutated['intermediates']
  layer = 'Dense_0' if name == 'mlp' else 'Conv_0'
  assert inter[layer]['__call__'][0].dtype == jnp.bfloat16  # computes in bf16
  assert inter['BatchNorm_0']['__call__'][0].dtype == jnp.float32
  assert logits.dtype == jnp.float32
  ref_logits, ref = full.apply(variables, x, train=True, mutable=['batch_stats'])
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref['batch_stats'])):
    assert a.dtype == jnp.float32  # running statistics stay float32 ...
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)  # ... within bf16's precision
  np.testing.assert_allclose(logits, ref_logits, rtol=5e-2, atol=5e-2)


def test_half_precision_training_lowers_the_loss(small_dataset):
  model = models.create_model('mlp', norm='batch', hidden=(32,), dtype=jnp.bfloat16)
  runs, _ = loop.fit(model, small_dataset, seeds=(0,), batch_size=30, epochs=3,
                     progress=False)
  losses = [h['train_loss'] for h in runs[0]['history']]
  assert losses[-1] < losses[0] and np.isfinite(losses).all()


def test_a_norm_by_name_is_the_norm_by_constructor():
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  by_name = models.MLP(hidden=(8,), norm='batch', dropout=0.0)
  by_constructor = models.MLP(hidden=(8,), norm=norms.norm_layer('batch'), dropout=0.0)
  variables = by_constructor.init(jax.random.key(1), x, train=False)
  assert jax.tree.structure(by_name.init(jax.random.key(1), x, train=False)) == (
      jax.tree.structure(variables))
  np.testing.assert_array_equal(by_name.apply(variables, x, train=False),
                                by_constructor.apply(variables, x, train=False))
  plain = models.MLP(hidden=(8,), norm='none').init(jax.random.key(1), x, train=False)
  assert 'bias' in plain['params']['Dense_0'] and 'batch_stats' not in plain  # no norm: a bias
