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

The convolutions are `conv`, a module constructor (`nn.Conv`, or a CPU form of it from
`bn_jax.convs`, which `models.create_model` picks by backend).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from bn_jax import norms

ModuleDef = Any
DEPTHS = (20, 32, 44, 56, 110)  # He et al.'s Table 6 (any 6n + 2, n >= 1, builds)
# Kaiming / He normal, fan_out: variance 2 / (kh * kw * out channels).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def check_depth(depth):
  """Raises ValueError unless `depth` is 6n + 2 with n >= 1."""
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f'resnet_depth must be 6n+2 ({", ".join(map(str, DEPTHS))}), got {depth}.')


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
  return conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
              use_bias=norms.resolve(norm) is None, kernel_init=KAIMING_FAN_OUT, dtype=dtype)


class BasicBlock(nn.Module):
  """conv3x3(stride) -> norm -> relu -> conv3x3 -> norm -> + option-A shortcut -> relu.

  Attributes:
    features: output channels (>= the input's).
    stride: of the first conv and of the shortcut's subsampling.
    norm: a norm constructor (see `norms.norm_layer`); None: no norm, the convs have biases.
    conv: the conv constructor, e.g. `nn.Conv` (see `bn_jax.convs`).
    dtype: compute dtype of the convs (their parameters stay float32).
  """
  features: int
  stride: int = 1
  norm: Optional[Callable] = None
  conv: ModuleDef = nn.Conv
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
    conv: the conv constructor, e.g. `nn.Conv` (`models.create_model` picks a CPU form from
      `bn_jax.convs` on CPU).
    dtype: compute dtype of the convs and the Dense layer, e.g. jnp.bfloat16 (parameters,
      norms and logits stay float32).
  """
  depth: int = 20
  width: int = 16
  num_classes: int = 10
  norm: Optional[Callable] = None
  conv: ModuleDef = nn.Conv
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_depth(self.depth)
    super().__post_init__()

  @property
  def blocks_per_stage(self):
    return (self.depth - 2) // 6

  @nn.compact
  def __call__(self, x, *, train, mask=None):
    conv = self.conv
    x = _conv3x3(self.width, 1, self.norm, conv, self.dtype)(x.astype(self.dtype))
    x = nn.relu(norms.normalize(self.norm, x, train, mask))
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, stride, self.norm, conv, self.dtype)(
            x, train=train, mask=mask)
    x = jnp.mean(x, axis=(1, 2))  # global average pool
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
