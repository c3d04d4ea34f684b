"""Convolution layers for the models' `conv` argument, and the CPU forms that train fast.

A model takes its convolution as a module constructor (Flax's `conv: ModuleDef` pattern, as in
Flax's examples/imagenet), called as `self.conv(features, (3, 3), ...)`. `conv_layer(name)`
gives one by name, and `'auto'` chooses by JAX's backend, once, where the model is built
(`models.create_model`):

  'xla'      `nn.Conv` itself (`lax.conv_general_dilated` and its own gradients): GPU and TPU.
  'patches'  `nn.Conv` computed as one matmul of the kernel with the input's patches (im2col,
             `patch_conv`): the CNN on CPU.
  'forward'  `nn.Conv` whose gradients are forward convolutions too (`forward_conv`): the
             ResNet on CPU.

Why CPU needs its own forms: inside a loop body, such as the training chunk's `lax.fori_loop`,
XLA's CPU backend runs the convolutions of a gradient in slow layouts (jax-ml/jax#12868). In
the training loop on a 2-core CPU (docs/speed.md), the BN-CNN's step at batch 32 takes 12.7 ms
with patches and 128.2 ms with XLA's convolutions; ResNet-20's step at batch 128 takes 459 ms
with `forward_conv`, 598 ms with patches and 22.7 s with XLA's convolutions.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NAMES = ('auto', 'xla', 'patches', 'forward')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _plain(lhs, lhs_dilation, rhs_dilation, feature_group_count):
  """Whether a convolution is a plain 2-D NHWC one: undilated, ungrouped."""
  return (lhs.ndim == 4 and feature_group_count == 1 and
          all(d is None or set(d) == {1} for d in (lhs_dilation, rhs_dilation)))


def _explicit(padding, lhs, rhs, window_strides):
  """`padding` ('SAME', 'VALID' or pairs) as ((lo, hi), (lo, hi)) for the spatial axes."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _im2col(x, kh, kw, padding, strides=(1, 1)):
  """(B, H', W', kh*kw*C): the input under each of the kh x kw kernel taps, tap-major as a
  (kh, kw, C, O) kernel flattens, for the conv with these explicit paddings and strides."""
  x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
  sh, sw = strides
  height, width = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return jnp.concatenate(
      [x[:, i:i + (height - 1) * sh + 1:sh, j:j + (width - 1) * sw + 1:sw]
       for i in range(kh) for j in range(kw)], axis=-1)


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for what `nn.Conv` passes (NHWC inputs, HWIO kernel) as one
  2-D matmul of the kernel with the input's patches (im2col); a strided convolution takes
  strided patches. Its gradients are matmuls and pads. Dilated and grouped convolutions fall
  back to `lax.conv_general_dilated`."""
  if not _plain(lhs, lhs_dilation, rhs_dilation, feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  kh, kw, cin, cout = rhs.shape
  patches = _im2col(lhs, kh, kw, _explicit(padding, lhs, rhs, window_strides),
                    tuple(window_strides))
  out = jnp.dot(patches.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                precision=precision)
  return out.reshape(patches.shape[:3] + (cout,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_forward_grads(x, w, padding, precision):
  """A stride-1 NHWC x HWIO convolution whose gradients are forward convolutions too."""
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS,
                                  precision=precision)


def _conv_with_forward_grads_fwd(x, w, padding, precision):
  return _conv_with_forward_grads(x, w, padding, precision), (x, w)


def _conv_with_forward_grads_bwd(padding, precision, residuals, dy):
  x, w = residuals
  kh, kw = w.shape[:2]
  # dx: dy convolved with the kernel flipped in space, its in and out channels swapped.
  back = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding))
  dx = lax.conv_general_dilated(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), (1, 1), back,
                                dimension_numbers=_DIMS, precision=precision)
  # dw: the sum over examples b of x[b] correlated with dy[b], i.e. x as (C_in, H, W, B)
  # images convolved with dy as an (H', W', B, C_out) kernel: a (C_in, kh, kw, C_out) output.
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                padding, dimension_numbers=_DIMS, precision=precision)
  return dx, dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv_with_forward_grads.defvjp(_conv_with_forward_grads_fwd, _conv_with_forward_grads_bwd)


def forward_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for what `nn.Conv` passes (NHWC inputs, HWIO kernel) whose
  gradients are forward convolutions as well: the input gradient convolves the output
  gradient with the flipped kernel, the kernel gradient convolves the transposed input with
  the transposed output gradient. Strided convolutions, and paddings as wide as the kernel,
  are `patch_conv`s; dilated and grouped ones are `lax.conv_general_dilated`'s.

  A `jax.custom_vjp`: reverse-mode derivatives only (no `jax.jvp` / `jax.jacfwd`; use
  'patches' or 'xla' for forward mode).
  """
  if (not _plain(lhs, lhs_dilation, rhs_dilation, feature_group_count) or
      set(window_strides) != {1}):
    return patch_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, precision)
  padding = _explicit(padding, lhs, rhs, window_strides)
  if not all(0 <= p < k for k, pair in zip(rhs.shape[:2], padding) for p in pair):
    return patch_conv(lhs, rhs, window_strides, padding, precision=precision)
  return _conv_with_forward_grads(lhs, rhs, padding, precision)


# Module-level constructors: models built twice with the same conv compare equal (jit caches).
LAYERS = {'xla': nn.Conv,
          'patches': functools.partial(nn.Conv, conv_general_dilated=patch_conv),
          'forward': functools.partial(nn.Conv, conv_general_dilated=forward_conv)}


def conv_layer(name='auto', cpu='patches', backend=None):
  """The conv constructor `name` names; 'auto' is `cpu` on JAX's CPU backend (or `backend`),
  else 'xla'."""
  if name not in NAMES:
    raise ValueError(f'unknown conv {name!r}: choose one of {NAMES}.')
  if name == 'auto':
    name = cpu if (backend or jax.default_backend()) == 'cpu' else 'xla'
  return LAYERS[name]
