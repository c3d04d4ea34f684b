"""The train step's purity and masks, exact eval counts, and the chunked / vmapped loop; uint8
pixels on the device and their float inputs inside the step."""

import copy
import functools

import jax
import numpy as np
import optax
import pytest

from bn_jax import data
from bn_jax import host
from bn_jax import models
from bn_jax import optim
from bn_jax import train


def _state(norm='batch', dropout=0.0, seed=0, hidden=(16,)):
  model = models.create_model('mlp', norm=norm, hidden=hidden, dropout=dropout)
  return train.create_train_state(model, jax.random.key(seed), 1e-3)


def _batch(dataset, n, pad=0):
  image = np.concatenate([dataset.train_images[:n], np.zeros((pad, 28, 28, 1), np.float32)])
  label = np.concatenate([dataset.train_labels[:n], np.zeros(pad, np.int32)])
  return {'image': image, 'label': label, 'mask': np.arange(n + pad) < n}


def _assert_trees_close(a, b, **tol):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **tol), a, b)


@pytest.mark.slow
def test_train_step_is_pure_and_jit_agrees(small_dataset):
  state = _state(dropout=0.2)
  before = copy.deepcopy(jax.device_get((state.params, state.batch_stats, state.opt_state)))
  batch, rng = _batch(small_dataset, 32), jax.random.key(3)
  s1, m1 = train.train_step(state, batch, rng)
  s2, m2 = train.train_step(state, batch, rng)
  jax.tree.map(np.testing.assert_array_equal, (s1.params, s1.batch_stats, m1),
               (s2.params, s2.batch_stats, m2))
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get((state.params, state.batch_stats, state.opt_state)))
  assert int(s1.step) == 1 and float(m1['count']) == 32
  # jit vs eager, compared through plain SGD: Adam's first step is lr * sign(g), which turns
  # the rounding noise of near-zero gradients into lr-sized differences.
  sgd = train.TrainState.create(apply_fn=state.apply_fn, params=state.params,
                                tx=optax.sgd(0.1), batch_stats=state.batch_stats)
  s3, m3 = train.train_step(sgd, batch, rng)
  s4, m4 = jax.jit(train.train_step)(sgd, batch, rng)
  _assert_trees_close((s3.params, s3.batch_stats, m3), (s4.params, s4.batch_stats, m4),
                      rtol=1e-5, atol=1e-6)
  # The batch statistics moved the running averages off their init (mean 0).
  assert np.abs(s1.batch_stats['BatchNorm_0']['mean']).max() > 0


@pytest.mark.slow
def test_dropout_mask_changes_every_step(small_dataset):
  state, batch, rng = _state(dropout=0.5), _batch(small_dataset, 32), jax.random.key(0)
  _, m0 = train.train_step(state, batch, rng)
  _, m1 = train.train_step(state.replace(step=state.step + 1), batch, rng)
  assert float(m0['loss']) != float(m1['loss'])  # same params and batch, other dropout mask


@pytest.mark.slow
def test_padded_batch_equals_the_smaller_batch(small_dataset):
  # The last partial batch of an epoch is padded and masked: the step must equal a step on
  # the real rows alone (loss, gradients and BN statistics all ignore the padding).
  state, rng = _state(), jax.random.key(0)
  s_pad, m_pad = train.train_step(state, _batch(small_dataset, 5, pad=3), rng)
  s_small, m_small = train.train_step(state, _batch(small_dataset, 5), rng)
  _assert_trees_close((s_pad.params, s_pad.batch_stats), (s_small.params, s_small.batch_stats),
                      rtol=1e-5, atol=1e-6)
  _assert_trees_close(m_pad, m_small, rtol=1e-6)
  assert float(m_pad['count']) == 5


def test_loss_falls_over_a_few_steps(small_dataset):
  state, batch, rng = _state(), _batch(small_dataset, 64), jax.random.key(0)
  step = jax.jit(train.train_step)
  losses = []
  for _ in range(20):
    state, sums = step(state, batch, rng)
    losses.append(float(sums['loss'] / sums['count']))
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize('n, batch_size', [(37, 10), (100, 7), (5, 64)])
def test_evaluate_counts_every_example_once(small_dataset, n, batch_size):
  state = _state()
  arrays = (small_dataset.test_pixels[:n], small_dataset.test_labels[:n],
            small_dataset.pixel_table())
  rows = host.index_rows(np.arange(n), batch_size)
  sums = jax.jit(train.evaluate)(state, arrays, rows)
  assert float(sums['count']) == n
  # The same sums from one pass over all n examples at once, in eval mode.
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          small_dataset.test_images[:n], train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, arrays[1])
  np.testing.assert_allclose(sums['loss'], losses.sum(), rtol=1e-5)
  assert float(sums['correct']) == float((logits.argmax(-1) == arrays[1]).sum())


