"""The CIFAR ResNet of He et al. 2016 (§4.2, Table 6), normalized by a norm constructor.

3x3 conv (`width` channels) -> norm -> relu -> 3 stages of n basic blocks (width, 2*width,
4*width channels; the first block of stages 2 and 3 has stride 2) -> global average pool ->
Dense(num_classes); depth = 6n + 2 weighted layers (ResNet-20: n = 3, 0.27M parameters).
A basic block is conv3x3(stride) -> norm -> relu -> conv3x3 -> norm -> + shortcut -> relu, with
the paper's "option A" shortcut: the identity, or where the shape changes, the input subsampled
by the stride (`x[:, ::2, ::2]`) and zero-padded in the channels, half the new channels on each
side (as the common CIFAR implementations pad, e.g. `F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0,
planes // 4, planes // 4))`). Option A adds no parameters.

The convolutions pad by 1 on every side, as PyTorch's `padding=1`: a stride-2 conv's windows
are centred on the even pixels, the pixels the shortcut keeps (Flax's 'SAME' would pad only
at the end for stride 2 and centre them on the odd pixels). Conv kernels are Kaiming (He)
normal, fan_out mode (variance 2 / (3 * 3 * out channels), untruncated), as torchvision's
ResNets initialize them; the final Dense keeps Flax's default (LeCun normal). A conv before a
norm has no bias (`use_bias=norm is None`).

`norm` is a constructor from `norms.norm_layer` (or None), applied with the example mask by
`norms.normalize` as in the MLP and CNN, so `models.create_model('resnet', norm=...)` builds it.
`dtype=jnp.bfloat16` computes the convolutions and the Dense layer in bfloat16 (parameters,
norms and logits stay float32), as `models.CNN` does.

On CPU (`conv='auto'`) the convolutions are `forward_conv`s: XLA's CPU backend runs the
convolutions of a gradient ~30x slower inside the training loop (a `lax.fori_loop`;
jax-ml/jax#12868), as they are laid out there, but runs forward (NHWC x HWIO) convolutions
fast, so the gradients are written as forward convolutions of transposed operands.
ResNet-20, batch 128, 2-core CPU, in-loop train step (benchmarks/speed.py): `forward`
1.4-1.7x faster than im2col matmuls (`patch_conv`, the CNN's way), 35-50x faster than XLA's
own convolution gradients; stride 2 as a strided im2col rather than a stride-1 im2col then
subsampling (4x the FLOPs): ~25% faster.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import norms

CONVS = ('auto', 'forward', 'patches', 'xla')
DEPTHS = (20, 32, 44, 56, 110)  # He et al.'s Table 6 (any 6n + 2, n >= 1, builds)
# Kaiming / He normal, fan_out: variance 2 / (kh * kw * out channels).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
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
  matmul of the kernel with the input's patches (im2col), as `models.patch_conv`, strided
  convolutions included: the patches are strided slices, so a stride-2 conv costs a quarter of
  its stride-1 version. Dilated and grouped convolutions fall back to
  `lax.conv_general_dilated`."""
  if not _plain(lhs, lhs_dilation, rhs_dilation, feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  kh, kw, cin, cout = rhs.shape
  patches = _im2col(lhs, kh, kw, _explicit(padding, lhs, rhs, window_strides),
                    tuple(window_strides))
  # A 2-D matmul: with a 4-D dot_general the CNN's in-loop step was ~50% slower on CPU.
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
  the transposed output gradient. XLA's CPU backend keeps these in fast layouts also inside the
  training loop, where the convolutions of its own gradient are ~30x slower (jax-ml/jax#12868).
  Strided convolutions are `patch_conv`s (the ResNet's 2 stride-2 convs), as are paddings
  wider than the kernel; dilated and grouped ones are `lax.conv_general_dilated`'s.

  A `jax.custom_vjp`: reverse-mode derivatives only (no `jax.jvp` / `jax.jacfwd`; use
  `patch_conv` or XLA's convolutions for forward mode).
  """
  if (not _plain(lhs, lhs_dilation, rhs_dilation, feature_group_count) or
      set(window_strides) != {1}):
    return patch_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, precision)
  padding = _explicit(padding, lhs, rhs, window_strides)
  if not all(0 <= p < k for k, pair in zip(rhs.shape[:2], padding) for p in pair):
    return patch_conv(lhs, rhs, window_strides, padding, precision=precision)
  return _conv_with_forward_grads(lhs, rhs, padding, precision)


CONV_FNS = {'forward': forward_conv, 'patches': patch_conv, 'xla': None}  # None: nn.Conv's


def shortcut_a(x, features, stride):
  """He et al.'s option A shortcut: `x` itself, or where the shape changes, `x` subsampled by
  `stride` and zero-padded to `features` channels, (features - C) // 2 zero channels before
  the input's C channels and the rest after."""
  channels = x.shape[-1]
  if features < channels:
    raise ValueError(f'an option-A shortcut only adds channels: got {channels} -> {features}; '
                     'a block must keep or widen its input.')
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  if features != channels:
    before = (features - channels) // 2
    x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), (before, features - channels - before)])
  return x


def _conv3x3(features, stride, norm, conv, dtype=jnp.float32):
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=norms.resolve(norm) is None, kernel_init=KAIMING_FAN_OUT,
                 conv_general_dilated=CONV_FNS[conv], dtype=dtype)


