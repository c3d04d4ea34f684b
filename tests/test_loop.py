"""The loop: chunk size and vmapped seeds change nothing, schedules, budgets, divergence."""

import collections
import functools
import re
import threading
import time

import jax
import numpy as np
import optax
import pytest

from bn_jax import host
from bn_jax import loop
from bn_jax import models
from bn_jax import optim
from bn_jax import programs
from bn_jax import programs as programs_lib
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


@pytest.mark.slow
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


def test_fit_validates_at_the_schedule_steps_whatever_the_chunk_size(small_dataset):
  # 300 examples, batch 32: 10 steps an epoch; 3 evals an epoch after steps 3, 7 and 10.
  default, s_default = _fit(small_dataset, evals_per_epoch=3)
  ones, s_ones = _fit(small_dataset, evals_per_epoch=3, chunk_steps=1)
  for result in (default[0], ones[0]):
    assert [p['step'] for p in result['curve']] == [3, 7, 10, 13, 17, 20]
    assert [p['examples'] for p in result['curve']] == [96, 224, 300, 396, 524, 600]
  _assert_trees_close((s_default.params, s_default.batch_stats),
                      (s_ones.params, s_ones.batch_stats), rtol=1e-5, atol=1e-6)
  for a, b in zip(default[0]['curve'], ones[0]['curve']):
    assert a['val_loss'] == pytest.approx(b['val_loss'], rel=1e-5)
    assert a['val_accuracy'] == pytest.approx(b['val_accuracy'], abs=1e-6)
  for a, b in zip(default[0]['history'], ones[0]['history']):
    for key in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy'):
      assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_a_finite_but_exploding_loss_counts_as_diverged(small_dataset):
  model = models.create_model('mlp', norm='none', hidden=(16,))
  kwargs = {'seeds': (0, 1), 'learning_rate': 1e6, 'batch_size': 32, 'epochs': 2,
            'chunk_steps': 5, 'progress': False}
  # The loss stays finite (~1e14): NaN/inf alone would not catch it.
  unchecked, _ = loop.fit(model, small_dataset, divergence_loss=float('inf'), **kwargs)
  assert [r['status'] for r in unchecked] == ['ok', 'ok']
  assert all(np.isfinite(h['train_loss']) and h['train_loss'] > loop.DIVERGENCE_LOSS
             for r in unchecked for h in r['history'])
  results, _ = loop.fit(model, small_dataset, **kwargs)
  for r in results:
    assert r['status'] == 'diverged' and r['diverged_at'] == {'epoch': 1, 'step': 5}
    assert len(r['history']) == 1  # every seed diverged: training stopped
  assert loop.DIVERGENCE_LOSS == pytest.approx(100 * np.log(10))


def test_divergence_loss_is_the_threshold_on_a_chunk_mean(small_dataset):
  # An untrained net's loss is ~ln 10 = 2.3: a threshold of 1 marks the first chunk.
  results, _ = _fit(small_dataset, divergence_loss=1.0, chunk_steps=4)
  assert results[0]['status'] == 'diverged'
  assert results[0]['diverged_at'] == {'epoch': 1, 'step': 4}
  results, _ = _fit(small_dataset, divergence_loss=50.0, chunk_steps=4)
  assert results[0]['status'] == 'ok' and results[0]['diverged_at'] is None


def test_step_budget_stops_mid_epoch(small_dataset):
  results, states = _fit(small_dataset, max_steps=13, chunk_steps=4, evals_per_epoch=2)
  (result,) = results
  assert int(states.step[0]) == 13 and result['steps'] == 13
  assert len(result['history']) == 2  # epoch 1 whole, epoch 2 cut after 3 steps
  assert result['curve'][-1]['step'] == 13
  assert result['curve'][-1]['examples'] == 300 + 3 * 32
  # The epoch's validation numbers are those of its last eval point.
  assert result['history'][-1]['val_accuracy'] == result['curve'][-1]['val_accuracy']
  # Evals after steps 5 and 10, then at the budget's end: 3 steps into epoch 2.
  assert [p['step'] for p in result['curve']] == [5, 10, 13]


