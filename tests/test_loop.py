"""The loop: chunk size and vmapped seeds change nothing, schedules, budgets, divergence."""

import functools

import jax
import numpy as np
import pytest

from bn_jax import loop
from bn_jax import models
from bn_jax import train


def _assert_trees_close(a, b, **tol):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **tol), a, b)


def _fit(dataset, **kwargs):
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  kwargs = {'seeds': (0,), 'batch_size': 32, 'epochs': 2, 'progress': False, **kwargs}
  return loop.fit(model, dataset, **kwargs)


def test_chunk_size_does_not_change_results(small_dataset):
  # 300 examples, batch 32: 10 steps an epoch, the last one partial (12 examples).
  whole, s_whole = _fit(small_dataset, chunk_steps=0)
  for k in (1, 4):  # 4 does not divide 10: the last chunk ends in padding no-op steps
    chunked, s_k = _fit(small_dataset, chunk_steps=k)
    _assert_trees_close((s_whole.params, s_whole.batch_stats), (s_k.params, s_k.batch_stats),
                        rtol=1e-5, atol=1e-6)
    assert int(s_k.step[0]) == 2 * 10
    for a, b in zip(whole[0]['history'], chunked[0]['history']):
      for key in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy'):
        assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_vmapped_seeds_equal_seeds_run_one_at_a_time(small_dataset):
  together, s_together = _fit(small_dataset, seeds=(0, 1, 2), epochs=1)
  for i, seed in enumerate((0, 1, 2)):
    alone, s_alone = _fit(small_dataset, seeds=(seed,), epochs=1)
    pick = lambda tree, j: jax.tree.map(lambda x: x[j], tree)
    _assert_trees_close(pick(s_together.params, i), pick(s_alone.params, 0), rtol=1e-5,
                        atol=1e-6)
    assert together[i]['final']['test_accuracy'] == pytest.approx(
        alone[0]['final']['test_accuracy'], abs=1e-6)
  # Different seeds really are different runs.
  assert not np.allclose(s_together.params['Dense_0']['kernel'][0],
                         s_together.params['Dense_0']['kernel'][1])


def test_fit_history_and_final_fields(small_dataset):
  results, _ = _fit(small_dataset, epochs=3)
  (result,) = results
  assert [h['epoch'] for h in result['history']] == [1, 2, 3]
  assert result['status'] == 'ok' and result['steps_per_epoch'] == 10
  assert result['history'][-1]['val_accuracy'] > result['history'][0]['val_accuracy'] - 0.05
  assert set(result['final']) == {'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                                  'test_loss', 'test_accuracy', 'train_eval_loss',
                                  'train_eval_accuracy'}


def test_fit_rejects_bad_batch_sizes(small_dataset):
  for bad in (0, -3, 301):
    with pytest.raises(ValueError, match='batch_size must be in'):
      _fit(small_dataset, batch_size=bad)


def test_divergence_is_detected_at_a_chunk_boundary(small_dataset):
  results, _ = _fit(small_dataset, learning_rate=float('nan'), epochs=2, chunk_steps=5)
  assert results[0]['status'] == 'diverged'
  assert results[0]['diverged_at'] == {'epoch': 1, 'step': 5}
  assert len(results[0]['history']) == 1  # every seed diverged: training stopped


def test_schedule_chunks_and_eval_points():
  # 300 examples, batch 32: 10 steps an epoch; 4 evals an epoch -> chunks of 10 // 4 = 2
  # steps, evaluating after the chunks that cross 2.5, 5, 7.5 and 10 steps.
  sched = loop.Schedule(300, 32, epochs=2, evals_per_epoch=4)
  assert (sched.steps_per_epoch, sched.k, sched.chunks_per_epoch) == (10, 2, 5)
  assert [sched.evaluates_after(c) for c in range(5)] == [False, True, True, True, True]
  assert sched.total_steps == 20 and sched.num_epochs == 2
  assert [sched.examples_after(s) for s in (0, 3, 9, 10, 11, 20)] == [0, 96, 288, 300, 332, 600]
  # Chunks of 2 with 2 evals an epoch: evaluate after steps 6 (crossing 5) and 10.
  sched = loop.Schedule(300, 32, chunk_steps=2, evals_per_epoch=2)
  assert [sched.evaluates_after(c) for c in range(5)] == [False, False, True, False, True]
  budget = loop.Schedule(300, 32, epochs=5, max_steps=13)
  assert budget.total_steps == 13 and budget.num_epochs == 2
  for bad in ({'epochs': -1}, {'max_steps': -2}, {'evals_per_epoch': 0}):
    with pytest.raises(ValueError):
      loop.Schedule(300, 32, **bad)


def test_step_budget_stops_mid_epoch(small_dataset):
  results, states = _fit(small_dataset, max_steps=13, chunk_steps=4, evals_per_epoch=2)
  (result,) = results
  assert int(states.step[0]) == 13 and result['steps'] == 13
  assert len(result['history']) == 2  # epoch 1 whole, epoch 2 cut after 3 steps
  assert result['curve'][-1]['step'] == 13
  assert result['curve'][-1]['examples'] == 300 + 3 * 32
  # The epoch's validation numbers are those of its last eval point.
  assert result['history'][-1]['val_accuracy'] == result['curve'][-1]['val_accuracy']
  steps = [p['step'] for p in result['curve']]
  assert steps == sorted(set(steps)) and 10 in steps  # every epoch ends with an eval


def test_several_devices_keep_batches_whole():
  sched = loop.Schedule(300, 32, epochs=2, num_devices=8)
  assert sched.steps_per_epoch == 9 and sched.examples_per_epoch == 288
  assert sched.examples_after(10) == 288 + 32
  order = train.epoch_order(0, 0, num_examples=300, batch_size=32, num_rows=9)
  assert (order >= 0).all() and len(set(order.ravel())) == 288
