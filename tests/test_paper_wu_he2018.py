"""experiments/papers/wu_he2018.py: its network (the CNN's pooled blocks and normalized dense
layer), the runs it trains, its checks and presets, its findings on hand-made runs (effects and
gates), and the script end to end in quick mode."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _scripts import load_script
from _scripts import run_quick

from bn_jax import checks
from bn_jax import cli
from bn_jax import overrides
from bn_jax import settings
from bn_jax import verdicts


def _script():
  return load_script('wu_he2018')


def _resolve(wu_he, **overridden):
  return cli.resolve(wu_he.get_config(), overridden, wu_he.PRESETS)


def _shapes(config):
  variables = settings.make_model(config).init(jax.random.key(0), jnp.zeros((4, 28, 28, 1)),
                                               train=False)
  return jax.tree.map(jnp.shape, variables)


def test_the_cnn_pools_three_blocks_and_normalizes_its_dense_layer_only_when_asked():
  wu_he = _script()
  config = settings.resolve(_resolve(wu_he), norm='batch', bn_stats='ghost', bn_group_size=2)
  shapes = _shapes(config)
  # 28 -> 14 -> 7 -> 3 pixels: 3 x 3 x 64 inputs to the dense layer; its BN has no bias before
  assert shapes['params']['Dense_0'] == {'kernel': (576, 128)}
  assert shapes['batch_stats']['BatchNorm_3'] == {'mean': (128,), 'var': (128,)}
  assert {k: settings.identity(config)[k] for k in ('pools', 'dense_norm')} == {
      'pools': 3, 'dense_norm': True}
  plain = settings.resolve(config, cnn_pools=2, cnn_dense_norm=False)  # the library's defaults
  shapes = _shapes(plain)
  assert shapes['params']['Dense_0'] == {'kernel': (3136, 128), 'bias': (128,)}
  assert len(shapes['batch_stats']) == 3
  assert not {'pools', 'dense_norm'} & set(settings.identity(plain))  # old run keys unchanged
  with pytest.raises(settings.ConfigError, match='--config.cnn_dense_norm'):
    overrides.check_overrides(settings.resolve(config, model='resnet'), {'cnn_dense_norm': True})


def test_each_run_has_ghost_groups_of_n_a_linear_rate_and_the_scaled_decays():
  wu_he = _script()
  config = _resolve(wu_he, epochs=10, devices_simulated=8)
  bn = wu_he.run_overrides(config, 'batch', 2)
  assert bn == {'norm': 'batch', 'batch_size': 16, 'learning_rate': pytest.approx(0.1 * 16 / 256),
                'lr_decay_epochs': (3.0, 6.0, 9.0), 'bn_stats': 'ghost', 'bn_group_size': 2}
  gn = wu_he.run_overrides(config, 'group', 32)
  assert gn == {'norm': 'group', 'batch_size': 256, 'learning_rate': pytest.approx(0.1),
                'lr_decay_epochs': (3.0, 6.0, 9.0)}


def test_the_paper_preset_is_the_papers_setting_on_cifar_and_every_run_of_it_is_valid():
  wu_he = _script()
  config = _resolve(wu_he, scale='paper')
  assert (config.data.startswith('cifar:'), config.model, config.resnet_depth, config.epochs,
          config.train_examples, config.augment, config.devices_simulated) == (
              True, 'resnet', 56, 100, 0, 'crop_flip', 8)
  assert tuple(config.group_sizes) == (32, 16, 8, 4, 2)
  wu_he.check(config)
  for norm in config.norms:
    for n in config.group_sizes:
      run = settings.resolve(config, **wu_he.run_overrides(config, norm, n))
      assert tuple(run.lr_decay_epochs) == (30, 60, 90)
      checks.validate(run, num_train=45000)
  assert _resolve(wu_he, scale='paper', epochs=10).epochs == 10  # a flag beats the preset


@pytest.mark.parametrize('overridden, message', [
    ({'norms': ('batch', 'layer')}, "norms must include 'batch' and 'group'"),
    ({'norms': ('batch', 'group', 'batch_renorm')}, 'cannot be compared here'),
    ({'group_sizes': (32,)}, 'at least two per-device batches'),
    ({'group_sizes': (32, 1)}, 'of >= 2 examples'),
    ({'decay_fractions': (0.6, 0.3)}, 'increasing decay_fractions'),
    ({'decay_fractions': (0.5, 1.0)}, 'increasing decay_fractions'),
    ({'lr_schedule': 'cosine'}, "lr_schedule must be 'step'"),
])
def test_check_refuses_settings_the_findings_cannot_use(overridden, message):
  wu_he = _script()
  with pytest.raises(settings.ConfigError, match=message):
    wu_he.check(_resolve(wu_he, **overridden))


def _runs(accuracy, steps=100):
  """Hand-made records per (norm, n): per-seed test accuracy with PreciseBN (BN) or plain (GN);
  BN's plain (running-average) test accuracy is a far-off 0.5, which the findings must not use."""
  runs = {}
  for (norm, n), values in accuracy.items():
    runs[norm, n] = [{
        'config': {'norm': norm, 'bn_momentum': 0.99}, 'steps': steps, 'status': 'ok',
        'final': {'train_eval_accuracy': 0.95,
                  **({'test_accuracy': 0.5, 'precise_test_accuracy': a} if norm == 'batch'
                     else {'test_accuracy': a})}} for a in values]
  return runs


