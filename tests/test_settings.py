"""Settings: every check (one message each), run identity, config -> model, presets."""

import warnings

import ml_collections
import pytest

from bn_jax import cli
from bn_jax import models
from bn_jax import norms
from bn_jax import results
from bn_jax import settings


def _validate(**overrides):
  devices = overrides.pop('devices', 1)
  settings.validate(settings.resolve(settings.base_config(), **overrides), devices)


@pytest.mark.parametrize('overrides, message', [
    ({'epochs': -1}, 'epochs must be an integer >= 0, got -1'),
    ({'epochs': 0}, 'nothing to train'),
    ({'batch_size': 0}, r'batch_size must be in \[1, the training set size\], got 0'),
    ({'model': 'vgg'}, "unknown model 'vgg'"),
    ({'model': 'resnet', 'resnet_depth': 21}, r'resnet_depth must be 6n\+2 \(20, 32, 44, 56, '
     r'110\), got 21'),
    ({'model': 'resnet', 'norm': 'group', 'resnet_width': 24}, 'norm_groups=32 must divide the '
     '48 channels'),
    ({'norm': 'instance'}, "unknown norm 'instance'"),
    ({'norm': 'group', 'hidden': (48,)}, 'norm_groups=32 must divide the 48 channels'),
    ({'norm': 'batch_renorm', 'bn_stats': 'ghost', 'bn_group_size': 4}, "bn_stats='ghost' is "
     'ghost BN'),
    ({'norm': 'batch_renorm', 'renorm_rmax': 0.5}, 'renorm_rmax=0.5 must be >= 1'),
    ({'bn_stats': 'ghost'}, "bn_stats='ghost' needs --config.bn_group_size"),
    ({'learning_rate': -0.1}, 'learning_rate must be a positive number'),
    ({'learning_rate': float('nan')}, 'learning_rate must be a positive number'),
    ({'learning_rate': float('inf')}, 'learning_rate must be a positive number'),
    ({'seeds': 0}, 'seeds must be an integer >= 1'),
    ({'batch_size': 1}, 'BatchNorm over a single example'),
    ({'bn_stats': 'ghost', 'bn_group_size': 1}, 'BatchNorm over a single example'),
    ({'bn_stats': 'local', 'batch_size': 8, 'devices': 8}, 'BatchNorm over a single example'),
    ({'bn_stats': 'ghost', 'bn_group_size': 5}, 'bn_group_size=5 must divide the batch of 32'),
    ({'batch_size': 36, 'devices': 8}, 'batch_size 36 is not divisible by the 8 devices'),
    ({'bn_stats': 'global'}, "unknown bn_stats 'global'"),
    ({'model': 'cnn', 'features': ()}, r'features must list at least one positive integer '
     r'width, got \(\)'),
    ({'model': 'cnn', 'features': (32, -1)}, 'features must list at least one positive'),
    ({'hidden': (0,)}, 'hidden must list at least one positive integer width'),
    ({'bn_momentum': 2.0}, r'bn_momentum must be in \[0, 1\), got 2.0'),
    ({'bn_momentum': 1.0}, r'bn_momentum must be in \[0, 1\)'),
    ({'dropout': 1.5}, r'dropout must be in \[0, 1\), got 1.5'),
    ({'dropout': -0.1}, r'dropout must be in \[0, 1\)'),
    ({'val_fraction': 0.0}, r'val_fraction must be in \(0, 1\)'),
    ({'eval_batch_size': 0}, 'eval_batch_size must be an integer >= 1, got 0'),
    ({'evals_per_epoch': 0}, 'evals_per_epoch must be an integer >= 1, got 0'),
    ({'checkpoint_keep': 0}, 'checkpoint_keep must be an integer >= 1'),
    ({'activation': 'swish'}, "unknown activation 'swish'"),
    ({'parallel': 'mpi'}, "unknown parallel 'mpi'"),
    ({'on_code_change': 'ignore'}, "unknown on_code_change 'ignore'"),
    ({'data': 'synthetic:abc'}, r"unknown data spec 'synthetic:abc': use `tfds:NAME`.*"
     r"`synthetic\[:N\[:HxWxC\]\]`"),
    ({'data': 'mnist'}, "unknown data spec 'mnist'"),
    ({'target_val_accuracy': 2.0}, r'target_val_accuracy must be in \[0, 1\]'),
    ({'init_scale': 0.0}, 'init_scale must be a positive number'),
])
def test_bad_settings_fail_before_training(overrides, message):
  with pytest.raises(settings.ConfigError, match=message):
    _validate(**overrides)


