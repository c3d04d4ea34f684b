"""PreciseBN: population statistics as averages over batches, against closed forms."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from bn_jax import claims
from bn_jax import loop
from bn_jax import models
from bn_jax import precise_bn


def _bn_mlp():
  model = models.create_model('mlp', norm='batch', hidden=(3,), dropout=0.5)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (40, 28, 28, 1)))
  variables = model.init(jax.random.key(1), x[:1], train=False)
  h = x.reshape(40, -1) @ np.asarray(variables['params']['Dense_0']['kernel'], np.float64)
  return model, variables, x, h  # h: the BN layer's input, a known function of the data


def test_population_statistics_are_averages_of_batch_statistics():
  model, variables, x, h = _bn_mlp()
  stats = precise_bn.population_stats(model, variables, x, batch_size=8)['BatchNorm_0']
  batches = h.reshape(5, 8, 3)  # 40 examples in 5 batches of 8
  np.testing.assert_allclose(stats['mean'], batches.mean(1).mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], batches.var(1).mean(0), rtol=1e-3, atol=1e-6)
  # Batches of 16: the last 8 examples do not fill one and are left out.
  stats = precise_bn.population_stats(model, variables, x, batch_size=16)['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], h[:32].reshape(2, 16, 3).mean(1).mean(0),
                             rtol=1e-4, atol=1e-6)


def test_one_batch_of_everything_is_the_full_pass():
  model, variables, x, h = _bn_mlp()
  stats = precise_bn.population_stats(model, variables, x, batch_size=40)['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], h.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], h.var(0), rtol=1e-3, atol=1e-6)
  full = claims.full_pass_batch_stats(model, variables, x)['BatchNorm_0']
  np.testing.assert_allclose(full['mean'], stats['mean'], rtol=1e-6)


def test_the_sample_is_fixed_by_seed():
  a, b = precise_bn.sample(100, 30, seed=0), precise_bn.sample(100, 30, seed=1)
  assert len(set(a)) == 30 and (a == precise_bn.sample(100, 30, seed=0)).all()
  assert not (a == b).all()
  assert sorted(precise_bn.sample(100, 500, seed=0)) == list(range(100))


@pytest.mark.slow
def test_fit_records_metrics_with_precise_statistics(small_dataset):
  model = models.create_model('mlp', norm='batch', hidden=(16,), bn_momentum=0.999)
  runs, states = loop.fit(model, small_dataset, seeds=(0, 1), batch_size=30, epochs=1,
                          progress=False, precise_bn_examples=120)
  for s, run in enumerate(runs):
    variables = {'params': jax.tree.map(lambda v: v[s], states.params),
                 'batch_stats': jax.tree.map(lambda v: v[s], states.batch_stats)}
    rows = precise_bn.sample(len(small_dataset.train_labels), 120, seed=s)
    variables['batch_stats'] = precise_bn.population_stats(
        model, variables, small_dataset.train_images[rows], batch_size=30)
    expected = claims.accuracy(model, variables, small_dataset.val_images,
                               small_dataset.val_labels)
    assert run['final']['precise_val_accuracy'] == pytest.approx(expected, abs=1e-6)
    assert {'precise_test_loss', 'precise_test_accuracy', 'precise_val_loss'} <= set(
        run['final'])
  # Without running statistics there is nothing to recompute.
  runs, _ = loop.fit(models.create_model('mlp', norm='none', hidden=(16,)), small_dataset,
                     seeds=(0,), batch_size=30, epochs=1, progress=False,
                     precise_bn_examples=120)
  assert 'precise_val_accuracy' not in runs[0]['final']


@pytest.mark.slow
def test_precise_statistics_of_the_resnet_which_has_no_dropout():
  # The ResNet's first BN normalizes its stem convolution: with one batch of everything the
  # population statistics are that convolution's per-channel mean and variance.
  model = models.create_model('resnet', norm='batch', depth=8, width=4)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (6, 8, 8, 3)))
  variables = model.init(jax.random.key(1), x[:1], train=False)
  stem = jax.lax.conv_general_dilated(x, variables['params']['Conv_0']['kernel'], (1, 1),
                                      'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  stats = precise_bn.population_stats(model, variables, x, batch_size=6)['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], np.mean(stem, (0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], np.var(stem, (0, 1, 2)), rtol=1e-3, atol=1e-6)


def test_bias_corrected_running_averages_recover_constant_batch_statistics():
  # Every batch has per-feature mean mu and (biased) variance s2: after t updates from 0/1
  # the running averages are mu (1 - m^t) and m^t + s2 (1 - m^t); corrected, mu and s2.
  mu, s2, m, t = np.array([2.0, -1.0]), np.array([4.0, 0.25]), 0.9, 7
  batch = mu + np.sqrt(s2) * np.array([[1.0, 1.0], [-1.0, -1.0]])  # mean mu, variance s2
  bn = nn.BatchNorm(use_running_average=False, momentum=m)
  variables = bn.init(jax.random.key(0), batch)
  for _ in range(t):
    _, updates = bn.apply(variables, batch, mutable=['batch_stats'])
    variables = {**variables, **updates}
  raw = variables['batch_stats']
  np.testing.assert_allclose(raw['mean'], mu * (1 - m**t), rtol=1e-5)
  np.testing.assert_allclose(raw['var'], m**t + s2 * (1 - m**t), rtol=1e-5)
  corrected = precise_bn.bias_corrected(raw, m, t)
  np.testing.assert_allclose(corrected['mean'], mu, rtol=1e-5)
  np.testing.assert_allclose(corrected['var'], s2, rtol=1e-5)
  kept = precise_bn.bias_corrected({'mean': raw['mean'], 'steps': 3.0}, m, t)
  assert kept['steps'] == 3.0  # counters are not statistics


def test_fit_reports_bias_corrected_numbers(small_dataset):
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.0)
  args = dict(seeds=(0,), batch_size=50, epochs=1, progress=False)
  (plain,), _ = loop.fit(model, small_dataset, **args)
  (result,), _ = loop.fit(model, small_dataset, bn_ema_bias_correction=0.99, **args)
  assert result['final']['val_accuracy'] == plain['final']['val_accuracy']  # EMA as before
  assert {'corrected_val_accuracy', 'corrected_test_accuracy', 'corrected_val_loss',
          'corrected_test_loss'} <= set(result['final'])
  # 6 steps at 0.99 leave 94% of the initial values: correcting them changes the numbers.
  assert result['final']['corrected_val_loss'] != result['final']['val_loss']
