"""experiments/papers/wu_johnson2021.py: its saved epochs, the warmed-epoch mask, the detrended
instability, the presets, and the script end to end in quick mode (its per-epoch PreciseBN and
bias-corrected EMA at the last epoch equal the runs' own final numbers)."""

import re

import numpy as np
import pytest

from _scripts import load_script
from _scripts import run_quick

from bn_jax import cli
from bn_jax import schedule
from bn_jax import settings
from bn_jax import sweep


def _script():
  return load_script('wu_johnson2021')


def _presets(wj):
  return {'quick': wj.quick, 'scale=paper': wj.paper}


def test_states_are_kept_at_every_epoch_end_and_the_last_step():
  wj = _script()
  sched = schedule.Schedule(720, 64, 8)  # ceil(720 / 64) = 12 steps an epoch, 96 in all
  assert wj.save_points(sched, 1) == tuple(range(12, 97, 12))
  assert wj.save_points(sched, 3) == (36, 72, 96)  # epochs 3 and 6, and the end (epoch 8)
  cut = schedule.Schedule(720, 64, 8, max_steps=50)  # the budget ends within epoch 5
  assert wj.save_points(cut, 1) == (12, 24, 36, 48, 50)
  # The default on Fashion-MNIST's 54,000 training examples: 53 steps an epoch, >= 2,000 steps.
  config = wj.get_config()
  points = wj.save_points(schedule.Schedule(54000, config.batch_size, config.epochs),
                          config.save_every)
  assert points[:2] == (53, 106) and points[-1] == 2120 and len(points) == config.epochs


def test_an_epoch_counts_once_the_ema_holds_at_most_one_percent_of_its_start():
  wj = _script()
  # 0.9^43 = 0.01078 > 0.01 >= 0.9^44 = 0.00970; 0.99^458 = 0.01004, 0.99^459 = 0.00994
  np.testing.assert_array_equal(wj.warm(0.9, [43, 44, 2000]), [False, True, True])
  np.testing.assert_array_equal(wj.warm(0.99, [458, 459]), [False, True])
  # The default's 0.99 runs: epochs 1-8 (<= 424 steps) are cold, 9-40 count.
  assert wj.warm(0.99, np.arange(1, 41) * 53).sum() == 32


def test_detrended_instability_is_the_mean_distance_from_the_reference_over_the_mask():
  wj = _script()
  reference = np.array([[0.50, 0.60], [0.70, 0.80], [0.80, 0.90]])  # (epochs, seeds)
  trend_plus_noise = reference + np.array([[0.3, 0.3], [-0.02, 0.01], [0.04, -0.03]])
  mask = np.array([False, True, True])  # the first epoch is cold: left out
  # seed 0: (0.02 + 0.04) / 2 = 0.03; seed 1: (0.01 + 0.03) / 2 = 0.02
  np.testing.assert_allclose(wj.departure(trend_plus_noise, reference, mask), [0.03, 0.02])
  np.testing.assert_allclose(wj.departure(reference, reference, mask), [0.0, 0.0])
  # The signed mean over the same epochs: seed 0 (-0.02 + 0.04) / 2, seed 1 (0.01 - 0.03) / 2
  np.testing.assert_allclose(wj.mean_over(trend_plus_noise - reference, mask), [0.01, -0.01])
  curve = {arm: reference for arm in wj.ARMS}
  assert all(np.isnan(v).all() for v in wj.summary(curve, np.zeros(3, bool)).values())


def test_presets_and_checks():
  wj = _script()
  config = cli.resolve(wj.get_config(), {'scale': 'paper'}, _presets(wj))
  assert (config.data, config.model, config.resnet_depth, config.batch_size) == (
      'cifar:/path/to/cifar-10-batches-py', 'resnet', 56, 1024)
  assert (config.learning_rate, config.epochs, tuple(config.lr_decay_epochs)) == (
      0.8, 182, (91, 136))
  assert tuple(config.momenta) == (0.9, 0.99) and config.precise_bn_examples == 10000
  wj.check(config)
  settings.identity(config)  # a valid run identity (the model's settings resolve)
  quick = cli.resolve(wj.get_config(), {'quick': True}, _presets(wj))
  wj.check(quick)
  for bad, message in (({'momenta': (0.9, 1.0)}, 'momenta must be BN momenta'),
                       ({'precise_bn_examples': 0}, 'precise_bn_examples > 0'),
                       ({'bn_ema_bias_correction': False}, 'bn_ema_bias_correction'),
                       ({'min_epochs': 1}, 'min_epochs >= 2')):
    with pytest.raises(settings.ConfigError, match=message):
      wj.check(cli.resolve(wj.get_config(), bad, _presets(wj)))


@pytest.mark.slow
def test_quick_mode_end_to_end_and_the_last_epoch_matches_the_runs_finals(tmp_path):
  report, rows = run_quick(tmp_path, 'wu_johnson2021')
  assert len(rows) == 5  # per momentum: accuracy, stability; then the subset
  assert all(len(re.findall(r'(?<!\\)\|', row)) == 8 for row in rows)  # 7 cells, no stray |
  table = [line for line in report.splitlines() if line.startswith('| 0.')]
  assert len(table) == 2 and all(len(re.findall(r'(?<!\\)\|', r)) == 9 for r in table)
  assert '![departure](departure.png)' in report and 'epochs with a warmed EMA' in report
  # The same runs again in this process (one device, as the script ran): nothing trains.
  wj = _script()
  config = cli.resolve(wj.get_config(), {'quick': True, 'compilation_cache': False,
                                         'devices': 1}, _presets(wj))
  dataset = sweep.load_data(config)
  study = sweep.Study(config, dataset, str(tmp_path / 'run'), experiment='wu_johnson2021')
  sched = schedule.Schedule(len(dataset.train_labels), config.batch_size, config.epochs)
  steps = wj.save_points(sched, config.save_every)
  curves, cache = {}, {'shared': 0}
  for m in config.momenta:
    (records,) = study.runs([{'bn_momentum': m, 'save_states_at': steps}])
    assert [p['step'] for p in records[0]['saved']] == list(steps)
    curves[m] = curve = wj.measure(study, config, m, records, steps, cache)
    for arm, name in (('ema', 'test_accuracy'), ('corrected', 'corrected_test_accuracy'),
                      ('subset', 'precise_test_accuracy')):
      np.testing.assert_allclose(curve[arm][-1], sweep.final(records, name), atol=1e-6)
  # BN's momentum does not enter training: the second momentum's runs have the first's
  # weights at every saved state (so PreciseBN was measured once), and the same PreciseBN.
  assert cache['shared'] == len(steps) * config.seeds
  low, high = config.momenta
  np.testing.assert_array_equal(curves[low]['precise'], curves[high]['precise'])
