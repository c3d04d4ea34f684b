"""Augmentation on the device: crops and flips by hand, keys from (rng, step, example) alone,
train mode only; chunking, seeds, devices and resuming leave augmented runs unchanged."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import augment
from bn_jax import checkpoint
from bn_jax import data
from bn_jax import host
from bn_jax import loop
from bn_jax import models
from bn_jax import parallel
from bn_jax import programs as programs_lib
from bn_jax import train


def _images(batch=6, height=5, width=7, channels=3):
  """Every pixel different and none zero, so each output pixel names its source."""
  return jnp.arange(1, 1 + batch * height * width * channels, dtype=jnp.float32).reshape(
      batch, height, width, channels)


def test_flip_twice_is_the_identity_and_flip_mirrors_columns():
  x = _images()
  flips = jnp.array([True, False, True, True, False, False])
  np.testing.assert_array_equal(augment.flip(augment.flip(x, flips), flips), x)
  once = np.asarray(augment.flip(x, flips))
  np.testing.assert_array_equal(once[0, :, 0], x[0, :, 6])  # column j <- column W - 1 - j
  np.testing.assert_array_equal(once[1], x[1])


def test_crop_at_the_pad_offset_is_the_image_and_other_offsets_shift_it():
  x = _images()
  np.testing.assert_array_equal(augment.pad_crop(x, jnp.full((6, 2), 4)), x)
  out = np.asarray(augment.pad_crop(x, jnp.array([[0, 0], [8, 8], [4, 6]] * 2)))
  # Offset (0, 0): the image moves 4 down and 4 right; rows and columns it left are zeros.
  np.testing.assert_array_equal(out[0, 4:, 4:], x[0, :1, :3])
  assert not out[0, :4].any() and not out[0, :, :4].any()
  # Offset (8, 8): it moves 4 up and 4 left.
  np.testing.assert_array_equal(out[1, :1, :3], x[1, 4:, 4:])
  assert not out[1, 1:].any() and not out[1, :, 3:].any()
  # Offset (4, 6): 2 left, rows in place.
  np.testing.assert_array_equal(out[2, :, :5], x[2, :, 2:])
  assert not out[2, :, 5:].any()


def test_crop_flip_is_one_of_the_padded_crops_and_flips():
  x = _images(batch=32)
  out = np.asarray(augment.crop_flip(x, jax.random.key(0)))
  padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for b in range(len(x)):
    # Every output pixel is a pixel of its own input or the zero padding ...
    assert set(out[b].ravel()) <= set(np.asarray(x[b]).ravel()) | {0.0}
    # ... and the whole image is one of the 9 x 9 crops, flipped or not.
    candidates = [c[:, ::-1] if f else c for dy in range(9) for dx in range(9)
                  for c in [padded[b, dy:dy + 5, dx:dx + 7]] for f in (False, True)]
    assert sum(np.array_equal(out[b], c) for c in candidates) >= 1


def test_offsets_cover_the_range_and_flips_are_even():
  offsets, flips = jax.vmap(lambda k: augment._draw(k, 4))(  # pylint: disable=protected-access
      jax.random.split(jax.random.key(1), 2000))
  assert set(np.asarray(offsets).ravel()) == set(range(9))
  assert 0.45 < float(flips.mean()) < 0.55


def test_crop_flip_is_deterministic_by_key_and_per_example():
  x = _images(batch=8)
  a, b = augment.crop_flip(x, jax.random.key(3)), augment.crop_flip(x, jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, augment.crop_flip(x, jax.random.key(4)))
  # Example i draws from fold_in(key, first + i): a batch split in two parts (as over devices)
  # is augmented exactly as the whole batch.
  parts = [augment.crop_flip(x[:3], jax.random.key(3)),
           augment.crop_flip(x[3:], jax.random.key(3), first=3)]
  np.testing.assert_array_equal(jnp.concatenate(parts), a)
  np.testing.assert_array_equal(augment.apply('none', x, jax.random.key(3)), x)
  with pytest.raises(ValueError, match="unknown augment 'crop'"):
    augment.apply('crop', x, jax.random.key(3))


def _state(augmentation, dropout=0.0):
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=dropout)
  return train.create_train_state(model, jax.random.key(0), 1e-3, augment=augmentation)


@pytest.mark.slow
def test_train_step_augments_anew_every_step_and_eval_never(small_dataset):
  device = host.DeviceData.put(small_dataset)
  batch = train.gather_batch(device.arrays, jnp.arange(32))
  step, rng = jax.jit(train.train_step), jax.random.key(0)
  losses = {}
  for kind in augment.AUGMENTATIONS:
    state = _state(kind)  # no dropout: only augmentation can tell two steps apart
    losses[kind] = [float(step(state.replace(step=s), batch, rng)[1]['loss']) for s in (0, 1)]
  assert losses['none'][0] == losses['none'][1]
  assert losses['crop_flip'][0] != losses['crop_flip'][1]
  assert losses['crop_flip'][0] != losses['none'][0]
  rows = host.index_rows(device.splits['val'], 50)
  plain, augmented = (jax.jit(train.evaluate)(_state(kind), device.arrays, rows)
                      for kind in augment.AUGMENTATIONS)
  jax.tree.map(np.testing.assert_array_equal, plain, augmented)


def _augmented_programs(model, device, seeds, *, batch_size, epochs, chunk_steps=0,
                        runner=host.ONE_DEVICE, **kwargs):
  """`programs_lib.compile_programs`' initial states with augment='crop_flip'."""
  sched = loop.Schedule(device.size('train'), batch_size, epochs, chunk_steps=chunk_steps,
                        num_devices=runner.num_devices, **kwargs)
  programs = programs_lib.compile_programs(model, device, sched, seeds=seeds, learning_rate=1e-3,
                                           runner=runner)
  return dataclasses.replace(programs, states=programs.states.replace(augment='crop_flip'))


