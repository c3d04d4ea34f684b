"""JAX's threefry hash, lowered unrolled on XLA:CPU: the same bits, less compiling.

Every `jax.random` call (key split, fold_in, the dropout mask's bits, parameter init) hashes
with threefry-2x32 (20 rounds; Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2,
3"). JAX lowers it unrolled on GPU and TPU, but on CPU as a `lax.fori_loop` over its five
groups of four rounds: a small while loop inside the program, three of them in every train
step of the MLP. `install()` registers this unrolled lowering for CPU instead (public JAX API:
`jax.extend.random.threefry2x32_p`, `jax.interpreters.mlir`); the experiment scripts call it
(`cli.run`), `import bn_jax` does not. The hash is uint32
arithmetic, so every bit it gives is unchanged (`tests/test_threefry.py` checks the published
test vectors and JAX's own CPU lowering). Trained parameters came out bit for bit the same on
one device; on 8 simulated devices they differ in the last bits (same random bits, but XLA
fuses the data-parallel step differently, and summation order decides the rounding).
Measured on the 2-core CPU: compiling the batch-size grid's programs took 12.9 s of CPU
instead of 16.9 s; train steps ~3% faster.
"""

import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

# Rotation constants of the even and odd groups of rounds, and the key-schedule parity.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, d):
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key1, key2, x1, x2):
  """Threefry-2x32, 20 rounds, of counters (x1, x2) under key (key1, key2); uint32 arrays
  (broadcast together). Returns the two hashed words."""
  ks = (key1, key2, key1 ^ key2 ^ PARITY)
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for group in range(5):
    for r in ROTATIONS[group % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, r) ^ x1
    x1 = x1 + ks[(group + 1) % 3]
    x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


_installed = []


def install():
  """Registers the unrolled lowering for CPU (again: no change); programs compiled after it use
  it. Programs lowered with and without it differ (`code_version`), their random bits do not."""
  mlir.register_lowering(threefry2x32_p, mlir.lower_fun(threefry2x32, multiple_results=True),
                         platform='cpu')
  _installed.append(True)


def installed():
  """Whether this process lowers threefry unrolled (`install` was called); records keep it."""
  return bool(_installed)
