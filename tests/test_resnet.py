"""The CIFAR ResNet: parameter counts derived by hand, shapes, option-A shortcuts, the CPU
convolutions against XLA's in the model, and a train step through bn_jax.train."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import convs
from bn_jax import models
from bn_jax import norms
from bn_jax import resnet
from bn_jax import train

BN = norms.norm_layer('batch')


def _init(model, shape, seed=0):
  return model.init(jax.random.key(seed), jnp.zeros(shape, jnp.float32), train=False)


def _count(model, shape):
  """Parameters of `model` on inputs of `shape`, from shapes alone (nothing is computed)."""
  shapes = jax.eval_shape(functools.partial(_init, model, shape))['params']
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))


def _hand_count(in_channels, n=3, width=16, classes=10):
  """ResNet-(6n+2) parameters by hand: kh*kw*cin*cout per conv (no biases before BN), 2*C per
  BN (scale, bias), the dense layer's weights and biases; option A adds nothing."""
  conv = lambda cin, cout: 3 * 3 * cin * cout
  bn = lambda c: 2 * c
  total = conv(in_channels, width) + bn(width)  # the stem
  cin = width
  for stage in range(3):
    cout = width * 2**stage
    for _ in range(n):
      total += conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout)
      cin = cout
  return total + cin * classes + classes


def test_resnet20_parameter_count_by_hand_and_he_et_al():
  # Stem 3*3*3*16 + 32 = 464; stage 1: 3 * (2 * 2304 + 2 * 32) = 14016; stage 2: (4608 + 9216
  # + 128) + 2 * (2 * 9216 + 128) = 51072; stage 3: (18432 + 36864 + 256) + 2 * (2 * 36864 +
  # 256) = 203520; dense 64 * 10 + 10 = 650.
  assert _hand_count(3) == 464 + 14016 + 51072 + 203520 + 650 == 269722
  assert _hand_count(1) == 269722 - 3 * 3 * 2 * 16 == 269434
  for channels in (3, 1):
    count = _count(resnet.ResNet(norm=BN), (1, 32, 32, channels))
    assert count == _hand_count(channels)
    assert 0.265e6 <= count <= 0.275e6  # He et al., Table 6: ResNet-20 has 0.27M parameters
  deeper = _count(resnet.ResNet(depth=56, norm=BN), (1, 32, 32, 3))
  assert deeper == _hand_count(3, n=9)  # Table 6: ResNet-56 has 0.85M
  assert 0.845e6 <= _hand_count(3, n=9) <= 0.855e6


