"""experiments/papers/hoffer2017.py: its arms, effects and presets, and end to end in quick
mode."""

import math

import numpy as np
import pytest

from _scripts import load_script, run_quick

from bn_jax import checks
from bn_jax import cli
from bn_jax import health
from bn_jax import settings


def _script():
  return load_script('hoffer2017')


hoffer = _script()


def test_the_arms_differ_only_where_the_paper_changes_them():
  config = hoffer.get_config()
  config.update(small_batch=128, large_batch=1024, learning_rate=0.1, epochs=20,
                lr_decay_epochs=(10, 15))
  arms = hoffer.grid(config, 10240)
  assert arms['small'] == {'norm': 'batch', 'batch_size': 128, 'learning_rate': 0.1}
  assert arms['large'] == {'norm': 'batch', 'batch_size': 1024, 'learning_rate': 0.1}
  assert arms['sqrt']['learning_rate'] == pytest.approx(0.1 * math.sqrt(8))  # 0.2828
  assert {k: v for k, v in arms['ghost'].items() if not k.startswith('bn_')} == arms['sqrt']
  assert (arms['ghost']['bn_stats'], arms['ghost']['bn_group_size']) == ('ghost', 128)
  adapted = arms['adapted']
  assert {k: v for k, v in adapted.items() if k not in ('epochs', 'lr_decay_epochs')} == \
      arms['ghost']
  # 8x the epochs of batch 1024 = the small batch's steps: 20 * 10240 / 128 = 160 * 10240 / 1024.
  assert adapted['epochs'] == 160 and adapted['lr_decay_epochs'] == (80, 120)
  assert 20 * 10240 // 128 == adapted['epochs'] * 10240 // 1024 == 1600


def test_the_default_large_batch_warms_its_running_averages():
  config = hoffer.get_config()
  ratio = hoffer.check(config, config.train_examples)
  large_steps = config.epochs * config.train_examples // config.large_batch  # 36 * 5 = 180
  assert large_steps == 180 and ratio == 16
  assert config.bn_momentum ** large_steps <= health.WARM  # 0.9^180 = 5.6e-9
  assert config.lr_decay_epochs[-1] < config.epochs  # the decay happens


@pytest.mark.parametrize('small, large, examples, fits, message', [
    (128, 1000, 10000, 0.98, 'must be a multiple of small_batch'),
    (128, 128, 10240, 0.98, 'must be a multiple of small_batch'),
    (128, 1024, 10000, 0.98, 'must be a multiple of large_batch'),
    (128, 1024, 10240, 1.5, 'must be a training accuracy'),
])
def test_check_refuses_designs_that_cannot_test_the_claim(small, large, examples, fits,
                                                           message):
  config = hoffer.get_config()
  config.update(small_batch=small, large_batch=large, fits=fits)
  with pytest.raises(settings.ConfigError, match=message):
    hoffer.check(config, examples)


def test_effects_by_hand():
  test = {'small': np.array([0.90, 0.88]), 'large': np.array([0.86, 0.87]),
          'sqrt': np.array([0.87, 0.87]), 'ghost': np.array([0.88, 0.86]),
          'adapted': np.array([0.89, 0.88])}
  effect = hoffer.effects(test)
  np.testing.assert_allclose(effect['gap'], [0.04, 0.01])
  np.testing.assert_allclose(effect['ghost'], [0.01, -0.01])
  # (adapted - large) - gap / 2: 0.03 - 0.02 and 0.01 - 0.005.
  np.testing.assert_allclose(effect['closed'], [0.01, 0.005], atol=1e-12)


def _record(train_accuracy, steps=180):
  return {'final': {'train_eval_accuracy': train_accuracy}, 'status': 'ok', 'steps': steps,
          'config': {'norm': 'batch', 'bn_momentum': 0.9}}


def test_a_gap_counts_only_where_both_arms_fit_with_warm_averages():
  config = hoffer.get_config()  # fits = 0.98
  runs = {'small': [_record(0.99), _record(0.985)], 'large': [_record(0.99), _record(0.975)]}
  gates = hoffer.fit_gates(config, runs, 'small', 'large')
  assert len(gates) == 6
  assert [str(g) for g in gates if not g.passed] == [
      'large trained (lowest training accuracy): 0.975 < 0.98']
  runs['large'] = [_record(0.99, steps=40), _record(0.99)]  # 0.9^40 = 0.0148 > 0.01: cold
  failed = [str(g) for g in hoffer.fit_gates(config, runs, 'large') if not g.passed]
  assert failed == ['large running averages warmed (momentum^steps): 0.01478 > 0.01']


def test_the_paper_preset_is_the_papers_f1_and_passes_the_check():
  presets = {'quick': hoffer.quick, 'scale=paper': hoffer.paper}
  c = cli.resolve(hoffer.get_config(), {'scale': 'paper'}, presets)
  assert c.hidden == (512,) * 5 and (c.small_batch, c.large_batch) == (128, 4096)
  assert (c.optimizer, c.learning_rate, c.momentum, c.weight_decay) == ('momentum', 0.1, 0.9,
                                                                         1e-4)
  assert (c.epochs, tuple(c.lr_decay_epochs), c.lr_decay_factor) == (50, (10, 20, 30), 0.1)
  assert c.bn_momentum == 0.9 and c.data == 'tfds:mnist'
  assert hoffer.check(c, c.train_examples) == 32
  assert c.train_examples <= 60000 * (1 - c.val_fraction)  # MNIST's training split holds it
  arms = hoffer.grid(c, c.train_examples)
  assert arms['sqrt']['learning_rate'] == pytest.approx(0.1 * math.sqrt(32))
  assert arms['adapted']['epochs'] == 1600
  for arm in arms.values():  # every arm is a run the library accepts
    checks.validate(settings.resolve(c, **arm), num_train=c.train_examples)
  assert cli.resolve(hoffer.get_config(), {}, presets).hidden != (512,) * 5  # default untouched


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
  report, rows = run_quick(tmp_path, 'hoffer2017')
  assert len(rows) == 3
  assert '| adapted | 128 | ghost 16 |' in report  # the arm table
