"""Checkpoints: exact resumption after a fault, fallback from a corrupt checkpoint."""

import logging
import os

import jax
import numpy as np
import pytest

from bn_jax import checkpoint
from bn_jax import loop
from bn_jax import models
from bn_jax import train


class FailAfter(train.OneDevice):
  """Runs like one device, but raises (a stand-in for a crash) on chunk number `n + 1`."""

  def __init__(self, n):
    self.n, self.calls = n, 0

  def train_chunks(self, *args):  # pylint: disable=arguments-differ
    self.calls += 1
    if self.calls > self.n:
      raise RuntimeError('injected fault')
    return train.train_chunks(*args)


def _fit(dataset, directory, runner=train.ONE_DEVICE):
  # 300 examples, batch 32: 10 steps an epoch, evals after 5 and 10, so chunks of at most 3
  # end at 3, 5, 8, 10; 3 epochs = 30 steps.
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  data = train.DeviceData.put(dataset)
  sched = loop.Schedule(300, 32, epochs=3, chunk_steps=3, evals_per_epoch=2)
  programs = loop.compile_programs(model, data, sched, seeds=[0, 1], learning_rate=1e-3)
  return loop.fit(model, data, seeds=(0, 1), batch_size=32, epochs=3, chunk_steps=3,
                   evals_per_epoch=2, progress=False, programs=programs, runner=runner,
                   checkpointer=checkpoint.Checkpointer(directory, keep=3, every_steps=4))


def _without_seconds(results):
  return [{**r, 'history': [{k: v for k, v in h.items() if k != 'seconds'}
                            for h in r['history']], 'compile_seconds': None} for r in results]


def _assert_identical(a, b):
  (results_a, states_a), (results_b, states_b) = a, b
  jax.tree.map(np.testing.assert_array_equal, states_a, states_b)  # bit-identical on CPU
  assert _without_seconds(results_a) == _without_seconds(results_b)


@pytest.fixture(scope='module')
def uninterrupted(small_dataset, tmp_path_factory):
  return _fit(small_dataset, tmp_path_factory.mktemp('uninterrupted'))


def test_resume_after_a_fault_gives_the_uninterrupted_result(small_dataset, tmp_path,
                                                              uninterrupted):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(9))  # dies in epoch 3
  steps = sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit())
  # Chunk ends at steps 3, 5, 8, 10 | 13, 15, 18, 20 | 23 (then the fault). Saved: every 4
  # steps at a chunk boundary (5, 15) and at epoch ends (10, 20); the last 3 are kept.
  assert steps == [10, 15, 20]
  counting = FailAfter(10**6)
  resumed = _fit(small_dataset, tmp_path, runner=counting)
  assert counting.calls == 4  # only epoch 3 ran again
  _assert_identical(resumed, uninterrupted)


def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(small_dataset, tmp_path,
                                                              uninterrupted, caplog):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(7))
  newest = max(int(p) for p in os.listdir(tmp_path) if p.isdigit())
  for root, _, files in os.walk(tmp_path / str(newest)):
    for name in files:  # truncate every file of the newest checkpoint
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(0, os.path.getsize(f.name) // 3))
  counting = FailAfter(10**6)
  with caplog.at_level(logging.WARNING):
    result = _fit(small_dataset, tmp_path, runner=counting)
  assert f'checkpoint {newest} in' in caplog.text and 'cannot be restored' in caplog.text
  assert 0 < counting.calls < 12  # resumed from an older checkpoint, not from scratch
  _assert_identical(result, uninterrupted)


def test_no_restorable_checkpoint_is_a_clear_error(small_dataset, tmp_path):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(4))
  for root, _, files in os.walk(tmp_path):
    for name in files:
      if root != str(tmp_path):
        open(os.path.join(root, name), 'wb').close()
  with pytest.raises(RuntimeError, match=f'no checkpoint in {tmp_path} can be restored'):
    _fit(small_dataset, tmp_path)
