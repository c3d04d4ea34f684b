"""Data files -> numpy arrays: MNIST-format IDX files, the CIFAR-10 python version, and TFDS.

Each reader validates what it reads and fails with one line naming the file and the fix; each
returns ((x_train, y_train), (x_test, y_test)) for `data.load`, which checks shapes and labels
and splits off validation. TensorFlow is imported only by `load_tfds`.
"""

import gzip
import os
import pickle
import socket
import struct
import threading

from absl import logging as absl_logging
import numpy as np

from bn_jax import errors

NUM_CLASSES = 10  # every dataset here (MNIST, Fashion-MNIST, CIFAR-10, synthetic)
IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
CIFAR_TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR_TEST_FILE = 'test_batch'
CIFAR_HELP = ('Get the CIFAR-10 python version (cifar-10-python.tar.gz from '
              'https://www.cs.toronto.edu/~kriz/cifar.html), extract it and pass '
              '`--config.data=cifar:DIR/cifar-10-batches-py`.')
OFFLINE_HELP = (
    'Offline options: (1) install the MNIST-format files, e.g. `apt-get install -y '
    'dataset-fashion-mnist`, and pass `--config.data=idx:/usr/share/datasets/fashion-mnist`; '
    '(2) pass `--config.data=synthetic` for generated data; (3) prepare the TFDS dataset on a '
    'machine with network and point `--config.data_dir` at its TFDS data directory.')


# --- IDX (the MNIST file format) -------------------------------------------------------------

def read_idx(path):
  """Reads one IDX file (gzipped or not) into a uint8 array, validating its header."""
  if not os.path.exists(path):
    raise errors.DataNotFound(f'IDX file not found: {path}')
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # e.g. a truncated or corrupt gzip stream
    raise errors.DataError(f'cannot read IDX file {path}: {e}') from e
  if len(raw) < 4:
    raise errors.DataError(f'IDX file {path} is truncated: {len(raw)} bytes, no header.')
  zero, dtype_code, ndim = struct.unpack('>HBB', raw[:4])
  if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
    raise errors.DataError(f'IDX file {path} has a bad magic number 0x{raw[:4].hex()}: expected '
                     '0x00000801 (labels) or 0x00000803 (images) for unsigned bytes.')
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise errors.DataError(f'IDX file {path} is truncated inside its header.')
  dims = struct.unpack(f'>{ndim}I', raw[4:header])
  expected = int(np.prod(dims))
  if len(raw) - header != expected:
    raise errors.DataError(f'IDX file {path} holds {len(raw) - header} data bytes but its header '
                     f'{dims} says {expected}: the file is truncated or corrupt.')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def write_idx(path, array):
  """Writes a uint8 array as an IDX file (gzipped if the path ends in .gz)."""
  array = np.asarray(array, np.uint8)
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I',
                                                                  *array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def load_idx(directory):
  """Loads the four MNIST-format files of `directory` -> ((x_train, y_train), (x_test, y_test))."""
  if not os.path.isdir(directory):
    raise errors.DataNotFound(f'idx: directory {directory!r} does not exist. ' + OFFLINE_HELP)
  arrays = {}
  for key, stem in IDX_FILES.items():
    candidates = [os.path.join(directory, stem + ext) for ext in ('', '.gz')]
    found = [p for p in candidates if os.path.exists(p)]
    if not found:
      raise errors.DataNotFound(f'idx: missing {stem}[.gz] in {directory}; an MNIST-format '
                              f'directory holds {", ".join(IDX_FILES.values())} (gzipped or not).')
    arrays[key] = read_idx(found[0])
    expected_ndim = 3 if key.endswith('images') else 1
    if arrays[key].ndim != expected_ndim:
      raise errors.DataError(f'idx: {found[0]} has {arrays[key].ndim} dimensions, expected '
                       f'{expected_ndim} for {key.replace("_", " ")}.')
  for split in ('train', 'test'):
    n_images, n_labels = len(arrays[f'{split}_images']), len(arrays[f'{split}_labels'])
    if n_images != n_labels:
      raise errors.DataError(f'idx: {directory} has {n_images} {split} images but {n_labels} labels.')
  return ((arrays['train_images'], arrays['train_labels']),
          (arrays['test_images'], arrays['test_labels']))


