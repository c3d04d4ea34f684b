"""Data sources: splits, IDX files (round trip and corruption), TFDS (mocked), generated data."""

import os
import socket
import time

import numpy as np
import pytest

from bn_jax import data


def _write_idx_dir(directory, n_train=30, n_test=10, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      'train_images': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      'train_labels': rng.integers(0, 10, n_train).astype(np.uint8),
      'test_images': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      'test_labels': rng.integers(0, 10, n_test).astype(np.uint8),
  }
  for key, stem in data.IDX_FILES.items():
    data.write_idx(os.path.join(directory, stem + ('.gz' if gz else '')), arrays[key])
  return arrays


@pytest.mark.parametrize('gz', [True, False])
def test_idx_round_trip(tmp_path, gz):
  arrays = _write_idx_dir(tmp_path, gz=gz)
  ds = data.load(f'idx:{tmp_path}', val_fraction=0.2, split_seed=7)
  assert ds.sizes() == {'train': 24, 'val': 6, 'test': 10}
  assert ds.test_images.shape == (10, 28, 28, 1) and ds.test_images.dtype == np.float32
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays['test_images'] / np.float32(255))
  np.testing.assert_array_equal(ds.test_labels, arrays['test_labels'])
  # The split is a permutation of the training set: every example lands in exactly one part.
  order = np.random.default_rng(7).permutation(30)
  np.testing.assert_array_equal(ds.val_labels, arrays['train_labels'][order[:6]])
  np.testing.assert_array_equal(ds.train_labels, arrays['train_labels'][order[6:]])


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


def test_bad_magic_number_names_the_file(tmp_path):
  _write_idx_dir(tmp_path, gz=False)
  path = os.path.join(tmp_path, 'train-labels-idx1-ubyte')
  raw = bytearray(open(path, 'rb').read())
  raw[2] = 0x09  # dtype code 0x09 (signed byte) is not MNIST's unsigned byte
  open(path, 'wb').write(bytes(raw))
  with pytest.raises(ValueError, match='train-labels-idx1-ubyte has a bad magic number'):
    data.load(f'idx:{tmp_path}')


def test_truncated_file_names_the_file(tmp_path):
  _write_idx_dir(tmp_path, gz=False)
  path = os.path.join(tmp_path, 't10k-images-idx3-ubyte')
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[:-100])
  with pytest.raises(ValueError, match='t10k-images-idx3-ubyte holds .* truncated or corrupt'):
    data.load(f'idx:{tmp_path}')


def test_truncated_gzip_names_the_file(tmp_path):
  _write_idx_dir(tmp_path, gz=True)
  path = os.path.join(tmp_path, 'train-images-idx3-ubyte.gz')
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match='cannot read IDX file .*train-images-idx3-ubyte.gz'):
    data.load(f'idx:{tmp_path}')


def test_missing_file_and_directory(tmp_path):
  _write_idx_dir(tmp_path)
  os.remove(os.path.join(tmp_path, 't10k-labels-idx1-ubyte.gz'))
  with pytest.raises(FileNotFoundError, match=r'missing t10k-labels-idx1-ubyte\[.gz\]'):
    data.load(f'idx:{tmp_path}')
  with pytest.raises(FileNotFoundError, match='does not exist.*dataset-fashion-mnist'):
    data.load(f'idx:{tmp_path}/nope')


def test_labels_out_of_range_and_count_mismatch(tmp_path):
  arrays = _write_idx_dir(tmp_path, gz=False)
  data.write_idx(os.path.join(tmp_path, 'train-labels-idx1-ubyte'),
                 np.full(30, 12, np.uint8))
  with pytest.raises(ValueError, match=r'labels must be in \[0, 10\), found \[12, 12\]'):
    data.load(f'idx:{tmp_path}')
  data.write_idx(os.path.join(tmp_path, 'train-labels-idx1-ubyte'), arrays['train_labels'][:29])
  with pytest.raises(ValueError, match='30 train images but 29 labels'):
    data.load(f'idx:{tmp_path}')


def test_unknown_spec():
  with pytest.raises(ValueError, match="unknown data spec 'mnist'.*tfds:NAME"):
    data.load('mnist')


def test_tfds_through_mock_data(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(data, '_reachable', lambda *a, **k: True)  # mock_data stands in for it
  with tfds.testing.mock_data(num_examples=40):
    ds = data.load('tfds:mnist')
  assert ds.sizes() == {'train': 36, 'val': 4, 'test': 40}
  assert ds.train_images.shape == (36, 28, 28, 1) and ds.train_images.dtype == np.float32
  assert 0 <= ds.train_images.min() and ds.train_images.max() <= 1
  assert ds.train_labels.dtype == np.int32


def test_tfds_offline_fails_fast_with_the_offline_options(monkeypatch, tmp_path):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(data, '_reachable', lambda *a, **k: False)
  start = time.monotonic()
  with pytest.raises(RuntimeError, match='network is unreachable.*idx:.*synthetic'):
    data.load('tfds:mnist', data_dir=str(tmp_path))
  assert time.monotonic() - start < 30


def test_reachability_probe_honours_its_timeout():
  with socket.socket() as s:  # a loopback port that nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  assert not data._reachable('127.0.0.1', port, timeout=2)  # pylint: disable=protected-access
  assert time.monotonic() - start < 5
