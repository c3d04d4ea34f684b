r"""Where the ResNet-20 CPU step's time goes: one 3x3 stride-1 convolution of each stage, timed.

  python benchmarks/conv_speed.py [--batch_size=128] [--reps=10]

For ResNet-20's three stage shapes (32x32x16, 16x16x32, 8x8x64, batch 128) prints the
milliseconds of the forward convolution and of the forward + both gradients, for
`bn_jax.convs.forward_conv` (the ResNet's CPU default) and XLA's own convolution, and (with torch
installed) PyTorch's eager `Conv2d` forward and forward + backward; the forward's GFLOP/s
(2 * B * H * W * 9 * C * C FLOPs). Each jitted call runs once untimed first.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import convs
from bn_jax import threefry

STAGES = ((32, 16), (16, 32), (8, 64))  # (height = width, channels)
DIMS = ('NHWC', 'HWIO', 'NHWC')


def _ms(fn, *args, reps):
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps * 1e3


def jax_ms(conv, batch_size, size, channels, reps):
  """(forward, forward + both gradients) milliseconds of `conv` on one stage's shape."""
  x = jax.random.normal(jax.random.key(0), (batch_size, size, size, channels))
  w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.1
  forward = jax.jit(lambda x, w: conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMS))
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(forward(x, w) ** 2), argnums=(0, 1)))
  return _ms(forward, x, w, reps=reps), _ms(both, x, w, reps=reps)


def torch_ms(batch_size, size, channels, reps):
  """(forward, forward + backward) milliseconds of PyTorch's eager Conv2d; None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  x = torch.randn(batch_size, channels, size, size, requires_grad=True)
  conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)

  def timed(step):
    step()
    t0 = time.perf_counter()
    for _ in range(reps):
      step()
    return (time.perf_counter() - t0) / reps * 1e3

  with torch.no_grad():
    forward = timed(lambda: conv(x))
  return forward, timed(lambda: (conv(x) ** 2).sum().backward())


def main():
  threefry.install()  # as the experiment scripts run
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--reps', type=int, default=10)
  args = parser.parse_args()
  print(f'{jax.default_backend()}, batch {args.batch_size}: forward / forward + gradients, ms '
        '(forward GFLOP/s)')
  for size, channels in STAGES:
    flops = 2 * args.batch_size * size * size * 9 * channels * channels
    row = [f'{size}x{size}x{channels}:']
    for name, conv in (('forward_conv', convs.forward_conv),
                       ('xla', lax.conv_general_dilated)):
      fwd, both = jax_ms(conv, args.batch_size, size, channels, args.reps)
      row.append(f'{name} {fwd:.1f} / {both:.1f} ({flops / fwd / 1e6:.0f})')
    timed = torch_ms(args.batch_size, size, channels, args.reps)
    if timed:
      row.append(f'torch {timed[0]:.1f} / {timed[1]:.1f} ({flops / timed[0] / 1e6:.0f})')
    print('  '.join(row), flush=True)


if __name__ == '__main__':
  main()