# --- CIFAR-10 (the python version) -------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only: a pickle can call any global it names,
  so exactly the globals a pickled numpy array needs may load (under numpy 1 and 2 names)."""
  ALLOWED = frozenset({
      ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
      *((f'{core}.multiarray', name) for core in ('numpy.core', 'numpy._core')
        for name in ('_reconstruct', 'scalar')),
      *((f'{core}.numeric', '_frombuffer') for core in ('numpy.core', 'numpy._core')),
  })

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'it names {module}.{name}, which is not part of a numpy '
                                 'array (refused: a pickle can run what it names)')


def read_cifar_batch(path):
  """Reads one CIFAR-10 python batch -> (uint8 images (n, 32, 32, 3), int64 labels (n,)).

  The file is a pickled dict: b'data' uint8 (n, 3072), each row 1024 red, 1024 green and 1024
  blue values, each channel 32x32 row-major; b'labels' a list of n ints in [0, 10).
  """
  if not os.path.exists(path):
    raise errors.DataNotFound(f'CIFAR-10 batch not found: {path}. ' + CIFAR_HELP)
  try:
    with open(path, 'rb') as f:
      batch = _ArrayUnpickler(f, encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except  # a corrupt pickle raises anything
    raise errors.DataError(f'cannot read CIFAR-10 batch {path} ({type(e).__name__}: {e}): the file '
                     'is truncated or not a CIFAR-10 python batch; extract '
                     'cifar-10-python.tar.gz again.') from e
  if not isinstance(batch, dict) or not {b'data', b'labels'} <= set(batch):
    found = (f'keys {", ".join(sorted(map(repr, batch)))}' if isinstance(batch, dict)
             else f'a {type(batch).__name__}')
    raise errors.DataError(f"CIFAR-10 batch {path} holds {found}, expected a dict with keys b'data' "
                     "and b'labels': is it a CIFAR-10 python batch (not CIFAR-100's)?")
  images, labels = batch[b'data'], np.asarray(batch[b'labels'])
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or (
      images.shape[1] != 3 * 32 * 32):
    what = (f'{images.dtype} {images.shape}' if isinstance(images, np.ndarray)
            else type(images).__name__)
    raise errors.DataError(f"CIFAR-10 batch {path}: b'data' is {what}, expected uint8 (n, 3072) "
                     '(3 channels of 32x32 pixels per row): the file is corrupt.')
  if labels.size == 0:
    labels = labels.astype(np.int64)
  if labels.ndim != 1 or labels.dtype.kind not in 'iu':
    raise errors.DataError(f"CIFAR-10 batch {path}: b'labels' is {labels.dtype} {labels.shape}, "
                     'expected a list of ints: the file is corrupt.')
  if len(labels) != len(images):
    raise errors.DataError(f'CIFAR-10 batch {path} has {len(images)} images but {len(labels)} '
                     'labels: the file is corrupt.')
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise errors.DataError(f'CIFAR-10 batch {path}: labels must be in [0, {NUM_CLASSES}), found '
                     f'[{labels.min()}, {labels.max()}]: the file is corrupt.')
  images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major -> HWC
  return np.ascontiguousarray(images), labels.astype(np.int64)


def load_cifar(directory):
  """Loads a CIFAR-10 python directory (`data_batch_1` .. `data_batch_5`, `test_batch`) ->
  ((x_train, y_train), (x_test, y_test)), images (N, 32, 32, 3) uint8."""
  if not os.path.isdir(directory):
    raise errors.DataNotFound(f'cifar: directory {directory!r} does not exist. ' + CIFAR_HELP)
  names = CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,)
  missing = [n for n in names if not os.path.exists(os.path.join(directory, n))]
  if missing:
    raise errors.DataNotFound(f'cifar: missing {", ".join(missing)} in {directory}; a CIFAR-10 '
                            f'python directory holds {", ".join(names)}. ' + CIFAR_HELP)
  train = [read_cifar_batch(os.path.join(directory, n)) for n in CIFAR_TRAIN_FILES]
  test = read_cifar_batch(os.path.join(directory, CIFAR_TEST_FILE))
  return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test


# --- TFDS ------------------------------------------------------------------------------------

def _reachable(host, port=443, timeout=10.0):
  """True if a TCP connection opens within `timeout` (DNS included)."""
  result = []

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def load_tfds(name, *, data_dir=None):
  """Loads a TFDS image dataset (uint8 images of any (H, W, C), e.g. mnist or cifar10); fails
  fast, naming offline options, when it can't download."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.DataError(f'tfds:{name} needs tensorflow-datasets (`pip install '
                      f'tensorflow-datasets tensorflow-cpu`). ' + OFFLINE_HELP) from e
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # not TFDS's warnings on folders it skips
  try:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises its own DatasetNotFoundError
      raise errors.DataError(f'unknown TFDS dataset {name!r}: {e}') from e
    prepared = builder.is_prepared()
  finally:
    absl_logging.set_verbosity(verbosity)
  if not prepared and not _reachable('storage.googleapis.com'):
    raise errors.DataNotFound(f'tfds:{name} is not prepared in {builder.data_dir_root} and the '
                              'network is unreachable, so TFDS cannot download it. ' +
                              OFFLINE_HELP)
  out = []
  for split in ('train', 'test'):
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex['image']) for ex in examples]) if examples else np.zeros(
        (0,) + tuple(builder.info.features['image'].shape), np.uint8)
    labels = np.asarray([ex['label'] for ex in examples], np.int64)
    out.append((images, labels))
  return tuple(out)
