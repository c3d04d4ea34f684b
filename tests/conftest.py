"""Shared fixtures: small generated data, never the network; 8 simulated CPU devices."""

import functools
import os

# Before JAX starts: 8 CPU devices for the multi-device tests (single-device code uses one).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from bn_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from bn_jax import threefry  # pylint: disable=g-import-not-at-top,wrong-import-position

threefry.install()  # the tests run the programs the scripts run


@functools.lru_cache(maxsize=None)
def _small_dataset():
  return data.load('synthetic:400', val_fraction=0.25)


@pytest.fixture(scope='module')  # module fixtures build on it
def small_dataset():
  """300 train / 100 val / 100 test generated examples (made once per test process)."""
  return _small_dataset()
