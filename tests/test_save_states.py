"""`save_states_at`: a run's states and metrics at listed steps equal separate runs of those
budgets, bit for bit; records and studies keep them; out-of-range steps are refused."""

import jax
import numpy as np
import pytest

from bn_jax import checkpoint
from bn_jax import host
from bn_jax import interrupt
from bn_jax import loop
from bn_jax import models
from bn_jax import programs as programs_lib
from bn_jax import settings
from bn_jax import sweep


def _fit(dataset, **kwargs):
  # Dropout and BN: the data order, dropout keys and running averages all have to line up.
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  kwargs = {'seeds': (0, 1), 'batch_size': 32, 'epochs': 3, 'progress': False,
            'evals_per_epoch': 2, 'learning_rate': 3e-3, **kwargs}
  return loop.fit(model, dataset, **kwargs)


def test_states_at_steps_equal_separate_runs_of_those_budgets_bit_for_bit(small_dataset):
  # 300 examples, batch 32: 10 steps an epoch (eval points 5, 10). Step 3 is inside a chunk
  # of the whole run, 13 in its second epoch, 30 its end.
  kept = {}
  results, final = _fit(small_dataset, save_states_at=(3, 13, 30),
                        on_save=lambda step, variables: kept.setdefault(step, variables))
  assert sorted(kept) == [3, 13, 30]
  for step in (3, 13):
    alone, states = _fit(small_dataset, max_steps=step)
    for name in ('params', 'batch_stats'):
      jax.tree.map(np.testing.assert_array_equal, kept[step][name], getattr(states, name))
    for s in range(2):
      point = next(p for p in results[s]['saved'] if p['step'] == step)
      assert point['test_accuracy'] == alone[s]['final']['test_accuracy']
      assert point['val_loss'] == alone[s]['final']['val_loss']
  jax.tree.map(np.testing.assert_array_equal, kept[30]['params'], final.params)
  # The whole run is the run without save points, too.
  plain, plain_states = _fit(small_dataset)
  jax.tree.map(np.testing.assert_array_equal, plain_states.params, final.params)
  assert plain[0]['final'] == results[0]['final'] and plain[0]['curve'] == results[0]['curve']


def test_an_interrupted_run_resumes_with_its_saved_points(tmp_path, small_dataset):
  whole, _ = _fit(small_dataset, save_states_at=(3, 13, 27))
  stop_after = iter([False] * 4 + [True])  # asked at each chunk boundary: stops at step 15
  kept = {}
  with pytest.raises(interrupt.Interrupted):
    _fit(small_dataset, save_states_at=(3, 13, 27), should_stop=lambda: next(stop_after),
         checkpointer=checkpoint.Checkpointer(tmp_path), on_save=kept.setdefault)
  assert sorted(kept) == [3, 13]
  resumed, _ = _fit(small_dataset, save_states_at=(3, 13, 27), on_save=kept.setdefault,
                    checkpointer=checkpoint.Checkpointer(tmp_path))
  assert sorted(kept) == [3, 13, 27]
  assert resumed[1]['saved'] == whole[1]['saved']  # points before the stop kept, same numbers


def test_saved_train_metrics_average_the_steps_since_the_previous_point(small_dataset):
  results, _ = _fit(small_dataset, epochs=1, save_states_at=(4, 10), seeds=(0,))
  (result,) = results
  first, second = result['saved']
  assert (first['step'], second['step']) == (4, 10)
  assert (first['examples'], second['examples']) == (128, 300)  # the last batch holds 12
  # The epoch's train accuracy is the example-weighted mean of the two stretches':
  # 128 examples in steps 1-4, 172 in steps 5-10.
  epoch = result['history'][0]['train_accuracy']
  assert epoch == pytest.approx((128 * first['train_accuracy'] +
                                 172 * second['train_accuracy']) / 300, abs=1e-6)
  assert first['train_accuracy'] != second['train_accuracy']


def test_a_study_keeps_the_variables_at_each_step(tmp_path, small_dataset):
  config = settings.resolve(settings.base_config(), data='synthetic:400', val_fraction=0.25,
                            hidden=(16,), seeds=2, epochs=2, progress=False,
                            tensorboard=False, compilation_cache=False, devices=1)
  study = sweep.Study(config, small_dataset, str(tmp_path))
  (runs,) = study.runs([{'save_states_at': (5, 20)}])
  for r in runs:
    assert [p['step'] for p in r['saved']] == [5, 20]
    at_end = study.variables(r, step=20)
    jax.tree.map(np.testing.assert_array_equal, at_end, study.variables(r))
    early = study.variables(r, step=5)
    assert not np.array_equal(early['params']['Dense_0']['kernel'],
                              at_end['params']['Dense_0']['kernel'])
  # Another list of steps is another run (its records hold other points).
  (other,) = study.runs([{'save_states_at': (10,)}])
  assert other[0]['run_key'] != runs[0]['run_key']


def test_a_step_outside_the_run_is_refused_before_training(tmp_path, small_dataset):
  config = settings.resolve(settings.base_config(), data='synthetic:400', val_fraction=0.25,
                            seeds=1, epochs=1, progress=False, tensorboard=False,
                            devices=1)
  with pytest.raises(settings.ConfigError, match=r'save_states_at=\(5, 11\).*1 to 10'):
    sweep.sweep(config, small_dataset, [{'save_states_at': (5, 11)}], experiment='t',
                workdir=str(tmp_path / 'w'))


def test_initial_variables_are_those_a_run_starts_from(tmp_path, small_dataset):
  config = settings.resolve(settings.base_config(), hidden=(16,), seeds=1, first_seed=3)
  study = sweep.Study(config, small_dataset, str(tmp_path))
  start = study.initial_variables({'seed': 3}, norm='batch')
  model = study.model(norm='batch')
  sched = loop.Schedule(300, 32, 1)
  states = programs_lib.compile_programs(model, host.DeviceData.put(small_dataset), sched,
                                         seeds=[3], learning_rate=1e-3).states
  jax.tree.map(np.testing.assert_array_equal, start['params'],
               jax.tree.map(lambda x: x[0], states.params))
  other = study.initial_variables({'seed': 4}, norm='batch')
  assert not np.array_equal(other['params']['Dense_0']['kernel'],
                            start['params']['Dense_0']['kernel'])
