"""Data sources: splits, IDX and CIFAR-10 files (round trip and corruption), TFDS (mocked),
generated data, uint8 pixels and their float inputs, per-channel standardization."""

import dataclasses
import os
import pickle
import socket
import threading

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
  assert ds.test_pixels.shape == (10, 28, 28, 1) and ds.test_pixels.dtype == np.uint8
  np.testing.assert_array_equal(ds.test_pixels[..., 0], arrays['test_images'])
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


@pytest.mark.parametrize('num_examples', [20, 0])  # 0: the image shape comes from TFDS' info
def test_tfds_cifar10_through_mock_data(monkeypatch, num_examples):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(data, '_reachable', lambda *a, **k: True)
  with tfds.testing.mock_data(num_examples=num_examples):
    ds = data.load('tfds:cifar10', val_fraction=0.1 if num_examples else 0.0)
  n_val = num_examples // 10
  assert ds.sizes() == {'train': num_examples - n_val, 'val': n_val, 'test': num_examples}
  assert ds.image_shape == (32, 32, 3) and ds.train_pixels.dtype == np.uint8
  assert ds.test_pixels.shape == (num_examples, 32, 32, 3)


def test_tfds_offline_fails_fast_with_the_offline_options(monkeypatch, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  probes = []
  monkeypatch.setattr(data, '_reachable', lambda *a, **k: probes.append(a) or False)

  def download(*args, **kwargs):
    raise AssertionError('tried to download')  # offline, TFDS would retry until it times out

  # "Fast" is "without trying to download", not a wall-clock limit (timings here are noisy).
  monkeypatch.setattr(tfds, 'data_source', download)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download)
  with pytest.raises(RuntimeError, match='network is unreachable.*idx:.*synthetic'):
    data.load('tfds:mnist', data_dir=str(tmp_path))
  assert probes == [('storage.googleapis.com',)]


def test_reachability_probe_honours_its_timeout(monkeypatch):
  # A connection attempt that hangs (a black-holed network): the probe returns False after
  # its own timeout instead of waiting for the attempt, which ends only when released here.
  calls, release, attempt_ended = [], threading.Event(), threading.Event()

  def hanging_connection(address, timeout=None):
    calls.append((address, timeout))
    release.wait(60)  # bounds the test if the probe wrongly waits for the attempt
    attempt_ended.set()
    raise OSError('timed out')

  monkeypatch.setattr(data.socket, 'create_connection', hanging_connection)
  try:
    assert not data._reachable('192.0.2.1', 443, timeout=0.1)  # pylint: disable=protected-access
    assert not attempt_ended.is_set()  # it returned while the attempt still hung
    assert calls == [(('192.0.2.1', 443), 0.1)]  # and gave the attempt the same timeout
  finally:
    release.set()


def test_reachability_probe_on_loopback():
  with socket.socket() as closed, socket.socket() as server:
    closed.bind(('127.0.0.1', 0))  # bound, never listening: connections are refused (and no
    server.bind(('127.0.0.1', 0))  # other socket can take the port while the test runs)
    server.listen()
    # pylint: disable=protected-access
    assert not data._reachable('127.0.0.1', closed.getsockname()[1], timeout=10)
    assert data._reachable('127.0.0.1', server.getsockname()[1], timeout=10)


# --- CIFAR-10 (python version) ---------------------------------------------------------------

CIFAR_SIZES = (2, 3, 2, 1, 2)  # examples in data_batch_1 .. 5 (the real files hold 10000)


def _cifar_batch(n, seed):
  rng = np.random.default_rng(seed)
  return {b'batch_label': b'test', b'labels': [int(x) for x in rng.integers(0, 10, n)],
          b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
          b'filenames': [b'x.png'] * n}


def _write_cifar_dir(directory, protocol=2, n_test=4):
  batches = {f'data_batch_{i + 1}': _cifar_batch(n, seed=i) for i, n in enumerate(CIFAR_SIZES)}
  batches['test_batch'] = _cifar_batch(n_test, seed=99)
  for name, batch in batches.items():
    _write_pickle(os.path.join(directory, name), batch, protocol)
  return batches


