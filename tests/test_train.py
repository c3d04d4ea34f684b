"""The train step's purity and masks, exact eval counts, and the chunked / vmapped loop."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import models
from bn_jax import train


def _state(norm='batch', dropout=0.0, seed=0, hidden=(16,)):
  model = models.create_model('mlp', norm=norm, hidden=hidden, dropout=dropout)
  return train.create_train_state(model, jax.random.key(seed), 1e-3)


def _batch(dataset, n, pad=0):
  image = np.concatenate([dataset.train_images[:n], np.zeros((pad, 28, 28, 1), np.float32)])
  label = np.concatenate([dataset.train_labels[:n], np.zeros(pad, np.int32)])
  return {'image': image, 'label': label, 'mask': np.arange(n + pad) < n}


def _assert_trees_close(a, b, **tol):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **tol), a, b)


def test_train_step_is_pure_and_jit_agrees(small_dataset):
  state = _state(dropout=0.2)
  before = copy.deepcopy(jax.device_get((state.params, state.batch_stats, state.opt_state)))
  batch, rng = _batch(small_dataset, 32), jax.random.key(3)
  s1, m1 = train.train_step(state, batch, rng)
  s2, m2 = train.train_step(state, batch, rng)
  jax.tree.map(np.testing.assert_array_equal, (s1.params, s1.batch_stats, m1),
               (s2.params, s2.batch_stats, m2))
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get((state.params, state.batch_stats, state.opt_state)))
  assert int(s1.step) == 1 and float(m1['count']) == 32
  # jit vs eager, compared through plain SGD: Adam's first step is lr * sign(g), which turns
  # the rounding noise of near-zero gradients into lr-sized differences.
  sgd = train.TrainState.create(apply_fn=state.apply_fn, params=state.params,
                                tx=optax.sgd(0.1), batch_stats=state.batch_stats)
  s3, m3 = train.train_step(sgd, batch, rng)
  s4, m4 = jax.jit(train.train_step)(sgd, batch, rng)
  _assert_trees_close((s3.params, s3.batch_stats, m3), (s4.params, s4.batch_stats, m4),
                      rtol=1e-5, atol=1e-6)
  # The batch statistics moved the running averages off their init (mean 0).
  assert np.abs(s1.batch_stats['Norm_0']['BatchNorm']['mean']).max() > 0


def test_dropout_mask_changes_every_step(small_dataset):
  state, batch, rng = _state(dropout=0.5), _batch(small_dataset, 32), jax.random.key(0)
  _, m0 = train.train_step(state, batch, rng)
  _, m1 = train.train_step(state.replace(step=state.step + 1), batch, rng)
  assert float(m0['loss']) != float(m1['loss'])  # same params and batch, other dropout mask


def test_padded_batch_equals_the_smaller_batch(small_dataset):
  # The last partial batch of an epoch is padded and masked: the step must equal a step on
  # the real rows alone (loss, gradients and BN statistics all ignore the padding).
  state, rng = _state(), jax.random.key(0)
  s_pad, m_pad = train.train_step(state, _batch(small_dataset, 5, pad=3), rng)
  s_small, m_small = train.train_step(state, _batch(small_dataset, 5), rng)
  _assert_trees_close((s_pad.params, s_pad.batch_stats), (s_small.params, s_small.batch_stats),
                      rtol=1e-5, atol=1e-6)
  _assert_trees_close(m_pad, m_small, rtol=1e-6)
  assert float(m_pad['count']) == 5


def test_loss_falls_over_a_few_steps(small_dataset):
  state, batch, rng = _state(), _batch(small_dataset, 64), jax.random.key(0)
  step = jax.jit(train.train_step)
  losses = []
  for _ in range(20):
    state, sums = step(state, batch, rng)
    losses.append(float(sums['loss'] / sums['count']))
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize('n, batch_size', [(37, 10), (100, 7), (5, 64)])
def test_evaluate_counts_every_example_once(small_dataset, n, batch_size):
  state = _state()
  data = (small_dataset.test_images[:n], small_dataset.test_labels[:n])
  rows = train.index_rows(np.arange(n), batch_size)
  sums = jax.jit(train.evaluate)(state, data, rows)
  assert float(sums['count']) == n
  # The same sums from one pass over all n examples at once, in eval mode.
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          data[0], train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, data[1])
  np.testing.assert_allclose(sums['loss'], losses.sum(), rtol=1e-5)
  assert float(sums['correct']) == float((logits.argmax(-1) == data[1]).sum())


def test_epoch_order_is_a_padded_permutation():
  order = train.epoch_order(0, 3, num_examples=10, batch_size=4, num_rows=4)
  assert order.shape == (4, 4)
  flat = np.asarray(order).ravel()
  assert sorted(flat[flat >= 0]) == list(range(10)) and (flat < 0).sum() == 6
  assert (flat[10:] == -1).all()  # padding at the end: only the last batch is partial
  again = train.epoch_order(0, 3, num_examples=10, batch_size=4, num_rows=4)
  np.testing.assert_array_equal(order, again)  # a function of (seed, epoch) alone
  other = train.epoch_order(0, 4, num_examples=10, batch_size=4, num_rows=4)
  assert not np.array_equal(order, other)


def _fit(dataset, **kwargs):
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  kwargs = {'seeds': (0,), 'batch_size': 32, 'epochs': 2, 'progress': False, **kwargs}
  return train.fit(model, dataset, **kwargs)


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
    _assert_trees_close(jax.tree.map(lambda x: x[i], s_together.params),  # pylint: disable=cell-var-from-loop
                        jax.tree.map(lambda x: x[0], s_alone.params), rtol=1e-5, atol=1e-6)
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
  sched = train.Schedule(300, 32, epochs=2, evals_per_epoch=4)
  assert (sched.steps_per_epoch, sched.k, sched.chunks_per_epoch) == (10, 2, 5)
  assert [sched.evaluates_after(c) for c in range(5)] == [False, True, True, True, True]
  assert sched.total_steps == 20 and sched.num_epochs == 2
  assert [sched.examples_after(s) for s in (0, 3, 9, 10, 11, 20)] == [0, 96, 288, 300, 332, 600]
  # Chunks of 2 with 2 evals an epoch: evaluate after steps 6 (crossing 5) and 10.
  sched = train.Schedule(300, 32, chunk_steps=2, evals_per_epoch=2)
  assert [sched.evaluates_after(c) for c in range(5)] == [False, False, True, False, True]
  budget = train.Schedule(300, 32, epochs=5, max_steps=13)
  assert budget.total_steps == 13 and budget.num_epochs == 2
  for bad in ({'epochs': -1}, {'max_steps': -2}, {'evals_per_epoch': 0}):
    with pytest.raises(ValueError):
      train.Schedule(300, 32, **bad)


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
  sched = train.Schedule(300, 32, epochs=2, num_devices=8)
  assert sched.steps_per_epoch == 9 and sched.examples_per_epoch == 288
  assert sched.examples_after(10) == 288 + 32
  order = train.epoch_order(0, 0, num_examples=300, batch_size=32, num_rows=9)
  assert (order >= 0).all() and len(set(order.ravel())) == 288
