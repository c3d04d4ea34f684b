"""Run warnings and validity gates (`bn_jax.health`) on hand-made runs."""

import math

import pytest

from bn_jax import health


def _run(norm='batch', momentum=0.99, steps=1000, status='ok', accuracy=0.9, seed=0):
  return {'seed': seed, 'config': {'norm': norm, 'bn_momentum': momentum}, 'steps': steps,
          'status': status, 'final': {'train_eval_accuracy': accuracy},
          'diverged_at': {'epoch': 2, 'step': 40} if status == 'diverged' else None}


def _warnings(run):
  return health.warnings(run['config'], run)


def test_initial_weight_is_momentum_to_the_steps():
  assert health.initial_weight({'norm': 'batch', 'bn_momentum': 0.99}, 106) == pytest.approx(
      0.3446, abs=1e-4)  # Wu & He at 32 per device: 34% still the initial values
  assert health.initial_weight({'norm': 'batch', 'bn_momentum': 0.999}, 265) == pytest.approx(
      0.7671, abs=1e-4)
  assert health.initial_weight({'norm': 'group', 'bn_momentum': 0.99}, 3) == 0.0


def test_a_healthy_run_has_no_warnings():
  assert _warnings(_run(steps=459)) == []  # 0.99^459 = 0.0099 <= 1%
  assert _warnings(_run(norm='none', steps=5)) == []  # no running averages to warm


def test_cold_running_averages_are_a_warning():
  (warning,) = _warnings(_run(steps=458))  # 0.99^458 = 0.0100..: just above 1%
  assert warning.startswith('cold running averages: after 458 steps at momentum 0.99 they '
                            'still hold 1% of their initial values (> 1%)')
  (warning,) = _warnings(_run(steps=106))
  assert 'hold 34% of their initial values' in warning and warning.endswith(
      '(use PreciseBN (precise_bn_examples) or bn_ema_bias_correction, or train longer)')
  corrected = _run(steps=106)
  corrected['config'].update(bn_ema_bias_correction=True, precise_bn_examples=1000)
  assert _warnings(corrected)[0].endswith('(the precise_* and corrected_* numbers do not)')


def test_divergence_and_chance_accuracy_are_warnings():
  assert _warnings(_run(status='diverged', accuracy=0.1)) == [
      'diverged at epoch 2, step 40',
      'at chance: training accuracy (eval mode) 0.100, chance 0.10']
  assert _warnings(_run(accuracy=0.149)) == [
      'at chance: training accuracy (eval mode) 0.149, chance 0.10']
  assert _warnings(_run(accuracy=0.151)) == []
  assert 'at chance' in _warnings(_run(accuracy=math.nan))[0]


def test_gates_pass_and_fail_on_hand_made_runs():
  good = [_run(accuracy=0.97, steps=2000, seed=s) for s in range(3)]
  cold = [_run(accuracy=0.97, steps=106, seed=0), _run(accuracy=0.31, steps=2000, seed=1)]
  assert health.trained('BN', good, 0.9).passed
  gate = health.trained('BN', cold, 0.9)
  assert not gate.passed and str(gate) == 'BN trained (lowest training accuracy): 0.31 < 0.9'
  assert health.warmed('BN', good).passed
  gate = health.warmed('BN', cold)
  assert not gate.passed and str(gate) == (
      'BN running averages warmed (momentum^steps): 0.3446 > 0.01')
  assert health.warmed('BN', cold, statistics='precise').passed  # PreciseBN: not the EMA's
  assert health.no_divergence('BN', good).passed
  gate = health.no_divergence('BN', good + [_run(status='diverged')])
  assert not gate.passed and str(gate) == 'BN diverged seeds: 1 > 0'
  assert health.converged('none', 0.870, 0.875).passed
  gate = health.converged('none', 0.80, 0.87)
  assert not gate.passed and str(gate).endswith(': 0.07 > 0.01')