@pytest.mark.parametrize('key, value, message', [
    ('norms', ('batch', 'instance'), 'norms must list some of'),
    ('batch_sizes', (16, 0), 'batch_sizes must list at least one positive integer width'),
    ('lr_scaling', 'cube', "unknown lr_scaling 'cube'"),
    ('lrs', (1e-3, -1.0), 'lrs must list positive rates'),
    ('momenta', (0.9, 1.0), r'momenta must list numbers in \[0, 1\)'),
])
def test_grid_lists_are_checked_where_a_script_has_them(key, value, message):
  config = settings.base_config()
  config[key] = value
  with pytest.raises(settings.ConfigError, match=message):
    settings.validate(config)


def test_the_defaults_and_a_grid_list_pass():
  config = settings.base_config()
  config.norms = ('batch', 'none')
  settings.validate(config)


def test_bn_batch_of_one_can_be_allowed_with_a_loud_warning():
  with pytest.warns(UserWarning, match='BatchNorm over a single example'):
    _validate(batch_size=1, bn_batch_of_one='warn')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _validate(batch_size=1, norm='none')  # no BN: nothing to warn about


def test_identity_holds_only_the_settings_that_change_numbers():
  config = settings.base_config()
  key = results.run_key(settings.identity(config))
  same = dict(progress=False, resume=False, chunk_steps=7, eval_batch_size=10, seeds=9,
              target_val_accuracy=0.5, checkpoint_keep=1, compilation_cache=False,
              parallel='pmap', data_dir='/elsewhere', on_code_change='retrain',
              features=(3,))  # the CNN's widths do not change an MLP
  assert results.run_key(settings.identity(settings.resolve(config, **same))) == key
  for change in (dict(batch_size=64), dict(learning_rate=3e-3), dict(hidden=(64,)),
                 dict(data='synthetic'), dict(bn_momentum=0.9), dict(epochs=4),
                 dict(dropout=0.0), dict(evals_per_epoch=2), dict(split_seed=1)):
    assert results.run_key(settings.identity(settings.resolve(config, **change))) != key
  assert results.run_key(settings.identity(config, num_devices=8)) != key
  # Each norm's own settings enter only with that norm.
  group = settings.resolve(config, norm='group')
  assert settings.identity(settings.resolve(group, norm_groups=8)) != settings.identity(group)
  assert settings.identity(settings.resolve(group, bn_momentum=0.5, renorm_rmax=2.0)) == (
      settings.identity(group))
  renorm = settings.resolve(config, norm='batch_renorm')
  assert settings.identity(settings.resolve(renorm, renorm_rmax=2.0)) != settings.identity(renorm)
  assert settings.identity(settings.resolve(config, norm_groups=8)) == settings.identity(config)
  # Without BN its settings do not matter; with a step budget the epochs do not.
  none = settings.resolve(config, norm='none')
  assert settings.identity(none) == settings.identity(settings.resolve(none, bn_momentum=0.5))
  budget = settings.resolve(config, max_steps=100)
  assert settings.identity(budget) == settings.identity(settings.resolve(budget, epochs=9))
  assert len(key) == 12


def test_resolve_rejects_unknown_keys_and_leaves_the_config():
  config = settings.base_config()
  with pytest.raises(settings.ConfigError, match="unknown config key 'batchsize'"):
    settings.resolve(config, batchsize=3)
  assert settings.resolve(config, batch_size=8).batch_size == 8 and config.batch_size == 32


def test_learning_rate_scaling_rules():
  lr = settings.scaled_learning_rate
  assert lr(1e-3, 256, 32, 'none') == 1e-3
  assert lr(1e-3, 256, 32, 'linear') == pytest.approx(8e-3)
  assert lr(1e-3, 256, 32, 'sqrt') == pytest.approx(1e-3 * 8**0.5)
  assert lr(1e-3, 8, 32, 'linear') == pytest.approx(2.5e-4)


