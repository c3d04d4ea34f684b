"""The host side of training: each epoch's batch order, the examples on the device
(`DeviceData`), metric means, and the runner of the seed-stacked programs on one device
(`OneDevice`; `parallel.DataParallel` is the many-device one)."""

import dataclasses
import math

import jax
import numpy as np

from bn_jax import data as datasets
from bn_jax import train


def index_rows(indices, batch_size, num_rows=None):
  """Indices -> (num_rows, batch_size) int32 rows, padded at the end with -1."""
  num_rows = num_rows or max(1, math.ceil(len(indices) / batch_size))
  rows = np.full(num_rows * batch_size, -1, np.int32)
  rows[:len(indices)] = indices
  return rows.reshape(num_rows, batch_size)


def epoch_order(seed, epoch, *, num_examples, batch_size, num_rows):
  """The epoch's shuffle as (num_rows, batch_size) indices, padded with -1.

  A function of (seed, epoch) alone, so any chunk of any epoch can be recomputed on restart.
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  # Fewer rows than examples (whole batches only): this epoch's last few examples sit out.
  return index_rows(perm[:num_rows * batch_size], batch_size, num_rows)


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """Train, validation and test examples in one set of device arrays, split by index ranges."""
  # (pixels, labels, table): uint8 (N, H, W, C) pixels and int32 labels, train first (train
  # indices are 0 .. n_train-1), and the (256, C) float32 `Dataset.pixel_table`.
  arrays: tuple
  splits: dict  # name -> np.ndarray of indices into `arrays`
  image_shape: tuple  # of one example, e.g. (28, 28, 1)

  @classmethod
  def put(cls, dataset, runner=None):
    """Puts the examples on the device (replicated on every device of `runner`)."""
    pixels = np.concatenate([getattr(dataset, f'{s}_pixels') for s in datasets.SPLITS])
    labels = np.concatenate([getattr(dataset, f'{s}_labels') for s in datasets.SPLITS])
    bounds = np.cumsum([0] + [dataset.sizes()[s] for s in datasets.SPLITS])
    splits = {name: np.arange(bounds[i], bounds[i + 1])
              for i, name in enumerate(datasets.SPLITS)}
    arrays = (pixels, labels, dataset.pixel_table())
    return cls((runner or ONE_DEVICE).put(arrays), splits, pixels.shape[1:])

  def size(self, split):
    return len(self.splits[split])


def host_inputs(arrays, rows):
  """Float32 model inputs (numpy) of examples `rows` from host copies of `DeviceData.arrays`
  (`runner.get(data.arrays)`): the inputs `gather_batch` makes on the device."""
  pixels, _, table = arrays
  return datasets.to_inputs(np.asarray(pixels)[rows], np.asarray(table))


def means(sums):
  """Metric sums (numpy, any leading axes) -> mean loss and accuracy."""
  count = np.maximum(np.asarray(sums['count']), 1.0)
  return {'loss': np.asarray(sums['loss']) / count,
          'accuracy': np.asarray(sums['correct']) / count}


class OneDevice:
  """Runs the seed-stacked programs on one device: `device`, or JAX's default one.
  `parallel.DataParallel` runs the same programs data-parallel over many devices and hosts,
  with the same methods."""
  num_devices = 1
  device = None  # JAX's default device

  def __init__(self, device=None):
    self.device = device

  def put(self, tree, split_last=False):
    """Host arrays -> device arrays (`split_last`: the batch axis, split over devices)."""
    del split_last
    return jax.device_put(tree, self.device)

  def abstract(self, shape, dtype, split_last=False):
    del split_last
    if self.device is None:
      return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=jax.sharding.SingleDeviceSharding(self.device))

  def get(self, tree):
    return jax.device_get(tree)

  train_chunks = staticmethod(train.train_chunks)
  evaluate = staticmethod(train.evaluate_seeds)


ONE_DEVICE = OneDevice()