@pytest.mark.slow
def test_one_thread_at_a_time_compiles_a_models_shared_programs(small_dataset, monkeypatch):
  """Configurations of one model share its init and eval programs (`programs_lib.compile_programs`):
  concurrent compiles of them would do the work twice and can interleave their writes of one
  persistent-cache file. Each init is slowed down so that unguarded threads would overlap."""
  data = host.DeviceData.put(small_dataset)
  inside, most, guard = collections.Counter(), collections.Counter(), threading.Lock()

  def slow_init_states(model, *args):
    with guard:
      inside[model] += 1
      most[model] = max(most[model], inside[model])
    time.sleep(0.3)
    with guard:
      inside[model] -= 1
    return train.init_states(model, *args)

  monkeypatch.setattr(programs, 'init_states', slow_init_states)
  bn, plain = (models.create_model('mlp', norm=n, hidden=(7,)) for n in ('batch', 'none'))
  start = threading.Barrier(4)
  compile_one = lambda model, batch_size: (start.wait(), programs_lib.compile_programs(
      model, data, loop.Schedule(data.size('train'), batch_size), seeds=(0,),
      learning_rate=1e-3))
  threads = [threading.Thread(target=compile_one, args=(m, b))
             for m in (bn, plain) for b in (10, 20)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert most == {bn: 1, plain: 1}  # never two threads in one model's shared compile


@pytest.mark.slow
def test_equal_models_share_one_eval_program_whatever_the_optimizer(small_dataset):
  """Configurations that differ in batch size and optimizer object (a schedule), each with its
  own (equal) model object, compile one init and one eval program: bound methods compare their
  module by identity, so without the shared model each state's `apply_fn` would differ."""
  data = host.DeviceData.put(small_dataset)
  rows = host.index_rows(data.splits['val'], 1000)
  caches = lambda: [f._cache_size() for f in (train.init_variables, train.evaluate_seeds,
                                              train.states_of)]
  before = caches()
  for batch_size in (10, 20, 30):
    model = models.create_model('mlp', norm='batch', hidden=(9,))  # a new, equal object
    sched = loop.Schedule(data.size('train'), batch_size)
    tx = optim.make_optimizer('sgd', learning_rate=optax.cosine_decay_schedule(
        0.1, sched.total_steps))  # a new optimizer object every time
    states = programs_lib.compile_programs(model, data, sched, seeds=(0,), learning_rate=0.1,
                                           optimizer=tx).states
    train.evaluate_seeds(train.without_optimizer(states), data.arrays, rows)  # as fit calls it
  assert caches() == [before[0] + 1, before[1] + 1, before[2] + 3]
  assert states.apply_fn.__self__ == model and states.apply_fn.__self__ is not model


def test_progress_bar_only_on_a_terminal(small_dataset, capsys):
  """Captured (not a terminal, like a log file), `progress=True` writes no bar: no carriage
  returns or cursor-up escapes end up next to the tables the scripts print."""
  _fit(small_dataset, epochs=1, progress=True)
  err = capsys.readouterr().err
  assert '\r' not in err and '\x1b[A' not in err and 'it/s' not in err


@pytest.mark.slow
def test_without_a_terminal_progress_is_a_line_per_epoch(small_dataset, capsys):
  model = models.create_model('mlp', norm='batch', hidden=(8,), dropout=0.0)
  results, _ = loop.fit(model, small_dataset, seeds=(0, 1), batch_size=50, epochs=2,
                        progress=True, desc='mlp/batch bs=50')
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2  # 300 examples, batch 50: 6 steps an epoch
  for epoch, line in enumerate(lines, 1):
    assert re.fullmatch(rf'mlp/batch bs=50 seeds \[0, 1\]: epoch {epoch}/2, step {6 * epoch}/12, '
                        r'val acc 0\.\d{4}, \d+ s, ETA \d+ s', line), line
  mean = np.mean([r['final']['val_accuracy'] for r in results])
  assert f'val acc {mean:.4f},' in lines[-1]  # the seeds' mean
  loop.fit(model, small_dataset, seeds=(0,), batch_size=50, epochs=1, progress=False)
  assert capsys.readouterr().out == ''  # progress off: silent


def test_fit_refuses_compile_settings_next_to_compiled_programs(small_dataset):
  model = models.create_model('mlp', norm='batch', hidden=(8,))
  data = host.DeviceData.put(small_dataset)
  compiled = programs_lib.compile_programs(model, data, loop.Schedule(300, 32, 1), seeds=[0],
                                           learning_rate=1e-3)
  for given in ({'learning_rate': 0.1}, {'augment': 'crop_flip'}, {'loss_scale': True},
                {'optimizer': optim.make_optimizer('sgd', learning_rate=0.1)}):
    with pytest.raises(ValueError, match=f"pass \\['{next(iter(given))}'\\] to compile_programs"):
      loop.fit(model, data, epochs=1, programs=compiled, progress=False, **given)
  (result,), _ = loop.fit(model, data, epochs=1, programs=compiled, progress=False)
  assert result['steps'] == 10
