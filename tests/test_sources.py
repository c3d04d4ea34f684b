"""Data files (`bn_jax.sources`): IDX and CIFAR-10 files (round trip and corruption, each
error naming the file), TFDS (mocked) and its offline probe."""

import os
import pickle
import socket
import sys
import threading

import numpy as np
import pytest

from bn_jax import data
from bn_jax import errors
from bn_jax import sources


def _write_idx_dir(directory, n_train=30, n_test=10, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      'train_images': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      'train_labels': rng.integers(0, 10, n_train).astype(np.uint8),
      'test_images': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      'test_labels': rng.integers(0, 10, n_test).astype(np.uint8),
  }
  for key, stem in sources.IDX_FILES.items():
    sources.write_idx(os.path.join(directory, stem + ('.gz' if gz else '')), arrays[key])
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
  sources.write_idx(os.path.join(tmp_path, 'train-labels-idx1-ubyte'),
                 np.full(30, 12, np.uint8))
  with pytest.raises(ValueError, match=r'labels must be in \[0, 10\), found \[12, 12\]'):
    data.load(f'idx:{tmp_path}')
  sources.write_idx(os.path.join(tmp_path, 'train-labels-idx1-ubyte'), arrays['train_labels'][:29])
  with pytest.raises(ValueError, match='30 train images but 29 labels'):
    data.load(f'idx:{tmp_path}')


def test_tfds_through_mock_data(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(sources, '_reachable', lambda *a, **k: True)  # mock_data stands in for it
  with tfds.testing.mock_data(num_examples=40):
    ds = data.load('tfds:mnist')
  assert ds.sizes() == {'train': 36, 'val': 4, 'test': 40}
  assert ds.train_images.shape == (36, 28, 28, 1) and ds.train_images.dtype == np.float32
  assert 0 <= ds.train_images.min() and ds.train_images.max() <= 1
  assert ds.train_labels.dtype == np.int32


@pytest.mark.parametrize('num_examples', [20, 0])  # 0: the image shape comes from TFDS' info
def test_tfds_cifar10_through_mock_data(monkeypatch, num_examples):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(sources, '_reachable', lambda *a, **k: True)
  with tfds.testing.mock_data(num_examples=num_examples):
    ds = data.load('tfds:cifar10', val_fraction=0.1 if num_examples else 0.0)
  n_val = num_examples // 10
  assert ds.sizes() == {'train': num_examples - n_val, 'val': n_val, 'test': num_examples}
  assert ds.image_shape == (32, 32, 3) and ds.train_pixels.dtype == np.uint8
  assert ds.test_pixels.shape == (num_examples, 32, 32, 3)


def test_tfds_offline_fails_fast_with_the_offline_options(monkeypatch, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  probes = []
  monkeypatch.setattr(sources, '_reachable', lambda *a, **k: probes.append(a) or False)

  def download(*args, **kwargs):
    raise AssertionError('tried to download')  # offline, TFDS would retry until it times out

  # "Fast" is "without trying to download", not a wall-clock limit (timings here are noisy).
  monkeypatch.setattr(tfds, 'data_source', download)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download)
  # A user error: the scripts report it as one `error:` line, exit 2.
  with pytest.raises(errors.DataNotFound, match='network is unreachable.*idx:.*synthetic'):
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

  monkeypatch.setattr(sources.socket, 'create_connection', hanging_connection)
  try:
    assert not sources._reachable('192.0.2.1', 443, timeout=0.1)  # pylint: disable=protected-access
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
    assert not sources._reachable('127.0.0.1', closed.getsockname()[1], timeout=10)
    assert sources._reachable('127.0.0.1', server.getsockname()[1], timeout=10)


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
  (x_train, y_train), (x_test, y_test) = sources.load_cifar(str(tmp_path))
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


@pytest.mark.parametrize('module, name', [
    ('numpy.f2py.__main__', 'dtype'),  # importing it runs f2py's command-line tool
    ('numpy', 'load'), ('numpy.lib.npyio', 'load'), ('numpy.testing', 'run_module_suite'),
    ('numpy', 'fromfile'), ('builtins', 'eval'), ('os', 'system'), ('subprocess', 'Popen'),
    ('runpy', 'run_path'), ('_codecs', 'decode'),
])
def test_cifar_pickle_may_name_only_the_globals_of_an_array(tmp_path, module, name):
  _write_cifar_dir(tmp_path)
  modules_before = set(sys.modules)
  # GLOBAL opcode naming module.name, then STOP: loading it would import the module.
  open(os.path.join(tmp_path, 'data_batch_1'), 'wb').write(f'c{module}\n{name}\n.'.encode())
  with pytest.raises(ValueError) as error:
    data.load(f'cifar:{tmp_path}')
  assert str(error.value).count('\n') == 0  # one line
  assert f'data_batch_1 (UnpicklingError: it names {module}.{name}, which is not part' in str(
      error.value)
  assert not {m for m in set(sys.modules) - modules_before if m.startswith(module)}


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
