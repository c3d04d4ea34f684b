"""Noisy BN (Santurkar et al. 2018, Appendix A): the noise's distribution against the paper's
from many draws, and evaluation with the noise's mean, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import models
from bn_jax import norms
from bn_jax import settings

DRAWS = 200_000  # channels per call: each a draw of the per-channel scale and shift


def _noise(x, amount=0.5, jitter=0.1, key=0, deterministic=False):
  """`ChannelNoise(amount, jitter)` applied to `x` with the 'dropout' rng `key` (None: none)."""
  module = norms.ChannelNoise(amount, jitter)
  rngs = {} if key is None else {'dropout': jax.random.key(key)}
  return np.asarray(module.apply({}, jnp.asarray(x, jnp.float32), deterministic, rngs=rngs),
                    np.float64)


def _uniform_moments(values, low, high):
  """Checks mean (a + b) / 2, variance (b - a)^2 / 12 and the bounds of U(low, high) draws; the
  tolerances are > 6 standard errors at DRAWS draws."""
  values = np.asarray(values, np.float64).ravel()
  assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6
  assert values.min() < low + 0.01 * (high - low) and values.max() > high - 0.01 * (high - low)
  np.testing.assert_allclose(values.mean(), (low + high) / 2, atol=0.01 * (high - low))
  np.testing.assert_allclose(values.var(), (high - low)**2 / 12, rtol=0.02)


def test_the_default_is_the_papers_noise():
  # Appendix A: scale U(1, 1.25), shift U(-0.5, 0.5), per unit and step.
  config = settings.base_config()
  assert config.bn_noise == 0.5
  model = settings.make_model(settings.resolve(config, model='mlp', norm='noisy_batch'))
  assert model.norm.noise == 0.5
  assert norms.ChannelNoise().amount == 0.5 and norms.ChannelNoise().mean_scale() == 1.125


def test_per_channel_scale_and_shift_are_the_papers_uniforms():
  # x = 0 gives the shift b; x = 1 gives a + b: one draw of (a, b) per channel.
  y = _noise(np.stack([np.zeros(DRAWS), np.ones(DRAWS)]), jitter=0.0)
  shift, scale = y[0], y[1] - y[0]
  _uniform_moments(shift, -0.5, 0.5)
  _uniform_moments(scale, 1.0, 1.25)
  assert abs(np.corrcoef(shift, scale)[0, 1]) < 0.02  # drawn independently


@pytest.mark.parametrize('amount', [0.5, 1.0])
def test_the_amount_sets_both_ranges(amount):
  y = _noise(np.stack([np.zeros(DRAWS), np.ones(DRAWS)]), amount=amount, jitter=0.0, key=3)
  _uniform_moments(y[0], -amount, amount)
  _uniform_moments(y[1] - y[0], 1.0, 1.0 + amount / 2)


def test_without_jitter_every_example_of_a_channel_gets_the_same_noise_and_steps_differ():
  x = np.random.default_rng(0).normal(size=(64, 5, 5, 8))
  y = _noise(x, jitter=0.0, key=1)
  a = (y[1] - y[0]) / (x[1] - x[0])  # per position and channel
  np.testing.assert_allclose(a, np.broadcast_to(a[0, 0], a.shape), rtol=1e-4)
  np.testing.assert_allclose(y, x * a[0, 0] + (y[0, 0, 0] - x[0, 0, 0] * a[0, 0]), atol=1e-5)
  assert not np.allclose(_noise(x, jitter=0.0, key=2), y)  # a fresh key: fresh noise


def test_jitter_is_per_activation_uniform_around_the_channel_noise():
  # The same key draws the same per-channel noise with or without jitter, so the difference
  # is the jitter alone: at x = 0 the shift's e_b ~ U(-w, w), w = 0.1 * 0.5; at x = 1 the sum
  # e_a + e_b (mean 0, variance 2 w^2 / 3, within +-2 w).
  w = 0.05
  zeros, ones = np.zeros((DRAWS // 100, 100)), np.ones((DRAWS // 100, 100))
  _uniform_moments(_noise(zeros, key=4) - _noise(zeros, jitter=0.0, key=4), -w, w)
  both = _noise(ones, key=5) - _noise(ones, jitter=0.0, key=5)
  assert np.abs(both).max() <= 2 * w + 1e-6
  np.testing.assert_allclose(both.mean(), 0.0, atol=0.002)
  np.testing.assert_allclose(both.var(), 2 * w**2 / 3, rtol=0.02)


def test_evaluation_and_passes_without_rng_apply_the_mean():
  x = np.random.default_rng(1).normal(size=(16, 4, 4, 3))
  np.testing.assert_allclose(_noise(x, deterministic=True), x * 1.125, rtol=1e-6)
  np.testing.assert_allclose(_noise(x, key=None), x * 1.125, rtol=1e-6)
  np.testing.assert_allclose(_noise(x, amount=1.0, key=None), x * 1.25, rtol=1e-6)
  # The mean over many training draws is the eval output (x = 2: E[2a + b] = 2.25).
  draws = _noise(np.full((1, DRAWS), 2.0))
  np.testing.assert_allclose(draws.mean(), 2 * 1.125, atol=0.005)


def test_zero_noise_is_plain_bn():
  images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (16, 28, 28, 1)), jnp.float32)
  bn = models.create_model('mlp', norm='batch', hidden=(6,), dropout=0.0)
  quiet = models.create_model('mlp', norm='noisy_batch', bn_noise=0.0, hidden=(6,), dropout=0.0)
  variables = bn.init(jax.random.key(0), images[:1], train=False)
  rng = {'dropout': jax.random.key(5)}
  train = lambda m: m.apply(variables, images, train=True, mutable=['batch_stats'], rngs=rng)
  (out_bn, stats_bn), (out_quiet, stats_quiet) = train(bn), train(quiet)
  np.testing.assert_array_equal(out_bn, out_quiet)
  jax.tree.map(np.testing.assert_array_equal, stats_bn, stats_quiet)
  np.testing.assert_array_equal(quiet.apply(variables, images, train=False),
                                bn.apply(variables, images, train=False))


def test_a_noisy_network_in_eval_mode_is_bn_with_the_mean_scale_in_closed_form():
  # MLP, one hidden layer: logits = relu(1.125 * BN_eval(x W1)) W2 + b2, BN_eval with the
  # running averages: (h - mean) / sqrt(var + eps) * gamma + beta.
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.uniform(0, 1, (8, 28, 28, 1)), jnp.float32)
  model = models.create_model('mlp', norm='noisy_batch', hidden=(5,), dropout=0.0)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  p = jax.tree.map(np.asarray, variables['params'])
  stats = {'mean': rng.normal(size=5), 'var': rng.uniform(0.5, 2.0, 5)}
  p['BatchNorm_0'] = {'scale': rng.uniform(0.5, 1.5, 5), 'bias': rng.normal(size=5)}
  variables = {'params': p, 'batch_stats': {'BatchNorm_0': stats}}
  h = np.asarray(images, np.float64).reshape(8, -1) @ p['Dense_0']['kernel']
  z = ((h - stats['mean']) / np.sqrt(stats['var'] + 1e-3) * p['BatchNorm_0']['scale'] +
       p['BatchNorm_0']['bias'])
  expected = np.maximum(1.125 * z, 0) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  np.testing.assert_allclose(model.apply(variables, images, train=False), expected, rtol=1e-4,
                             atol=1e-4)