class BasicBlock(nn.Module):
  """conv3x3(stride) -> norm -> relu -> conv3x3 -> norm -> + option-A shortcut -> relu.

  Attributes:
    features: output channels (>= the input's).
    stride: of the first conv and of the shortcut's subsampling.
    norm: a norm constructor (see `norms.norm_layer`); None: no norm, the convs have biases.
    conv: how the convs are computed: 'forward' (`forward_conv`), 'patches' (`patch_conv`) or
      'xla' (`lax.conv_general_dilated` and its own gradients).
    dtype: compute dtype of the convs (their parameters stay float32).
  """
  features: int
  stride: int = 1
  norm: Optional[Callable] = None
  conv: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    y = _conv3x3(self.features, self.stride, self.norm, self.conv, self.dtype)(x)
    y = nn.relu(norms.normalize(self.norm, y, train, mask))
    y = _conv3x3(self.features, 1, self.norm, self.conv, self.dtype)(y)
    y = norms.normalize(self.norm, y, train, mask)
    return nn.relu(y + shortcut_a(x, self.features, self.stride))


class ResNet(nn.Module):
  """The CIFAR ResNet (He et al. 2016 §4.2) of `depth` = 6n + 2 layers, option-A shortcuts.

  Takes the keywords `models.create_model` passes (`norm`), plus its own; it has no dropout,
  activation, init_scale, hidden or features. Inputs are NHWC images of any size, e.g.
  32x32x3 (CIFAR; stage 3 has 8x8 maps) or 28x28x1 (Fashion-MNIST; 7x7). Returns float32
  logits.

  Attributes:
    depth: 6n + 2 weighted layers, n basic blocks per stage (20, 32, 44, 56, 110 in the paper).
    width: channels of the first conv and stage 1; stages 2 and 3 have 2x and 4x.
    num_classes: outputs of the final Dense layer (logits).
    norm: a norm constructor (see `norms.norm_layer`); None: no norm, the convs have biases.
    conv: 'auto' ('forward' on CPU, else 'xla') | 'forward' (XLA convolutions whose gradients
      are forward convolutions too, `forward_conv`; stride 2 as `patch_conv`) | 'patches'
      (im2col matmuls, `patch_conv`, as `models.CNN` on CPU) | 'xla' (`lax.conv_general_dilated`
      and its own gradients: on CPU ~30x slower in the training loop).
    dtype: compute dtype of the convs and the Dense layer, e.g. jnp.bfloat16 (parameters,
      norms and logits stay float32).
  """
  depth: int = 20
  width: int = 16
  num_classes: int = 10
  norm: Optional[Callable] = None
  conv: str = 'auto'
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f'resnet_depth must be 6n+2 ({", ".join(map(str, DEPTHS))}), got '
                       f'{self.depth}.')
    if self.conv not in CONVS:
      raise ValueError(f'unknown conv {self.conv!r}: choose one of {CONVS}.')
    super().__post_init__()

  @property
  def blocks_per_stage(self):
    return (self.depth - 2) // 6

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    conv = self.conv
    if conv == 'auto':
      conv = 'forward' if jax.default_backend() == 'cpu' else 'xla'
    x = _conv3x3(self.width, 1, self.norm, conv, self.dtype)(x.astype(self.dtype))
    x = nn.relu(norms.normalize(self.norm, x, train, mask))
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, stride, self.norm, conv, self.dtype)(
            x, train=train, mask=mask)
    x = jnp.mean(x, axis=(1, 2))  # global average pool
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
