"""Data augmentation on the device: pure functions of a batch of model inputs and a key, run
inside the jitted train step (train mode only, never in evaluation).

`crop_flip` is the CIFAR recipe of He et al. 2016 (§4.2): pad 4 pixels on every side with
zeros, take a random crop of the original size, flip left-right with probability 1/2. The
padding is zero in the model's input units: black for [0, 1] inputs, the training mean for
standardized ones (as the paper pads its mean-subtracted images).
"""

import jax
import jax.numpy as jnp
from jax import lax

AUGMENTATIONS = ('none', 'crop_flip')
PAD = 4
# The train step's augmentation key is fold_in(its dropout key, STREAM), so augmentation
# leaves the dropout keys as they were.
STREAM = 0x61756720  # 'aug '


def check(kind):
  if kind not in AUGMENTATIONS:
    raise ValueError(f'unknown augment {kind!r}: choose one of {AUGMENTATIONS}.')


def apply(kind, images, key, first=0):
  """`images` (B, H, W, C) augmented by `kind` ('none': unchanged); example i uses the key
  fold_in(key, first + i), `first` being the batch's offset in the global batch."""
  check(kind)
  if kind == 'none':
    return images
  return crop_flip(images, key, first=first)


def crop_flip(images, key, *, pad=PAD, first=0):
  """Random `pad`-padded crop and horizontal flip of every example of `images` (B, H, W, C).

  Example i draws its offsets and flip from fold_in(key, first + i): a batch split over
  devices (`first` = a device's first example) is augmented exactly as on one device.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(len(images)))
  offsets, flips = jax.vmap(lambda k: _draw(k, pad))(keys)
  return flip(pad_crop(images, offsets, pad), flips)


def _draw(key, pad):
  """One example's crop offset (row, column), each in [0, 2 * pad], and flip (bool)."""
  crop_key, flip_key = jax.random.split(key)
  return (jax.random.randint(crop_key, (2,), 0, 2 * pad + 1),
          jax.random.bernoulli(flip_key))


def pad_crop(images, offsets, pad=PAD):
  """Each example padded by `pad` zeros on every side, then cropped to its own size at
  `offsets` (B, 2) (row, column in the padded image; (pad, pad) gives the image back)."""
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = lambda image, offset: lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


def flip(images, flips):
  """Each example of `images` (B, H, W, C) mirrored left-right where `flips` (B,) is true."""
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