def test_epoch_order_is_a_padded_permutation():
  order = host.epoch_order(0, 3, num_examples=10, batch_size=4, num_rows=4)
  assert order.shape == (4, 4)
  flat = np.asarray(order).ravel()
  assert sorted(flat[flat >= 0]) == list(range(10)) and (flat < 0).sum() == 6
  assert (flat[10:] == -1).all()  # padding at the end: only the last batch is partial
  again = host.epoch_order(0, 3, num_examples=10, batch_size=4, num_rows=4)
  np.testing.assert_array_equal(order, again)  # a function of (seed, epoch) alone
  other = host.epoch_order(0, 4, num_examples=10, batch_size=4, num_rows=4)
  assert not np.array_equal(order, other)


@pytest.mark.parametrize('standardize', [False, True])
def test_pixels_stay_uint8_on_the_device_and_the_step_converts_like_numpy(standardize):
  ds = data.load('synthetic:200:8x8x3', standardize=standardize)  # 180 / 20 / 50 examples
  device = host.DeviceData.put(ds)
  pixels, labels, table = device.arrays
  assert pixels.dtype == np.uint8 and pixels.shape == (250, 8, 8, 3)
  assert table.shape == (256, 3) and device.image_shape == (8, 8, 3)
  idx = np.array([3, 0, 249, -1, 180], np.int32)  # train, train, test, padding, val
  batch = jax.jit(train.gather_batch)(device.arrays, idx)
  # By numpy, in float32: pixel / 255, then (x - mean) / std with the training statistics.
  every = np.concatenate([ds.train_pixels, ds.val_pixels, ds.test_pixels])
  expected = every[np.maximum(idx, 0)].astype(np.float32) / np.float32(255)
  if standardize:
    mean, std = ds.channel_stats
    expected = (expected - mean) / std
  np.testing.assert_array_equal(batch['image'], expected)  # the same bits
  assert batch['image'].dtype == np.float32
  np.testing.assert_array_equal(batch['mask'], [True, True, True, False, True])
  np.testing.assert_array_equal(batch['label'], np.asarray(labels)[np.maximum(idx, 0)])
  np.testing.assert_array_equal(host.host_inputs(jax.device_get(device.arrays), idx[idx >= 0]),
                                expected[idx >= 0])


def test_step_on_device_pixels_is_bit_identical_to_the_float_path(small_dataset):
  # Before pixels stayed uint8, the host fed the step float32 images: uint8 / 255 in numpy.
  # The device lookup must give those bits, and augment='none' must leave the step as it was.
  device = host.DeviceData.put(small_dataset)
  idx = np.arange(32, dtype=np.int32)[::-1]
  new = jax.jit(train.gather_batch)(device.arrays, idx)
  old = {'image': small_dataset.train_pixels[idx].astype(np.float32) / 255.0,
         'label': small_dataset.train_labels[idx], 'mask': np.ones(32, bool)}
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  default = train.create_train_state(model, jax.random.key(0), 1e-3)
  explicit = train.create_train_state(model, jax.random.key(0), 1e-3, augment='none')
  assert default.augment == 'none'
  step, rng = jax.jit(train.train_step), jax.random.key(5)
  results = [step(state, batch, rng) for state, batch in
             ((default, old), (default, new), (explicit, new))]
  for state, sums in results[1:]:
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.batch_stats, sums),
                 (results[0][0].params, results[0][0].batch_stats, results[0][1]))


@pytest.mark.slow
def test_one_program_runs_chunks_of_every_length(small_dataset):
  """`train_chunks` trains rows start .. stop-1 with run-time bounds: chunks (0, 3), (3, 4) and
  (4, 10) compile one program and train what one chunk (0, 10) trains."""
  model = models.create_model('mlp', norm='batch', hidden=(6,), dropout=0.2)
  data_ = host.DeviceData.put(small_dataset)
  order = np.stack([host.epoch_order(0, 0, num_examples=300, batch_size=32, num_rows=10)])
  rngs = jax.random.split(jax.random.key(1), 1)
  fresh = lambda: train.init_states(model, jax.random.split(jax.random.key(0), 1), 1e-3)
  compiled = train.train_chunks._cache_size()
  whole, whole_sums = train.train_chunks(fresh(), data_.arrays, order, rngs, 0, 10)
  states, count = fresh(), 0.0
  for start, stop in ((0, 3), (3, 4), (4, 10)):
    states, sums = train.train_chunks(states, data_.arrays, order, rngs, start, stop)
    count += float(sums['count'][0])
  assert train.train_chunks._cache_size() == compiled + 1
  assert int(states.step[0]) == int(whole.step[0]) == 10
  assert count == float(whole_sums['count'][0]) == 300  # 9 batches of 32, then 12
  _assert_trees_close((states.params, states.batch_stats), (whole.params, whole.batch_stats),
                      rtol=1e-6, atol=1e-7)