def _write_pickle(path, obj, protocol=2):
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_round_trip(tmp_path, protocol):
  batches = _write_cifar_dir(tmp_path, protocol)
  (x_train, y_train), (x_test, y_test) = data.load_cifar(str(tmp_path))
  assert x_train.shape == (10, 32, 32, 3) and x_train.dtype == np.uint8
  assert x_test.shape == (4, 32, 32, 3)
  rows = np.concatenate([batches[f'data_batch_{i}'][b'data'] for i in range(1, 6)])
  # Each row: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
  for i, row, col, channel in [(0, 0, 0, 0), (3, 5, 7, 1), (9, 31, 31, 2), (4, 0, 31, 2),
                               (7, 31, 0, 1)]:
    assert x_train[i, row, col, channel] == rows[i, channel * 1024 + row * 32 + col]
  r, c, ch = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing='ij')
  np.testing.assert_array_equal(x_train, rows[:, ch * 1024 + r * 32 + c])
  np.testing.assert_array_equal(
      y_train, sum((batches[f'data_batch_{i}'][b'labels'] for i in range(1, 6)), []))
  np.testing.assert_array_equal(y_test, batches['test_batch'][b'labels'])
  ds = data.load(f'cifar:{tmp_path}', val_fraction=0.2)
  assert ds.sizes() == {'train': 8, 'val': 2, 'test': 4} and ds.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(ds.test_pixels, x_test)


def test_cifar_missing_directory_and_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='cifar: directory .*nope.* does not exist.*'
                     'cifar-10-python.tar.gz'):
    data.load(f'cifar:{tmp_path}/nope')
  _write_cifar_dir(tmp_path)
  os.remove(os.path.join(tmp_path, 'data_batch_3'))
  with pytest.raises(FileNotFoundError, match='missing data_batch_3 in .*data_batch_1, '
                     'data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch'):
    data.load(f'cifar:{tmp_path}')


def test_cifar_truncated_or_foreign_file_names_the_file(tmp_path):
  _write_cifar_dir(tmp_path)
  path = os.path.join(tmp_path, 'test_batch')
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match='cannot read CIFAR-10 batch .*test_batch .*truncated'):
    data.load(f'cifar:{tmp_path}')
  open(path, 'wb').write(b'\x00not a pickle at all')
  with pytest.raises(ValueError, match='cannot read CIFAR-10 batch .*test_batch'):
    data.load(f'cifar:{tmp_path}')


class _Payload:
  """Unpickling it would create a directory: a stand-in for a malicious pickle."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def test_cifar_pickle_runs_no_code(tmp_path):
  _write_cifar_dir(tmp_path)
  marker = os.path.join(tmp_path, 'created')
  _write_pickle(os.path.join(tmp_path, 'data_batch_2'),
                {b'data': _Payload(marker), b'labels': []})
  with pytest.raises(ValueError, match=r'data_batch_2 .*names (posix|os|nt)\.mkdir'):
    data.load(f'cifar:{tmp_path}')
  assert not os.path.exists(marker)


@pytest.mark.parametrize('batch, message', [
    ({'data': np.zeros((2, 3072), np.uint8), 'labels': [0, 1]},
     "holds keys 'data', 'labels', expected a dict with keys b'data' and b'labels'"),
    ({b'data': np.zeros((2, 3072), np.uint8), b'fine_labels': [0, 1]},
     "expected a dict with keys b'data' and b'labels'.*CIFAR-100"),
    ([1, 2], 'holds a list, expected a dict'),
    ({b'data': np.zeros((2, 1024), np.uint8), b'labels': [0, 1]},
     "b'data' is uint8 \\(2, 1024\\), expected uint8 \\(n, 3072\\)"),
    ({b'data': np.zeros((2, 3072)), b'labels': [0, 1]}, "b'data' is float64 \\(2, 3072\\)"),
    ({b'data': b'raw bytes', b'labels': [0, 1]}, "b'data' is bytes"),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': ['a', 'b']},
     "b'labels' is <U1 \\(2,\\), expected a list of ints"),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 10]},
     'labels must be in \\[0, 10\\), found \\[0, 10\\]'),
    ({b'data': np.zeros((3, 3072), np.uint8), b'labels': [0, 1]}, 'has 3 images but 2 labels'),
])
def test_cifar_bad_batch_names_the_file(tmp_path, batch, message):
  _write_cifar_dir(tmp_path)
  _write_pickle(os.path.join(tmp_path, 'data_batch_4'), batch)
  with pytest.raises(ValueError, match=f'CIFAR-10 batch .*data_batch_4.*{message}'):
    data.load(f'cifar:{tmp_path}')


# --- Generated data ----------------------------------------------------------------------------

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
