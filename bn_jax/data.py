"""Data sources -> numpy arrays: TFDS, MNIST-format IDX files, or generated data.

`load(spec)` returns a `Dataset` of float32 images in [0, 1] shaped (N, 28, 28, 1) and int32
labels, with a validation split carved from the training set by a fixed seed, so every run of
every model sees the same split. TensorFlow is imported only for `tfds:` specs.
"""

import dataclasses
import gzip
import os
import socket
import struct
import threading

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
OFFLINE_HELP = (
    'Offline options: (1) install the MNIST-format files, e.g. `apt-get install -y '
    'dataset-fashion-mnist`, and pass `--config.data=idx:/usr/share/datasets/fashion-mnist`; '
    '(2) pass `--config.data=synthetic` for generated data; (3) prepare the TFDS dataset on a '
    'machine with network and point `--config.data_dir` at its TFDS data directory.')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train / validation / test splits as numpy arrays."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int = NUM_CLASSES

  def sizes(self):
    return {'train': len(self.train_labels), 'val': len(self.val_labels),
            'test': len(self.test_labels)}


def load(spec='tfds:mnist', *, val_fraction=0.1, split_seed=42, data_dir=None, seed=0,
         train_examples=0):
  """Loads a data spec (`tfds:NAME`, `idx:DIR` or `synthetic`) into a `Dataset`.

  `train_examples` > 0 keeps that many training examples (the first of the shuffled training
  part: a random subset, the same for every run); validation and test stay whole.
  """
  kind, arg = parse_spec(spec)
  if kind == 'tfds':
    arrays = load_tfds(arg, data_dir=data_dir)
  elif kind == 'idx':
    arrays = load_idx(arg)
  else:
    arrays = synthetic(num_train=arg, num_test=arg // 4, seed=seed)
  (x_train, y_train), (x_test, y_test) = arrays
  for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
    _check_arrays(f'{spec} {split}', x, y)
  (x_train, y_train), (x_val, y_val) = split_validation(
      x_train, y_train, val_fraction=val_fraction, seed=split_seed)
  if train_examples:
    if not 0 < train_examples <= len(y_train):
      raise ValueError(f'train_examples must be in [1, {len(y_train)}] (the training examples '
                       f'of {spec} after the validation split), got {train_examples}; 0 keeps '
                       'them all.')
    x_train, y_train = x_train[:train_examples], y_train[:train_examples]
  return Dataset(spec, _to_float(x_train), y_train.astype(np.int32), _to_float(x_val),
                 y_val.astype(np.int32), _to_float(x_test), y_test.astype(np.int32))


SPEC_FORMS = ('`tfds:NAME` (e.g. tfds:mnist), `idx:DIR` (MNIST-format files) or '
              '`synthetic[:N]` (N >= 8 generated examples, default 2000)')


def parse_spec(spec):
  """A data spec -> (kind, argument): ('tfds', NAME), ('idx', DIR) or ('synthetic', N)."""
  if not isinstance(spec, str):
    raise ValueError(f'data spec must be a string, got {spec!r}: use {SPEC_FORMS}.')
  kind, _, arg = spec.partition(':')
  if kind in ('tfds', 'idx') and arg:
    return kind, arg
  if kind == 'synthetic':
    if not arg:
      return kind, 2000
    if arg.isdigit() and int(arg) >= 8:
      return kind, int(arg)
  raise ValueError(f'unknown data spec {spec!r}: use {SPEC_FORMS}.')


def split_validation(images, labels, *, val_fraction=0.1, seed=42):
  """Shuffles with a fixed seed and holds out `val_fraction` of the examples."""
  if not 0 <= val_fraction < 1:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  n = len(labels)
  n_val = int(round(n * val_fraction))
  order = np.random.default_rng(seed).permutation(n)
  val, train = order[:n_val], order[n_val:]
  return (images[train], labels[train]), (images[val], labels[val])


def _to_float(images):
  """uint8 pixels -> float32 in [0, 1], with a channel axis."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  images = images.astype(np.float32)
  return images.reshape((-1,) + IMAGE_SHAPE) if images.ndim == 3 else images


def _check_arrays(what, images, labels):
  if images.shape[1:] not in (IMAGE_SHAPE, IMAGE_SHAPE[:2]):
    raise ValueError(f'{what}: images have shape {images.shape[1:]}, expected '
                     f'{IMAGE_SHAPE[:2]} (28x28 grey images).')
  if len(images) != len(labels):
    raise ValueError(f'{what}: {len(images)} images but {len(labels)} labels.')
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f'{what}: labels must be in [0, {NUM_CLASSES}), found '
                     f'[{labels.min()}, {labels.max()}].')


# --- IDX (the MNIST file format) -------------------------------------------------------------

def read_idx(path):
  """Reads one IDX file (gzipped or not) into a uint8 array, validating its header."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'IDX file not found: {path}')
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # e.g. a truncated or corrupt gzip stream
    raise ValueError(f'cannot read IDX file {path}: {e}') from e
  if len(raw) < 4:
    raise ValueError(f'IDX file {path} is truncated: {len(raw)} bytes, no header.')
  zero, dtype_code, ndim = struct.unpack('>HBB', raw[:4])
  if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
    raise ValueError(f'IDX file {path} has a bad magic number 0x{raw[:4].hex()}: expected '
                     '0x00000801 (labels) or 0x00000803 (images) for unsigned bytes.')
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f'IDX file {path} is truncated inside its header.')
  dims = struct.unpack(f'>{ndim}I', raw[4:header])
  expected = int(np.prod(dims))
  if len(raw) - header != expected:
    raise ValueError(f'IDX file {path} holds {len(raw) - header} data bytes but its header '
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
    raise FileNotFoundError(f'idx: directory {directory!r} does not exist. ' + OFFLINE_HELP)
  arrays = {}
  for key, stem in IDX_FILES.items():
    candidates = [os.path.join(directory, stem + ext) for ext in ('', '.gz')]
    found = [p for p in candidates if os.path.exists(p)]
    if not found:
      raise FileNotFoundError(f'idx: missing {stem}[.gz] in {directory}; an MNIST-format '
                              f'directory holds {", ".join(IDX_FILES.values())} (gzipped or not).')
    arrays[key] = read_idx(found[0])
    expected_ndim = 3 if key.endswith('images') else 1
    if arrays[key].ndim != expected_ndim:
      raise ValueError(f'idx: {found[0]} has {arrays[key].ndim} dimensions, expected '
                       f'{expected_ndim} for {key.replace("_", " ")}.')
  for split in ('train', 'test'):
    n_images, n_labels = len(arrays[f'{split}_images']), len(arrays[f'{split}_labels'])
    if n_images != n_labels:
      raise ValueError(f'idx: {directory} has {n_images} {split} images but {n_labels} labels.')
  return ((arrays['train_images'], arrays['train_labels']),
          (arrays['test_images'], arrays['test_labels']))


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
  """Loads a TFDS image dataset; fails fast, naming offline options, when it can't download."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'tfds:{name} needs tensorflow-datasets (`pip install '
                      f'tensorflow-datasets tensorflow-cpu`). ' + OFFLINE_HELP) from e
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises its own DatasetNotFoundError
    raise ValueError(f'unknown TFDS dataset {name!r}: {e}') from e
  if not builder.is_prepared() and not _reachable('storage.googleapis.com'):
    raise RuntimeError(f'tfds:{name} is not prepared in {builder.data_dir_root} and the '
                       'network is unreachable, so TFDS cannot download it. ' + OFFLINE_HELP)
  out = []
  for split in ('train', 'test'):
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex['image']) for ex in examples]) if examples else np.zeros(
        (0,) + IMAGE_SHAPE, np.uint8)
    labels = np.asarray([ex['label'] for ex in examples], np.int64)
    out.append((images, labels))
  return tuple(out)


# --- Generated data --------------------------------------------------------------------------

def synthetic(*, num_train=2000, num_test=500, seed=0, contrast=0.2, noise=0.5):
  """Learnable generated data: a blocky random 28x28 pattern per class, plus pixel noise.

  Patterns vary by +-`contrast` around grey 0.5 under Gaussian noise of std `noise`, so the
  classes overlap and accuracy climbs over epochs rather than saturating at once.
  """
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, size=(NUM_CLASSES, 7, 7))
  prototypes = 0.5 + contrast * np.kron(coarse, np.ones((4, 4)))  # (10, 28, 28)

  def sample(n):
    labels = rng.integers(0, NUM_CLASSES, size=n)
    images = prototypes[labels] + noise * rng.standard_normal((n, 28, 28))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels

  return sample(num_train), sample(num_test)