def test_unknown_augment_is_refused():
  model = models.create_model('mlp', hidden=(4,))
  with pytest.raises(ValueError, match="unknown augment 'flip': choose one of"):
    train.create_train_state(model, jax.random.key(0), 1e-3, augment='flip')


@pytest.mark.slow
def test_init_and_evaluation_programs_are_shared_across_optimizers(small_dataset):
  """Configurations that differ only in optimizer (or schedule, batch size) compile one init
  and one eval program, and init_states gives create_train_state's numbers."""
  from bn_jax import optim  # pylint: disable=g-import-not-at-top
  model = models.create_model('mlp', norm='batch', hidden=(7,))
  rngs = jax.random.split(jax.random.key(3), 2)
  data_ = host.DeviceData.put(small_dataset)
  rows = host.index_rows(np.arange(40), 20)
  inits, evals = train.init_variables._cache_size(), train.evaluate_seeds._cache_size()
  for name in ('adam', 'momentum', 'sgd'):
    states = train.init_states(model, rngs, 0.1, tx=optim.make_optimizer(name, learning_rate=0.1))
    train.evaluate_seeds(train.without_optimizer(states), data_.arrays, rows)
  assert train.init_variables._cache_size() == inits + 1
  assert train.evaluate_seeds._cache_size() == evals + 1
  one = train.create_train_state(model, rngs[1], 0.1)
  for a, b in zip(jax.tree.leaves((one.params, one.batch_stats)),
                  jax.tree.leaves((states.params, states.batch_stats))):
    np.testing.assert_array_equal(a, b[1])


@pytest.mark.slow
def test_loss_scaling_at_scale_one_is_the_plain_step(small_dataset):
  from flax.training import dynamic_scale  # pylint: disable=g-import-not-at-top
  state = _state(hidden=(8,))
  batch = _batch(small_dataset, 16)
  plain, _ = train.train_step(state, batch, jax.random.key(1))
  scaled, _ = train.train_step(state.replace(dynamic_scale=dynamic_scale.DynamicScale(scale=1.0)),
                               batch, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, (plain.params, plain.opt_state),
               (scaled.params, scaled.opt_state))
  assert int(scaled.dynamic_scale.fin_steps) == 1  # one finite step counted


@pytest.mark.slow
def test_an_overflowing_float16_step_changes_only_the_scale(small_dataset):
  from flax.training import dynamic_scale  # pylint: disable=g-import-not-at-top
  model = models.create_model('mlp', norm='batch', hidden=(8,), dtype=np.float16)
  state = train.create_train_state(model, jax.random.key(0), 1e-3, loss_scale=True)
  assert float(state.dynamic_scale.scale) == 2.0**16  # Flax's default start
  huge = state.replace(dynamic_scale=dynamic_scale.DynamicScale(scale=2.0**100))
  after, _ = jax.jit(train.train_step)(huge, _batch(small_dataset, 16), jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (huge.params, huge.opt_state))  # the inf gradient was not applied
  assert float(after.dynamic_scale.scale) == 2.0**99 and int(after.step) == 1


def test_float16_training_with_loss_scaling_lowers_the_loss(small_dataset):
  from bn_jax import loop  # pylint: disable=g-import-not-at-top
  model = models.create_model('mlp', norm='batch', hidden=(32,), dtype=np.float16)
  results, states = loop.fit(model, small_dataset, seeds=(0,), batch_size=32, epochs=3,
                             progress=False, loss_scale=True)
  losses = [h['train_loss'] for h in results[0]['history']]
  assert losses[-1] < losses[0] and np.isfinite(losses).all()
  assert states.dynamic_scale.scale.dtype == np.float32
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(states.params))


def test_create_train_state_needs_a_rate_only_without_an_optimizer():
  model = models.create_model('mlp', norm='batch', hidden=(4,))
  tx = optim.make_optimizer('sgd', learning_rate=0.1)
  state = train.create_train_state(model, jax.random.key(0), tx=tx)
  assert float(state.opt_state.hyperparams['learning_rate']) == pytest.approx(0.1)
  with pytest.raises(ValueError, match='needs learning_rate .* or tx'):
    train.create_train_state(model, jax.random.key(0))
