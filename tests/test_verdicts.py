"""The verdict rule (`bn_jax.verdicts`): paired t-tests, TOST, Holm and gates against hand
computations."""

import math

import numpy as np
import pytest

from bn_jax import health
from bn_jax import verdicts


def _cauchy_cdf(x):
  """The t distribution with 1 degree of freedom in closed form."""
  return 0.5 + math.atan(x) / math.pi


def test_direction_p_value_is_the_two_sided_paired_t_test():
  # Two seeds: mean 2, sd sqrt(2), se 1, t = 2 with 1 df.
  row = verdicts.finding('f', [1.0, 3.0])
  assert row['mean'] == 2.0 and row['se'] == pytest.approx(1.0)
  assert row['p'] == pytest.approx(2 * (1 - _cauchy_cdf(2.0)))  # 0.2952
  # 95% interval: t_{0.975, 1} = tan(pi * 0.475) = 12.706.
  half = math.tan(math.pi * 0.475)
  assert row['interval'] == pytest.approx([2 - half, 2 + half])


def test_tost_is_the_larger_one_sided_p_value():
  # Values 0.1 and 0.3: mean 0.2, se 0.1, 1 df; margin 1: t = 12 against -1, -8 against +1.
  row = verdicts.finding('f', [0.1, 0.3], margin=1.0)
  p_low, p_high = 1 - _cauchy_cdf(12.0), _cauchy_cdf(-8.0)  # 0.0265, 0.0396
  assert row['p'] == pytest.approx(max(p_low, p_high))
  (decided,) = verdicts.decide([row])
  assert decided['verdict'] == 'supported'  # 0.0396 < 0.05: equivalent within 1
  (narrow,) = verdicts.decide([verdicts.finding('f', [0.1, 0.3], margin=0.5)])
  assert narrow['p'] == pytest.approx(_cauchy_cdf(-3.0))  # 0.102: not shown equivalent
  assert narrow['verdict'] == 'inconclusive'


def test_holm_against_a_hand_computation():
  # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max.
  np.testing.assert_allclose(verdicts.holm([0.01, 0.04, 0.03, 0.005]),
                             [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(verdicts.holm([0.5, 0.2]), [0.5, 0.4])
  np.testing.assert_allclose(verdicts.holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1


def test_holm_turns_a_lone_significant_finding_inconclusive_in_a_family():
  strong = [1.0, 1.1, 0.9, 1.05, 0.95]  # p ~ 1e-5
  weak = [0.3, 0.6, 0.05, 0.5, 0.1]  # t = 2.88, 4 df: p = 0.045 alone
  (alone,) = verdicts.decide([verdicts.finding('weak', weak)])
  assert alone['p'] == pytest.approx(alone['p_adjusted']) and alone['verdict'] == 'supported'
  rows = verdicts.decide([verdicts.finding('weak', weak), verdicts.finding('strong', strong),
                          verdicts.finding('null 1', [1, -1, 2, -2, 0.5]),
                          verdicts.finding('null 2', [0.3, -0.2, 0.1, -0.4, 0.1])])
  weak_row = rows[0]
  assert 0.04 < weak_row["p"] < 0.05 and weak_row['p_adjusted'] == pytest.approx(3 * weak_row['p'])
  assert weak_row['verdict'] == 'inconclusive' and rows[1]['verdict'] == 'supported'
  # The adjusted interval is the 1 - 0.05/4 t-interval: wider than the raw 95% one.
  low, high = weak_row['interval_adjusted']
  raw_low, raw_high = weak_row['interval']
  assert low < 0 < raw_low and raw_high < high  # wider: the adjusted one holds 0


def test_contradicted_direction_and_equivalence():
  (down,) = verdicts.decide([verdicts.finding('f', [-1.0, -1.2, -0.9, -1.1])])
  assert down['verdict'] == 'contradicted'
  (far,) = verdicts.decide([verdicts.finding('f', [5.0, 5.2, 4.9, 5.1], margin=1.0)])
  assert far['interval_adjusted'][0] > 1.0 and far['verdict'] == 'contradicted'


def test_a_failed_gate_makes_the_verdict_invalid_and_leaves_the_family():
  trained = health.at_least('BN arm trained (train accuracy)', 0.101, 0.5)
  warm = health.at_most('running averages warmed (momentum^steps)', 0.34, 0.01)
  assert not trained.passed and str(trained) == (
      'BN arm trained (train accuracy): 0.101 < 0.5')
  assert str(warm) == 'running averages warmed (momentum^steps): 0.34 > 0.01'
  assert health.at_most('w', 0.005, 0.01).passed
  assert str(health.at_most('w', 0.005, 0.01)) == 'w: 0.005 <= 0.01'
  bad = verdicts.finding('gap', [5.0, 6.0, 5.5], gates=[trained, warm])
  good = verdicts.finding('other', [0.3, 0.5, 0.1, 0.45, 0.2])
  rows = verdicts.decide([bad, good], words={'supported': 'reproduced'})
  assert rows[0]['verdict'] == ('invalid setup (BN arm trained (train accuracy): 0.101 < 0.5; '
                                'running averages warmed (momentum^steps): 0.34 > 0.01)')
  assert math.isnan(rows[0]['p_adjusted'])
  assert rows[1]['p_adjusted'] == pytest.approx(rows[1]['p'])  # a family of one
  assert rows[1]['verdict'] == 'reproduced'


def test_a_seed_without_a_value_fails_a_gate_instead_of_being_dropped():
  (row,) = verdicts.decide([verdicts.finding('f', [1.0, 1.1, np.nan, 0.9])])
  assert row['seeds'] == 3
  assert row['verdict'] == 'invalid setup (seeds with a value: 3 < 4)'
  (one,) = verdicts.decide([verdicts.finding('f', [1.0])])
  assert one['verdict'] == 'inconclusive'  # one seed: no interval, no test
