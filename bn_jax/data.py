"""Datasets: a data spec -> train / validation / test numpy arrays (files via `sources`).

`load(spec)` returns a `Dataset` of uint8 pixels shaped (N, H, W, C) (C = 1 or 3) and int32
labels, with a validation split carved from the training set by a fixed seed, so every run of
every model sees the same split. Pixels stay uint8 on the host and on the device (4x less
memory than float32); `Dataset.images` (and, on the device, `train.gather_batch`) turn them
into the model's float32 inputs through one lookup table (`Dataset.pixel_table`): pixel / 255
in [0, 1], or, with `standardize`, that minus the training split's per-channel mean, divided
by its std. TensorFlow is imported only for `tfds:` specs.
"""

import dataclasses
import functools
import hashlib
import re

import numpy as np

from bn_jax import errors
from bn_jax import sources

IMAGE_SHAPE = (28, 28, 1)  # of MNIST-format data and of `synthetic` without a shape
NUM_CLASSES = sources.NUM_CLASSES
SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train / validation / test splits: uint8 pixels (N, H, W, C) and int32 labels.

  Attributes:
    train_pixels, val_pixels, test_pixels: uint8 (N, H, W, C) arrays, C = 1 or 3.
    train_labels, val_labels, test_labels: int32 (N,) arrays.
    standardize: the model inputs are standardized per channel by the training split's
      mean and std (`channel_stats`); otherwise they are pixel / 255 in [0, 1].
  `images(split)` (or `train_images`, `val_images`, `test_images`) are the model's float32
  inputs, exactly what the train and eval steps feed it (before augmentation).
  """
  name: str
  train_pixels: np.ndarray
  train_labels: np.ndarray
  val_pixels: np.ndarray
  val_labels: np.ndarray
  test_pixels: np.ndarray
  test_labels: np.ndarray
  num_classes: int = NUM_CLASSES
  standardize: bool = False

  def __post_init__(self):
    for split in SPLITS:
      pixels = getattr(self, f'{split}_pixels')
      if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != self.image_shape:
        raise errors.DataError(f'Dataset {split}_pixels: got {pixels.dtype} {pixels.shape}, expected '
                         f'uint8 (N,) + {self.image_shape} like train_pixels: pass raw pixels '
                         '(as data.load returns them), not float images.')
    if self.standardize:
      self.pixel_table()  # fails here, naming the channel, if a channel is constant

  @property
  def image_shape(self):
    return self.train_pixels.shape[1:]

  def sizes(self):
    return {split: len(getattr(self, f'{split}_labels')) for split in SPLITS}

  @functools.cached_property
  def channel_stats(self):
    """Per-channel mean and std (float32 (C,), in [0, 1] units) of the training pixels."""
    channels = self.image_shape[-1]
    counts = np.zeros((channels, 256), np.int64)  # a histogram: exact, and no float copy
    for start in range(0, len(self.train_pixels), 1024):
      block = self.train_pixels[start:start + 1024].reshape(-1, channels)
      for c in range(channels):
        counts[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256) / 255.0
    mean = counts @ values / counts.sum(1)
    std = np.sqrt(np.sum(counts * (values - mean[:, None])**2, 1) / counts.sum(1))
    return mean.astype(np.float32), std.astype(np.float32)

  @functools.cached_property
  def fingerprint(self):
    """A hash of every split's pixels and labels (16 hex digits): part of a run's identity,
    so data that changed under the same spec never re-uses runs made with the old. ~0.1 s
    for Fashion-MNIST, once per loaded dataset."""
    digest = hashlib.sha256()
    for split in SPLITS:
      for array in (getattr(self, f'{split}_pixels'), getattr(self, f'{split}_labels')):
        array = np.ascontiguousarray(array)
        digest.update(f'{split} {array.dtype} {array.shape};'.encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()[:16]

  def pixel_table(self):
    """(256, C) float32: the model input of pixel value v in channel c, at [v, c]."""
    return self._to_float(np.repeat(np.arange(256, dtype=np.uint8)[:, None],
                                    self.image_shape[-1], axis=1))

  def images(self, split, rows=None):
    """The model's float32 inputs of `split` ('train', 'val' or 'test'), or of its `rows` (any
    numpy index; only those are converted)."""
    if split not in SPLITS:
      raise errors.DataError(f'unknown split {split!r}: choose one of {SPLITS}.')
    pixels = getattr(self, f'{split}_pixels')
    return self._to_float(pixels if rows is None else pixels[rows])

  def _to_float(self, pixels):
    """uint8 (..., C) -> float32 inputs: pixel / 255, then minus the mean, over the std. The
    table and the images go through these same elementwise float32 operations, so a lookup
    in the table (on the device) gives the bits computed here (on the host)."""
    inputs = pixels.astype(np.float32) / np.float32(255)
    if self.standardize:
      mean, std = self.channel_stats
      if not std.all():
        raise errors.DataError(f'standardize: channel {int(np.argmin(std))} of the {self.name} '
                         'training images is constant (std 0), so it cannot be standardized: '
                         'set standardize=False.')
      inputs -= mean
      inputs /= std
    return inputs

  train_images = property(lambda self: self.images('train'), doc="`images('train')`.")
  val_images = property(lambda self: self.images('val'), doc="`images('val')`.")
  test_images = property(lambda self: self.images('test'), doc="`images('test')`.")


def to_inputs(pixels, table):
  """uint8 pixels (..., C) -> float32 model inputs `table[pixel, channel]` (`pixel_table`).

  How the jitted steps convert pixels (numpy arrays work too): a lookup gives exactly the bits
  of `Dataset.images`, where XLA's own `x / 255` would not (it multiplies by the reciprocal,
  which rounds differently).
  """
  return table[pixels, np.arange(table.shape[-1])]


def load(spec='tfds:mnist', *, val_fraction=0.1, split_seed=42, data_dir=None, seed=0,
         train_examples=0, standardize=False):
  """Loads a data spec (`tfds:NAME`, `idx:DIR`, `cifar:DIR` or `synthetic[:N[:HxWxC]]`) into
  a `Dataset`.

  `train_examples` > 0 keeps that many training examples (the first of the shuffled training
  part: a random subset, the same for every run); validation and test stay whole.
  `standardize`: model inputs standardized per channel by the mean and std of the training
  examples kept (after the validation split and `train_examples`).
  """
  kind, arg = parse_spec(spec)
  if kind == 'tfds':
    arrays = sources.load_tfds(arg, data_dir=data_dir)
  elif kind == 'idx':
    arrays = sources.load_idx(arg)
  elif kind == 'cifar':
    arrays = sources.load_cifar(arg)
  else:
    num, shape = arg
    arrays = synthetic(num_train=num, num_test=num // 4, seed=seed, shape=shape)
  (x_train, y_train), (x_test, y_test) = arrays
  x_train = _check_arrays(f'{spec} train', x_train, y_train)
  x_test = _check_arrays(f'{spec} test', x_test, y_test)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise errors.DataError(f'{spec}: train images are {x_train.shape[1:]} but test images '
                     f'{x_test.shape[1:]}; both splits need one image shape.')
  (x_train, y_train), (x_val, y_val) = split_validation(
      x_train, y_train, val_fraction=val_fraction, seed=split_seed)
  if train_examples:
    if not 0 < train_examples <= len(y_train):
      raise errors.DataError(f'train_examples must be in [1, {len(y_train)}] (the training examples '
                       f'of {spec} after the validation split), got {train_examples}; 0 keeps '
                       'them all.')
    x_train, y_train = x_train[:train_examples], y_train[:train_examples]
  return Dataset(spec, x_train, y_train.astype(np.int32), x_val, y_val.astype(np.int32),
                 x_test, y_test.astype(np.int32), standardize=standardize)


SPEC_FORMS = ('`tfds:NAME` (e.g. tfds:mnist, tfds:cifar10), `idx:DIR` (MNIST-format files), '
              '`cifar:DIR` (the CIFAR-10 python version, cifar-10-batches-py) or '
              '`synthetic[:N[:HxWxC]]` (N >= 8 generated examples, default 2000, of H x W '
              'pixels and C = 1 or 3 channels, default 28x28x1; e.g. synthetic:2000:32x32x3)')


def parse_spec(spec):
  """A data spec -> (kind, argument): ('tfds', NAME), ('idx', DIR), ('cifar', DIR) or
  ('synthetic', (N, (H, W, C)))."""
  if not isinstance(spec, str):
    raise errors.DataError(f'data spec must be a string, got {spec!r}: use {SPEC_FORMS}.')
  kind, _, arg = spec.partition(':')
  if kind in ('tfds', 'idx', 'cifar') and arg:
    return kind, arg
  if kind == 'synthetic':
    if not arg:
      return kind, (2000, IMAGE_SHAPE)
    match = re.fullmatch(r'(\d+)(?::(\d+)x(\d+)x(\d+))?', arg)
    if match:
      num = int(match[1])
      shape = tuple(int(d) for d in match.groups()[1:]) if match[2] else IMAGE_SHAPE
      if num >= 8 and shape[0] >= 1 and shape[1] >= 1 and shape[2] in (1, 3):
        return kind, (num, shape)
  raise errors.DataError(f'unknown data spec {spec!r}: use {SPEC_FORMS}.')


def split_validation(images, labels, *, val_fraction=0.1, seed=42):
  """Shuffles with a fixed seed and holds out `val_fraction` of the examples."""
  if not 0 <= val_fraction < 1:
    raise errors.DataError(f'val_fraction must be in [0, 1), got {val_fraction}')
  n = len(labels)
  n_val = int(round(n * val_fraction))
  order = np.random.default_rng(seed).permutation(n)
  val, train = order[:n_val], order[n_val:]
  return (images[train], labels[train]), (images[val], labels[val])


def _check_arrays(what, images, labels):
  """Checks a split's arrays; returns its images with a channel axis, (N, H, W, C)."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:  # grey images without a channel axis
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.DataError(f'{what}: images have shape {images.shape[1:]}, expected (H, W) or '
                     '(H, W, C) with C = 1 (grey) or 3 (RGB).')
  if images.dtype != np.uint8:
    raise errors.DataError(f'{what}: images are {images.dtype}, expected uint8 pixels (0 .. 255).')
  if len(images) != len(labels):
    raise errors.DataError(f'{what}: {len(images)} images but {len(labels)} labels.')
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise errors.DataError(f'{what}: labels must be in [0, {NUM_CLASSES}), found '
                     f'[{labels.min()}, {labels.max()}].')
  return images


# --- Generated data --------------------------------------------------------------------------

def synthetic(*, num_train=2000, num_test=500, seed=0, contrast=0.2, noise=0.5,
              shape=IMAGE_SHAPE):
  """Learnable generated data: a blocky random pattern per class (4x4-pixel blocks), plus
  pixel noise; uint8 images of `shape` (H, W, C).

  Patterns vary by +-`contrast` around grey 0.5 under Gaussian noise of std `noise`, so the
  classes overlap and accuracy climbs over epochs rather than saturating at once.
  """
  height, width, channels = shape
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, size=(NUM_CLASSES, -(-height // 4), -(-width // 4), channels))
  blocks = np.kron(coarse, np.ones((1, 4, 4, 1)))[:, :height, :width]
  prototypes = 0.5 + contrast * blocks  # (10, H, W, C)

  def sample(n):
    labels = rng.integers(0, NUM_CLASSES, size=n)
    images = prototypes[labels] + noise * rng.standard_normal((n,) + tuple(shape))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels

  return sample(num_train), sample(num_test)