@pytest.mark.slow
@pytest.mark.parametrize('shape,last_map', [((2, 32, 32, 3), 8), ((2, 28, 28, 1), 7)])
def test_output_and_stage_shapes(shape, last_map):
  model = resnet.ResNet(norm=BN)
  variables = _init(model, shape)
  x = jax.random.uniform(jax.random.key(1), shape)
  logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
  assert logits.shape == (2, 10)
  blocks = state['intermediates']
  side = shape[1]
  for i, (size, channels) in enumerate([(side, 16)] * 3 + [(side // 2, 32)] * 3 +
                                       [(last_map, 64)] * 3):
    assert blocks[f'BasicBlock_{i}']['__call__'][0].shape == (2, size, size, channels)


def test_depth_must_be_6n_plus_2():
  with pytest.raises(ValueError, match=r'resnet_depth must be 6n\+2 \(20, 32, 44, 56, 110\), '
                     'got 21'):
    resnet.ResNet(depth=21)
  with pytest.raises(ValueError, match='got 2'):
    resnet.ResNet(depth=2)  # n = 0: no blocks
  assert resnet.ResNet(depth=32).blocks_per_stage == 5


def test_shortcut_subsamples_and_pads_half_the_new_channels_on_each_side():
  x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  out = resnet.shortcut_a(x, 6, 2)
  assert out.shape == (2, 2, 2, 6)
  # Rows / columns 0 and 2 of the 4x4 map; channels: 2 zeros, the 2 inputs, 2 zeros.
  np.testing.assert_array_equal(out[..., 2:4], x[:, 0::2, 0::2, :])
  np.testing.assert_array_equal(out[0, 1, 0, 2:4], [16, 17])  # pixel (2, 0) = 8th, times 2
  np.testing.assert_array_equal(out[..., :2], 0)
  np.testing.assert_array_equal(out[..., 4:], 0)
  np.testing.assert_array_equal(resnet.shortcut_a(x, 2, 1), x)  # same shape: the identity
  with pytest.raises(ValueError, match='only adds channels'):
    resnet.shortcut_a(x, 1, 1)


def _zero_kernels(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if path[-1].key == 'kernel' else p, params)


@pytest.mark.parametrize('norm', [BN, None])
def test_block_with_zero_kernels_outputs_relu_of_the_shortcut(norm):
  # One 4x4 map, 2 channels: channel 0 = 0..15 - 5 (row-major), channel 1 = 7 - (0..15).
  ramp = jnp.arange(16.0).reshape(4, 4)
  x = jnp.stack([ramp - 5, 7 - ramp], -1)[None]
  block = resnet.BasicBlock(features=4, stride=2, norm=norm)
  variables = block.init(jax.random.key(0), x, train=False)
  variables = {**variables, 'params': _zero_kernels(variables['params'])}
  # Pixels (0, 0), (0, 2), (2, 0), (2, 2) are entries 0, 2, 8, 10: channel 0 -> -5, -3, 3, 5;
  # channel 1 -> 7, 5, -1, -3. Padded to 4 channels: [0, ch0, ch1, 0], then relu.
  want = np.zeros((1, 2, 2, 4), np.float32)
  want[0, :, :, 1] = [[0, 0], [3, 5]]
  want[0, :, :, 2] = [[7, 5], [0, 0]]
  for is_training in (True, False):  # BN of an all-zero map is zero either way
    out, _ = block.apply(variables, x, train=is_training, mutable=['batch_stats'])
    np.testing.assert_array_equal(out, want)
  same = resnet.BasicBlock(features=2, norm=norm)
  variables = same.init(jax.random.key(0), x, train=False)
  variables = {**variables, 'params': _zero_kernels(variables['params'])}
  out, _ = same.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(out, jax.nn.relu(x))  # identity shortcut


def test_odd_maps_keep_conv_and_shortcut_shapes_equal():
  block = resnet.BasicBlock(features=4, stride=2, norm=BN)
  x = jnp.ones((1, 7, 7, 2))
  out, _ = block.apply(block.init(jax.random.key(0), x, train=False), x, train=True,
                       mutable=['batch_stats'])
  assert out.shape == (1, 4, 4, 4)


def test_convs_have_biases_only_without_norm():
  plain = _init(resnet.ResNet(depth=8, norm=None), (1, 32, 32, 3))['params']
  assert set(plain['Conv_0']) == {'kernel', 'bias'}
  assert set(plain['BasicBlock_1']['Conv_0']) == {'kernel', 'bias'}
  assert not any('BatchNorm' in name for name in plain)
  normed = _init(resnet.ResNet(depth=8, norm=BN), (1, 32, 32, 3))['params']
  assert set(normed['Conv_0']) == {'kernel'}
  assert set(normed['BasicBlock_1']['Conv_0']) == {'kernel'}
  assert set(normed['BasicBlock_1']['BatchNorm_1']) == {'scale', 'bias'}


def test_conv_kernels_are_kaiming_normal_fan_out():
  params = _init(resnet.ResNet(norm=BN), (1, 32, 32, 3))['params']
  kernel = np.asarray(params['BasicBlock_8']['Conv_1']['kernel'])  # 3x3x64x64
  std = np.sqrt(2.0 / (3 * 3 * 64))  # fan_out = kh * kw * out channels
  assert abs(kernel.std() / std - 1) < 0.03 and abs(kernel.mean()) < 0.03 * std
  assert np.abs(kernel).max() > 2.5 * std  # untruncated normal: 4.5k of 37k draws are > 2.5 std
  stem = np.asarray(params['Conv_0']['kernel'])  # 3x3x3x16: fan_out = 144, not fan_in = 27
  assert 0.7 < stem.std() / np.sqrt(2.0 / 144) < 1.3


def test_stride2_conv_windows_centre_on_the_pixels_the_shortcut_keeps():
  # A kernel that copies its centre tap: the stride-2 conv (padding 1, as PyTorch's) gives
  # x[:, ::2, ::2], the shortcut's pixels; Flax's 'SAME' would give x[:, 1::2, 1::2].
  x = jnp.arange(36.0).reshape(1, 6, 6, 1)
  w = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  conv = resnet._conv3x3(1, 2, BN, convs.LAYERS['patches'])  # pylint: disable=protected-access
  out = conv.apply({'params': {'kernel': w}}, x)
  np.testing.assert_array_equal(out, x[:, ::2, ::2])
  np.testing.assert_array_equal(out, resnet.shortcut_a(x, 1, 2))


@pytest.mark.slow
@pytest.mark.parametrize('conv', ['patches', 'forward'])
def test_cpu_convolutions_equal_xla_convolutions_with_gradients(conv):
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  labels = jnp.arange(4) % 10
  ours = resnet.ResNet(depth=8, width=4, norm=BN, conv=convs.LAYERS[conv])
  xla = resnet.ResNet(depth=8, width=4, norm=BN)  # nn.Conv: XLA's convolutions
  variables = _init(ours, x.shape, seed=1)

  def loss(model, params, train):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=train, mutable=['batch_stats'])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits

  for is_training in (True, False):
    grad = lambda model: jax.jit(jax.value_and_grad(  # pylint: disable=cell-var-from-loop
        functools.partial(loss, model, train=is_training), has_aux=True))
    (l_o, out_o), g_o = grad(ours)(variables['params'])
    (l_x, out_x), g_x = grad(xla)(variables['params'])
    np.testing.assert_allclose(out_o, out_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_o, l_x, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), g_o, g_x)