@pytest.mark.parametrize('bn_stats, data_parallel, kind, axis_name', [
    ('sync', True, 'batch', 'batch'), ('sync', False, 'batch', None),
    ('local', True, 'batch', None), ('ghost', True, 'ghost', None)])
def test_bn_stats_pick_the_statistics_group(bn_stats, data_parallel, kind, axis_name):
  config = settings.resolve(settings.base_config(), bn_stats=bn_stats, bn_group_size=4)
  model = settings.make_model(config, data_parallel)
  expected = norms.norm_layer(kind, momentum=0.99, epsilon=1e-3, axis_name=axis_name,
                               group_size=4)
  assert model.norm == expected
  assert settings.make_model(settings.resolve(config, norm='none'), data_parallel).norm is None


@pytest.mark.parametrize('norm, kind', [('layer', norms.LayerNormLayer),
                                        ('group', norms.GroupNormLayer),
                                        ('batch_renorm', norms.BatchRenormLayer)])
def test_every_norm_reaches_the_model(norm, kind):
  config = settings.resolve(settings.base_config(), norm=norm, norm_groups=16,
                            renorm_rmax=2.0, bn_epsilon=1e-5)
  model = settings.make_model(config, data_parallel=True)
  assert isinstance(model.norm, kind) and model.norm.epsilon == 1e-5
  if norm == 'group':
    assert model.norm.groups == 16
  if norm == 'batch_renorm':
    assert model.norm.rmax == 2.0 and model.norm.axis_name == 'batch'  # synced over devices


def test_config_sets_the_layers_of_either_model():
  config = settings.resolve(settings.base_config(), hidden=(7, 5), features=(3, 4, 6),
                            init_scale=2.0)
  mlp = settings.make_model(config)
  assert (mlp.hidden, mlp.init_scale) == ((7, 5), 2.0)
  cnn = settings.make_model(settings.resolve(config, model='cnn'))
  assert (cnn.features, cnn.init_scale) == ((3, 4, 6), 2.0)


def test_fit_args_carry_every_loop_setting():
  config = settings.resolve(settings.base_config(), chunk_steps=3, eval_batch_size=7,
                            max_steps=11, evals_per_epoch=2, progress=False)
  assert settings.fit_args(config) == dict(
      learning_rate=1e-3, batch_size=32, epochs=5, max_steps=11, chunk_steps=3,
      evals_per_epoch=2, eval_batch_size=7, progress=False, precise_bn_examples=0,
      augment='none', loss_scale=False)
  for dtype, scaled in (('bfloat16', False), ('float16', True)):
    half = settings.resolve(config, half_precision=True, half_precision_dtype=dtype)
    assert settings.fit_args(half)['loss_scale'] is scaled
    assert settings.identity(half)['compute_dtype'] == dtype
    assert settings.make_model(half).dtype == dtype


def test_presets_apply_before_command_line_overrides():
  def get_config():
    c = ml_collections.ConfigDict({'quick': False, 'seeds': 5, 'epochs': 3, 'data': 'real'})
    return c

  def quick(c):
    c.update(seeds=2, epochs=1, data='synthetic')

  presets = {'quick': quick}
  c = cli.resolve(get_config(), {'quick': True, 'seeds': 5}, presets)
  assert (c.seeds, c.epochs, c.data) == (5, 1, 'synthetic')  # the flag wins over the preset
  c = cli.resolve(get_config(), {'seeds': 4}, presets)
  assert (c.seeds, c.epochs, c.data) == (4, 3, 'real')  # no preset


def test_settings_a_script_ignores_are_refused():
  config = settings.base_config()
  config.norms = ('batch', 'none')
  with pytest.raises(settings.ConfigError, match=r'--config.norm is not used by this script.*'
                                                 r'set --config.norms instead'):
    settings.check_overrides(config, {'norm': 'layer'}, grid_keys=('norm',))
  with pytest.raises(settings.ConfigError, match='--config.features is not used with '
                                                 'model=mlp'):
    settings.check_overrides(config, {'features': (3,)})
  settings.check_overrides(config, {'hidden': (3,), 'seeds': 2}, grid_keys=('norm',))
