"""One epoch on real data (Debian's dataset-fashion-mnist), when it is installed."""

import os

import pytest

from bn_jax import data
from bn_jax import loop
from bn_jax import models

FASHION = '/usr/share/datasets/fashion-mnist'


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION), reason='apt-get install dataset-fashion-mnist')
def test_one_epoch_of_the_bn_mlp_reaches_80_percent():
  ds = data.load(f'idx:{FASHION}')
  assert ds.sizes() == {'train': 54000, 'val': 6000, 'test': 10000}
  results, _ = loop.fit(models.create_model('mlp', norm='batch'), ds, seeds=(0,),
                         batch_size=32, epochs=1, progress=False)
  assert results[0]['final']['test_accuracy'] >= 0.80
