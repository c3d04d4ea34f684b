"""The checks on the settings (`bn_jax.checks`): every bad value fails before training with one
message naming the setting and the fix; grid lists where a script has them; settings a script
would ignore are refused."""

import warnings

import pytest

from bn_jax import checks
from bn_jax import settings


def _validate(**overrides):
  devices = overrides.pop('devices', 1)
  checks.validate(settings.resolve(settings.base_config(), **overrides), devices)


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
    checks.validate(config)


def test_the_defaults_and_a_grid_list_pass():
  config = settings.base_config()
  config.norms = ('batch', 'none')
  checks.validate(config)


def test_bn_batch_of_one_can_be_allowed_with_a_loud_warning():
  with pytest.warns(UserWarning, match='BatchNorm over a single example'):
    _validate(batch_size=1, bn_batch_of_one='warn')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _validate(batch_size=1, norm='none')  # no BN: nothing to warn about


def test_settings_a_script_ignores_are_refused():
  config = settings.base_config()
  config.norms = ('batch', 'none')
  with pytest.raises(settings.ConfigError, match=r'--config.norm is not used by this script.*'
                                                 r'set --config.norms instead'):
    checks.check_overrides(config, {'norm': 'layer'}, grid_keys=('norm',))
  with pytest.raises(settings.ConfigError, match='--config.features is not used with '
                                                 'model=mlp'):
    checks.check_overrides(config, {'features': (3,)})
  checks.check_overrides(config, {'hidden': (3,), 'seeds': 2}, grid_keys=('norm',))
