"""XLA's CPU compiler at LLVM -O1 on CPU-only installs: the same programs, compiled faster.

XLA compiles CPU programs with LLVM at -O3 (`--xla_backend_optimization_level=3`). At -O1
bn_jax's programs trained to bit-identical parameters at the same speed with about half the
compile CPU (measured on the 2-core CPU: BN-CNN 7.8 -> 4.1 s, ResNet-8 12.0 -> 6.0 s, the
batch-size grid's ten MLP train programs ~20% less), and compiling is most of a short run's
cold start on a CPU. `tests/test_xla_cpu.py` checks the same numbers.

`prefer_fast_compiles` (called by `import bn_jax`, before JAX starts its backends) adds the
flag to `XLA_FLAGS` only where JAX can run on nothing but the CPU (no accelerator plugin and
no libtpu installed, or `JAX_PLATFORMS=cpu`), and never over a level the user set:
`XLA_FLAGS=--xla_backend_optimization_level=3` keeps XLA's default.
"""

import importlib.metadata
import importlib.util
import os
import pkgutil

FLAG = '--xla_backend_optimization_level'
LEVEL = 1


def cpu_only():
  """Whether JAX can use only the CPU here: JAX_PLATFORMS=cpu, or none of the ways JAX finds
  accelerators (`jax_plugins` modules or entry points, libtpu) is installed."""
  if os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return True
  if importlib.util.find_spec('libtpu') or importlib.metadata.entry_points(group='jax_plugins'):
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def prefer_fast_compiles():
  """Adds FLAG=LEVEL to XLA_FLAGS on CPU-only installs unless XLA_FLAGS names FLAG already;
  returns whether it did."""
  flags = os.environ.get('XLA_FLAGS', '')
  if FLAG in flags or not cpu_only():
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {FLAG}={LEVEL}'.strip()
  return True
