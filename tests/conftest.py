"""Shared fixtures: small generated data, never the network."""

import pytest

from bn_jax import data


@pytest.fixture(scope='session')
def small_dataset():
  """300 train / 100 val / 100 test generated examples."""
  return data.load('synthetic:400', val_fraction=0.25)