def _fit(model, device, seeds=(0,), runner=host.ONE_DEVICE, **kwargs):
  kwargs = {'batch_size': 32, 'epochs': 2, **kwargs}
  programs = _augmented_programs(model, device, list(seeds), runner=runner, **kwargs)
  return loop.fit(model, device, seeds=seeds, progress=False, programs=programs,
                  runner=runner, **kwargs)


def _assert_trees_close(a, b, **tol):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **tol), a, b)


@pytest.fixture(scope='module')
def cifar_like():
  """180 training examples of 32x32 RGB: 6 steps an epoch at batch 32, the last partial."""
  return host.DeviceData.put(data.load('synthetic:200:32x32x3'))


@pytest.mark.slow
def test_cnn_on_32x32x3_chunk_size_does_not_change_augmented_results(cifar_like):
  model = models.create_model('cnn', norm='batch', features=(8, 16), dense=32, dropout=0.2)
  whole, s_whole = _fit(model, cifar_like)
  assert s_whole.augment == 'crop_flip'
  chunked, s_one = _fit(model, cifar_like, chunk_steps=1)
  _assert_trees_close((s_whole.params, s_whole.batch_stats), (s_one.params, s_one.batch_stats),
                      rtol=1e-5, atol=1e-6)
  for h_whole, h_one in zip(whole[0]['history'], chunked[0]['history']):
    assert h_whole['train_loss'] == pytest.approx(h_one['train_loss'], rel=1e-5)


@pytest.mark.slow
def test_vmapped_seeds_are_augmented_as_seeds_alone(small_dataset):
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  device = host.DeviceData.put(small_dataset)
  together, s_together = _fit(model, device, seeds=(0, 1))
  alone, s_alone = _fit(model, device, seeds=(1,))
  _assert_trees_close(jax.tree.map(lambda x: x[1], s_together.params),
                      jax.tree.map(lambda x: x[0], s_alone.params), rtol=1e-5, atol=1e-6)
  assert alone[0]['final']['test_loss'] == pytest.approx(together[1]['final']['test_loss'],
                                                         rel=1e-5)


@pytest.mark.slow
def test_augmented_run_on_4_devices_equals_one_device():
  # Sync BN, no dropout: each example is cropped and flipped alike however the batch is split.
  device_data = data.load('synthetic:400', val_fraction=0.2)  # 320 train: 10 batches of 32
  runner = parallel.DataParallel(4)
  kwargs = {'norm': 'batch', 'hidden': (16,), 'dropout': 0.0}
  _, one = _fit(models.create_model('mlp', **kwargs), host.DeviceData.put(device_data))
  _, four = _fit(models.create_model('mlp', bn_axis_name=parallel.AXIS, **kwargs),
                 host.DeviceData.put(device_data, runner), runner=runner)
  _assert_trees_close(one.params, four.params, rtol=0, atol=1e-4)  # as tests/test_parallel.py
  _assert_trees_close(one.batch_stats, four.batch_stats, rtol=0, atol=1e-5)


class _FailAfter(host.OneDevice):
  """One device that raises (a stand-in for a crash) on chunk number `n + 1`."""

  def __init__(self, n):
    self.n, self.calls = n, 0

  def train_chunks(self, *args):  # pylint: disable=arguments-differ
    self.calls += 1
    if self.calls > self.n:
      raise RuntimeError('injected fault')
    return train.train_chunks(*args)


@pytest.mark.slow
def test_resumed_augmented_run_is_bit_identical(small_dataset, tmp_path):
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  device = host.DeviceData.put(small_dataset)
  kwargs = {'batch_size': 32, 'epochs': 2, 'chunk_steps': 3}
  fit = lambda directory, runner: loop.fit(
      model, device, seeds=(0, 1), progress=False, runner=runner,
      programs=_augmented_programs(model, device, [0, 1], **kwargs),
      checkpointer=checkpoint.Checkpointer(str(directory), every_steps=4), **kwargs)
  _, whole = fit(tmp_path / 'whole', host.ONE_DEVICE)
  with pytest.raises(RuntimeError, match='injected fault'):
    fit(tmp_path / 'cut', _FailAfter(6))  # dies in epoch 2, after a checkpoint at step 10
  counting = _FailAfter(10**6)
  _, resumed = fit(tmp_path / 'cut', counting)
  assert 0 < counting.calls < 8  # resumed, not retrained from the start
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)