ACCURACY = {('batch', 32): [0.90, 0.91, 0.92], ('batch', 2): [0.80, 0.82, 0.81],
            ('group', 32): [0.89, 0.90, 0.91], ('group', 2): [0.88, 0.90, 0.89]}


def test_findings_measure_error_growth_and_the_gap_in_points_with_precise_bn_statistics():
  wu_he = _script()
  config = _resolve(wu_he, group_sizes=(2, 32), seeds=3)
  runs = _runs(ACCURACY)
  rows = wu_he.findings(config, runs, wu_he.errors(config, runs))
  # BN: error 10, 9, 11 points higher at 2; GN: 1, 0, 2; the gap at 2: 8 points every seed.
  np.testing.assert_allclose(rows[0]['values'], [10, 9, 11], atol=1e-9)
  np.testing.assert_allclose(rows[1]['values'], [9, 9, 9], atol=1e-9)
  np.testing.assert_allclose(rows[2]['values'], [8, 8, 8], atol=1e-9)
  assert [r['failed'] for r in rows] == [[], [], []]  # 0.99^100 = 37%, but PreciseBN is used
  assert len(rows[1]['gates']) == 4 * 3 + 1  # 3 gates per arm, and every seed has a value
  decided = verdicts.decide(rows, {'supported': 'reproduced'})
  assert [r['verdict'] for r in decided] == ['reproduced'] * 3


def test_with_running_averages_only_a_cold_bn_arm_makes_the_findings_invalid():
  wu_he = _script()
  config = _resolve(wu_he, group_sizes=(2, 32), seeds=3, precise_bn_examples=0)
  runs = _runs({k: [0.5 + 0.1 * (k[0] == 'group')] * 3 for k in ACCURACY}, steps=100)
  for rs in runs.values():  # no PreciseBN numbers: the plain ones are the running averages'
    for r in rs:
      r['final'].pop('precise_test_accuracy', None)
  rows = wu_he.findings(config, runs, wu_he.errors(config, runs))
  np.testing.assert_allclose(rows[2]['values'], [10, 10, 10], atol=1e-9)
  warm = 'BN at 2 per device running averages warmed (momentum^steps): 0.366 > 0.01'
  assert all(warm in r['failed'] for r in rows)
  assert not any('GN' in g for r in rows for g in r['failed'])  # GN has no running averages
  assert wu_he.statistics(_resolve(wu_he, precise_bn_examples=0,
                                   bn_ema_bias_correction=True)) == 'corrected'


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
  report, rows = run_quick(tmp_path, 'wu_he2018')
  assert len(rows) == 3
  assert '| BN (running averages) |' in report and 'precise statistics' in report
