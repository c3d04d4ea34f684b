"""The step timer: models timed in turn, one entry per round, state sizes (no time asserted)."""

import pytest

from bn_jax import data as data_lib
from bn_jax import host
from bn_jax import models
from bn_jax import timing
from bn_jax import train


@pytest.mark.slow
def test_models_are_timed_in_turn_within_each_round(monkeypatch):
  data = host.DeviceData.put(data_lib.load('synthetic:64'))
  nets = {'batch': models.create_model('mlp', norm='batch', hidden=(8,)),
          'none': models.create_model('mlp', norm='none', hidden=(8,))}
  chunks, real = [], train.train_chunks

  def logged(states, *args):  # which model each timed train chunk belongs to
    chunks.append('batch' if 'BatchNorm_0' in states.params else 'none')
    return real(states, *args)

  monkeypatch.setattr(train, 'train_chunks', logged)
  times = timing.step_times(nets, data, batch_size=8, steps=3, repeats=3)
  # One warm-up chunk each, then BN and no BN alternate: round i of both is taken together.
  assert chunks == ['batch', 'none'] + ['batch', 'none'] * 3
  for name in nets:
    assert len(times[name]['train']) == len(times[name]['eval']) == 3
    assert all(t > 0 for t in times[name]['train'] + times[name]['eval'])
  # Params (784*8 kernel; BN: its scale and bias, no Dense bias; none: the Dense bias), the
  # output layer (8*10 + 10), Adam's two moments of each, BN's running mean and variance, all
  # float32, plus the optimizer's scalar step counts and rate (a few bytes).
  params = {'batch': 784 * 8 + 2 * 8 + 90, 'none': 784 * 8 + 8 + 90}
  stats = {'batch': 2 * 8, 'none': 0}
  for name in nets:
    arrays = 4 * (3 * params[name] + stats[name])
    assert 0 < times[name]['state_bytes'] - arrays <= 32
