"""The unrolled CPU lowering of JAX's threefry hash: the published test vectors, the lowering
in use, and the same bits as JAX's own CPU lowering (a process without bn_jax)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from _limits import HANG_SECONDS
from bn_jax import threefry

# Known-answer vectors of Threefry-2x32-20 from Random123 (Salmon et al. 2011): key, counter
# -> hashed words.
VECTORS = [((0, 0), (0, 0), (0x6b200159, 0x99ba4efe)),
           ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
           ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0))]

# Random draws in the shapes bn_jax makes them: keys folded with a step, split, a vmapped
# fold_in over seeds, the dropout mask's bits, an odd-sized normal (parameter init).
DRAWS = """
import jax, jax.numpy as jnp
key = jax.random.fold_in(jax.random.key(3), 1234)
keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(5))
draws = {
    'split': jax.random.key_data(jax.random.split(key, 3)),
    'bits': jax.random.bits(keys[2], (16, 128)),
    'bernoulli': jax.vmap(lambda k: jax.random.bernoulli(k, 0.8, (7, 9)))(keys),
    'normal': jax.random.normal(key, (13, 11)),
}
draws = {name: d.tolist() for name, d in draws.items()}
"""


def test_published_vectors_directly_and_through_jax_random():
  for key, count, expected in VECTORS:
    # numpy arrays: uint32 sums wrap silently (numpy scalars would warn on every overflow)
    words = threefry.threefry2x32(*(np.array([v], np.uint32) for v in key + count))
    assert [int(w[0]) for w in words] == list(expected)
    # jax's own entry point, compiled for the CPU: it runs the registered lowering.
    hashed = jax.jit(threefry_2x32)(np.uint32(key), np.uint32(count))
    assert [int(w) for w in hashed] == list(expected)


def test_cpu_programs_hash_without_a_loop():
  hlo = jax.jit(lambda k: jax.random.bits(k, (16, 128))).lower(
      jax.random.key(0)).compile().as_text()
  assert jax.default_backend() != 'cpu' or ' while(' not in hlo  # JAX's CPU lowering loops


@pytest.mark.slow
def test_same_bits_as_jax_without_bn_jax():
  scope = {}
  exec(DRAWS, scope)  # pylint: disable=exec-used
  ours = scope['draws']
  code = 'import json\n' + DRAWS + 'print(json.dumps(draws))'
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=HANG_SECONDS, check=True)
  theirs = json.loads(run.stdout)
  assert set(ours) == set(theirs)
  for name in ours:
    np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(theirs[name]),
                                  err_msg=name)
  assert np.asarray(ours['normal']).std() > 0.5  # real draws, not a constant


@pytest.mark.slow
def test_importing_bn_jax_changes_nothing_global():
  """`import bn_jax` (every module) loads no plotting, checkpoint, statistics or TensorFlow
  library and leaves JAX's CPU lowering of threefry as it was (a loop); `install()` then
  replaces it."""
  code = textwrap.dedent('''
      import sys, jax
      import bn_jax
      from bn_jax import checkpoint, claims, cli, loop, papers, report, sweep, verdicts
      heavy = [m for m in ('matplotlib', 'orbax.checkpoint', 'scipy', 'tensorboardX',
                           'tensorflow') if m in sys.modules]
      bits = lambda: jax.jit(lambda k: jax.random.bits(k, (16, 128))).lower(
          jax.random.key(0)).compile().as_text()
      before = ' while(' in bits()
      bn_jax.threefry.install()
      jax.clear_caches()
      print(heavy, before, ' while(' in bits())
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=HANG_SECONDS, check=True, env=env)
  assert run.stdout.split() == ['[]', 'True', 'False']