def test_create_model_picks_forward_conv_on_cpu():
  model = models.create_model('resnet', depth=8, width=4, norm=BN)
  x = jnp.ones((2, 8, 8, 3))
  jaxpr = str(jax.make_jaxpr(lambda v: jax.grad(
      lambda p: model.apply({**v, 'params': p}, x, train=False).sum())(v['params']))(
          _init(model, x.shape)))
  assert ('custom_vjp_call' in jaxpr) == (jax.default_backend() == 'cpu')


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = resnet.ResNet(depth=8, width=4, norm=BN, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  variables = _init(model, x.shape)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.float32
  full = resnet.ResNet(depth=8, width=4, norm=BN).apply(variables, x, train=False)
  np.testing.assert_allclose(logits, full, rtol=0.1, atol=0.1)
  grads = jax.jit(jax.grad(lambda p: model.apply({**variables, 'params': p}, x, train=True,
                                                 mutable=['batch_stats'])[0].sum()))(
                                                     variables['params'])
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_mask_reaches_every_norm():
  # A padded example (mask 0) must not move the outputs of the real ones in train mode.
  model = resnet.ResNet(depth=8, width=4, norm=BN)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  variables = _init(model, x.shape)
  run = lambda x, mask: model.apply(variables, x, train=True, mask=mask,
                                    mutable=['batch_stats'])
  (small, small_stats) = run(x[:3], None)
  padded, padded_stats = run(x.at[3].set(100.0), jnp.arange(4) < 3)
  np.testing.assert_allclose(padded[:3], small, rtol=1e-4, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               padded_stats, small_stats)


@pytest.mark.slow
@pytest.mark.parametrize('kind', norms.NORMS)
def test_every_norm_kind_builds_and_trains(kind):
  norm = norms.norm_layer(kind, group_size=2, groups=2)
  model = resnet.ResNet(depth=8, width=4, norm=norm)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  variables = _init(model, x.shape)
  out, _ = model.apply(variables, x, train=True, mask=jnp.arange(4) < 3,
                       mutable=['batch_stats'])
  assert out.shape == (4, 10) and np.isfinite(out).all()
  assert model.apply(variables, x, train=False).shape == (4, 10)


def test_create_model_keywords():
  if 'resnet' not in models.MODELS:
    pytest.skip("models.MODELS has no 'resnet' yet (register resnet.ResNet there)")
  built = models.create_model('resnet', norm='batch', bn_momentum=0.9, depth=32, width=8)
  assert isinstance(built, resnet.ResNet)
  assert (built.depth, built.width, built.norm.momentum) == (32, 8, 0.9)


@pytest.mark.slow
def test_train_step_runs_and_changes_params():
  model = resnet.ResNet(depth=8, width=8, norm=BN)
  state = train.create_train_state(model, jax.random.key(0), 1e-3, (1, 32, 32, 3))
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((8, 32, 32, 3), dtype=np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32), 'mask': np.arange(8) < 6}
  new, sums = jax.jit(train.train_step)(state, batch, jax.random.key(1))
  assert int(new.step) == 1 and float(sums['count']) == 6
  assert np.isfinite(float(sums['loss']))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, new.params)
  assert all(jax.tree.leaves(changed))  # Adam's first step moves every parameter
  assert np.abs(new.batch_stats['BasicBlock_0']['BatchNorm_0']['mean']).max() > 0
