"""Datasets: splits, data specs, generated data, uint8 pixels and their float inputs,
per-channel standardization (the file readers: test_sources.py)."""

import dataclasses

import numpy as np
import pytest

from bn_jax import data


def test_split_is_ten_percent_and_deterministic():
  a = data.load('synthetic:1000')
  b = data.load('synthetic:1000')
  assert a.sizes() == {'train': 900, 'val': 100, 'test': 250}
  np.testing.assert_array_equal(a.val_images, b.val_images)
  c = data.load('synthetic:1000', split_seed=43)
  assert not np.array_equal(a.val_images, c.val_images)
  # Same underlying examples, only split differently.
  total = lambda d: np.sort(np.concatenate([d.train_images, d.val_images]).sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(total(a), total(c))


def test_train_examples_keeps_a_subset_of_the_training_part_only():
  whole = data.load('synthetic:1000')
  part = data.load('synthetic:1000', train_examples=300)
  assert part.sizes() == {'train': 300, 'val': 100, 'test': 250}
  np.testing.assert_array_equal(part.train_images, whole.train_images[:300])
  np.testing.assert_array_equal(part.val_images, whole.val_images)  # the same validation split
  for bad in (-1, 901):
    with pytest.raises(ValueError, match=r'train_examples must be in \[1, 900\]'):
      data.load('synthetic:1000', train_examples=bad)


def test_synthetic_is_deterministic_by_seed_and_in_range():
  a, b, c = (data.synthetic(num_train=50, num_test=10, seed=s) for s in (0, 0, 1))
  np.testing.assert_array_equal(a[0][0], b[0][0])
  assert not np.array_equal(a[0][0], c[0][0])
  ds = data.load('synthetic:100')
  assert ds.train_images.min() >= 0 and ds.train_images.max() <= 1
  assert set(np.unique(ds.train_labels)) <= set(range(10))


def test_unknown_spec():
  with pytest.raises(ValueError, match="unknown data spec 'mnist'.*tfds:NAME"):
    data.load('mnist')


def _synthetic_before_shapes(num_train, num_test, seed=0, contrast=0.2, noise=0.5):
  """The generator as it was before it took a shape (28x28 grey): the reference its
  default must still match bit for bit."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, size=(10, 7, 7))
  prototypes = 0.5 + contrast * np.kron(coarse, np.ones((4, 4)))

  def sample(n):
    labels = rng.integers(0, 10, size=n)
    images = prototypes[labels] + noise * rng.standard_normal((n, 28, 28))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels

  return sample(num_train), sample(num_test)


def test_synthetic_default_is_the_data_of_before_bit_for_bit():
  for seed in (0, 3):
    new = data.synthetic(num_train=50, num_test=12, seed=seed)
    old = _synthetic_before_shapes(50, 12, seed=seed)
    for (x_new, y_new), (x_old, y_old) in zip(new, old):
      assert x_new.shape == x_old.shape + (1,)
      np.testing.assert_array_equal(x_new[..., 0], x_old)
      np.testing.assert_array_equal(y_new, y_old)
  # ... and so are the float inputs of a loaded spec (uint8 / 255, as they were computed).
  (x_old, _), _ = _synthetic_before_shapes(400, 100)
  ds = data.load('synthetic:400', val_fraction=0.25)
  order = np.random.default_rng(42).permutation(400)
  np.testing.assert_array_equal(ds.train_images[..., 0],
                                x_old[order[100:]].astype(np.float32) / 255.0)


def test_synthetic_shapes():
  assert data.parse_spec('synthetic') == ('synthetic', (2000, (28, 28, 1)))
  assert data.parse_spec('synthetic:100') == ('synthetic', (100, (28, 28, 1)))
  assert data.parse_spec('synthetic:100:32x32x3') == ('synthetic', (100, (32, 32, 3)))
  ds = data.load('synthetic:200:30x18x3')
  assert ds.sizes() == {'train': 180, 'val': 20, 'test': 50}
  assert ds.image_shape == (30, 18, 3) and ds.train_pixels.dtype == np.uint8
  assert not np.array_equal(ds.train_pixels[..., 0], ds.train_pixels[..., 1])  # not grey
  np.testing.assert_array_equal(ds.train_pixels, data.load('synthetic:200:30x18x3').train_pixels)


@pytest.mark.parametrize('spec', ['synthetic:7', 'synthetic:abc', 'synthetic:100:32x32x2',
                                  'synthetic:100:32x32', 'synthetic:100:0x32x3',
                                  'synthetic::32x32x3', 'synthetic:100:32x32x3:',
                                  'synthetic:100:32X32X3', 'cifar:'])
def test_bad_specs_show_the_accepted_forms(spec):
  with pytest.raises(ValueError, match=r'unknown data spec .*synthetic\[:N\[:HxWxC\]\].*'
                     'e.g. synthetic:2000:32x32x3'):
    data.parse_spec(spec)


# --- Pixels, inputs, standardization ------------------------------------------------------------


def _hand_dataset(standardize):
  # Training pixels, 2 examples of 1x2 pixels, 3 channels (values / 255 per channel):
  #   channel 0: 0, 1, 0, 1              -> mean 1/2, std 1/2
  #   channel 1: 0.2, 0.2, 0.4, 0.4      -> mean 0.3, std 0.1
  #   channel 2: 0, 0, 0, 1              -> mean 1/4, std sqrt(1/4 - 1/16) = sqrt(3) / 4
  train = np.array([[[[0, 51, 0], [255, 51, 0]]], [[[0, 102, 0], [255, 102, 255]]]], np.uint8)
  other = np.full((1, 1, 2, 3), 200, np.uint8)  # validation / test: no part in the statistics
  labels = np.zeros(2, np.int32)
  return data.Dataset('hand', train, labels, other, labels[:1], other, labels[:1],
                      standardize=standardize)


def test_channel_stats_and_pixel_table_by_hand():
  ds = _hand_dataset(standardize=True)
  mean, std = ds.channel_stats
  np.testing.assert_allclose(mean, [0.5, 0.3, 0.25], rtol=1e-6)
  np.testing.assert_allclose(std, [0.5, 0.1, np.sqrt(3) / 4], rtol=1e-6)
  table = ds.pixel_table()
  assert table.shape == (256, 3) and table.dtype == np.float32
  np.testing.assert_allclose(table[[0, 255], 0], [-1, 1], rtol=1e-6)  # (0 - .5) / .5, ...
  np.testing.assert_allclose(table[[51, 102], 1], [-1, 1], rtol=1e-5)
  np.testing.assert_allclose(ds.images('train')[1, 0, 1], [1, 1, np.sqrt(3)], rtol=1e-5)
  np.testing.assert_allclose(ds.images('val')[0, 0, 0, 0], (200 / 255 - 0.5) / 0.5, rtol=1e-6)
  plain = _hand_dataset(standardize=False)
  np.testing.assert_array_equal(plain.pixel_table()[:, 2],
                                np.arange(256, dtype=np.float32) / np.float32(255))
  np.testing.assert_array_equal(plain.images('train'), plain.train_pixels / np.float32(255))


def test_standardization_uses_the_training_examples_kept():
  ds = data.load('synthetic:400:6x6x3', val_fraction=0.25, train_examples=100,
                 standardize=True)
  x = ds.train_pixels.reshape(-1, 3) / 255.0  # the 100 training examples kept, float64
  mean, std = ds.channel_stats
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(0), rtol=1e-6)
  assert not np.allclose(mean, (ds.val_pixels.reshape(-1, 3) / 255.0).mean(0), rtol=1e-6)
  inputs = ds.images('train').reshape(-1, 3)
  np.testing.assert_allclose(inputs.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(inputs.std(0), 1, rtol=1e-5)


def test_constant_channel_cannot_be_standardized():
  ds = _hand_dataset(standardize=False)
  pixels = ds.train_pixels.copy()
  pixels[..., 1] = 7
  with pytest.raises(ValueError, match='channel 1 of the hand training images is constant.*'
                     'standardize=False'):
    data.Dataset('hand', pixels, ds.train_labels, ds.val_pixels, ds.val_labels, ds.test_pixels,
                 ds.test_labels, standardize=True)


@pytest.mark.parametrize('standardize', [False, True])
def test_table_lookup_gives_the_bits_of_the_host_conversion(standardize):
  ds = data.load('synthetic:100:16x16x3', standardize=standardize)
  every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  every = dataclasses.replace(ds, test_pixels=every_value, test_labels=np.zeros(1, np.int32))
  np.testing.assert_array_equal(data.to_inputs(every_value, ds.pixel_table()),
                                every.images('test'))


def test_dataset_keeps_uint8_and_converts_rows_on_demand(small_dataset):
  assert small_dataset.train_pixels.dtype == np.uint8
  rows = np.array([5, 0, 7])
  np.testing.assert_array_equal(small_dataset.images('train', rows),
                                small_dataset.train_images[rows])
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    small_dataset.images('dev')
  with pytest.raises(ValueError, match='expected uint8 .*not float images'):
    data.Dataset('x', small_dataset.train_images, small_dataset.train_labels,
                 small_dataset.val_pixels, small_dataset.val_labels, small_dataset.test_pixels,
                 small_dataset.test_labels)


def test_images_of_mixed_shapes_or_floats_are_refused(monkeypatch):
  grey = np.zeros((10, 8, 8), np.uint8)
  monkeypatch.setattr(data, 'synthetic', lambda **k: ((grey, np.zeros(10)),
                                                      (np.zeros((4, 8, 8, 3), np.uint8),
                                                       np.zeros(4))))
  with pytest.raises(ValueError, match=r'train images are \(8, 8, 1\) but test images '
                     r'\(8, 8, 3\)'):
    data.load('synthetic:10')
  monkeypatch.setattr(data, 'synthetic', lambda **k: ((grey / 255, np.zeros(10)),) * 2)
  with pytest.raises(ValueError, match='synthetic:10 train: images are float64, expected uint8'):
    data.load('synthetic:10')
  monkeypatch.setattr(data, 'synthetic', lambda **k: ((grey[..., None].repeat(2, -1),
                                                       np.zeros(10)),) * 2)
  with pytest.raises(ValueError, match=r'images have shape \(8, 8, 2\), expected'):
    data.load('synthetic:10')
