"""Tests for bn_jax.schedule: chunks, eval points and budgets, by hand."""

import pytest

from bn_jax import host
from bn_jax import schedule


def test_schedule_chunks_and_eval_points():
  # 300 examples, batch 32: 10 steps an epoch; 4 evals an epoch after steps
  # floor(2.5 + 1/2) = 3, 5, floor(7.5 + 1/2) = 8 and 10; K = the longest gap, 3.
  sched = schedule.Schedule(300, 32, epochs=2, evals_per_epoch=4)
  assert sched.steps_per_epoch == 10 and sched.eval_steps == (3, 5, 8, 10)
  assert (sched.k, sched.chunks_per_epoch) == (3, 4)
  assert sched.chunks(0) == sched.chunks(1) == ((0, 3), (3, 5), (5, 8), (8, 10))
  assert sched.chunks(0, 5) == ((5, 8), (8, 10))  # resuming within an epoch
  assert sched.total_steps == 20 and sched.num_epochs == 2
  assert [sched.examples_after(s) for s in (0, 3, 9, 10, 11, 20)] == [0, 96, 288, 300, 332, 600]
  # Chunks of 2 with 2 evals an epoch: chunks also end at the eval point 5.
  sched = schedule.Schedule(300, 32, chunk_steps=2, evals_per_epoch=2)
  assert sched.eval_steps == (5, 10) and sched.k == 2
  assert sched.chunks(0) == ((0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10))
  budget = schedule.Schedule(300, 32, epochs=5, max_steps=13)
  assert budget.total_steps == 13 and budget.num_epochs == 2
  for bad in ({'epochs': -1}, {'max_steps': -2}, {'evals_per_epoch': 0}):
    with pytest.raises(ValueError):
      schedule.Schedule(300, 32, **bad)


def test_eval_steps_round_half_up_without_duplicates():
  # batch 1: S = the number of examples. Eval j after step floor(j * S / E + 1/2).
  sched = schedule.Schedule(3375, 1, evals_per_epoch=4)
  # 843.75 -> 844, 1687.5 -> 1688, 2531.25 -> 2531, 3375.
  assert sched.eval_steps == (844, 1688, 2531, 3375)
  assert sched.k == 844  # the longest gap (1688 - 844, 2531 - 1688 = 843, 3375 - 2531 = 844)
  assert sched.chunks(0) == ((0, 844), (844, 1688), (1688, 2531), (2531, 3375))
  # 4.25 -> 4, 8.5 -> 9 (halves round up, where Python's round would give 8), 12.75 -> 13.
  sched = schedule.Schedule(17, 1, evals_per_epoch=4)
  assert sched.eval_steps == (4, 9, 13, 17) and sched.k == 5
  assert sched.chunks(0) == ((0, 4), (4, 9), (9, 13), (13, 17))
  # More evals than steps: 0.6 -> 1, 1.2 -> 1, 1.8 -> 2, 2.4 -> 2, 3: each step once.
  sched = schedule.Schedule(3, 1, evals_per_epoch=5)
  assert sched.eval_steps == (1, 2, 3) and sched.chunks(0) == ((0, 1), (1, 2), (2, 3))
  # 1/3 and 2/3 of a step round to 0 and 1: step 0 is no eval point.
  assert schedule.Schedule(1, 1, evals_per_epoch=3).eval_steps == (1,)


def test_eval_steps_of_an_epoch_the_budget_cuts_short():
  # 10 steps an epoch, evals after 3, 7, 10 (10/3 -> 3, 20/3 -> 7); 26 steps: epoch 3 ends
  # after step 6 of its 10, so it evaluates after 3 and at its last step, 6.
  sched = schedule.Schedule(300, 32, epochs=10, max_steps=26, evals_per_epoch=3, chunk_steps=2)
  assert sched.eval_steps == (3, 7, 10) and sched.num_epochs == 3
  assert [sched.epoch_stop(e) for e in range(3)] == [10, 10, 6]
  assert sched.epoch_eval_steps(0) == (3, 7, 10) and sched.epoch_eval_steps(2) == (3, 6)
  assert sched.chunks(2) == ((0, 2), (2, 3), (3, 5), (5, 6))
  # A budget ending on an eval point evaluates there once.
  sched = schedule.Schedule(300, 32, max_steps=17, evals_per_epoch=3)
  assert sched.epoch_eval_steps(1) == (3, 7)
  assert sched.chunks(1) == ((0, 3), (3, 7))


def test_several_devices_keep_batches_whole():
  sched = schedule.Schedule(300, 32, epochs=2, num_devices=8)
  assert sched.steps_per_epoch == 9 and sched.examples_per_epoch == 288
  assert sched.examples_after(10) == 288 + 32
  order = host.epoch_order(0, 0, num_examples=300, batch_size=32, num_rows=9)
  assert (order >= 0).all() and len(set(order.ravel())) == 288
