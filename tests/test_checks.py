"""The checks on the settings (`bn_jax.checks`): every bad value fails before training with one
message naming the setting and the fix; grid lists where a script has them; settings a script
would ignore (or no run reads) are refused; what needs the data and the workdir is checked
before a sweep writes anything."""

import os
import warnings

import pytest

from _scripts import load_script

from bn_jax import checks
from bn_jax import data
from bn_jax import overrides
from bn_jax import settings
from bn_jax import sweep


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
    ({'augment': 'crop_flip'}, "augment='crop_flip' crops and flips images for the "
     'convolutional models; the MLP sees the pixels as an unordered vector: use '
     r'--config.model=cnn \(or resnet\), or --config.augment=none'),
    ({'model': 'cnn', 'data': 'synthetic:400:2x2x1'}, r'model=cnn needs images of at least '
     r'4x4 pixels \(2 2x2 max-pools, each halving them, rounding down\), got 2x2 '
     r'\(synthetic:400:2x2x1\): use larger images'),
    ({'model': 'cnn', 'features': (8,), 'data': 'synthetic:400:1x1x1'}, 'model=cnn needs '
     r'images of at least 2x2 pixels \(1 2x2 max-pool,'),
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
    ('precise_examples', (100, 0, -5), r'precise_examples must list example counts >= 0 '
     r'\(0: every training example\), got \(100, 0, -5\)'),
    ('batch_sizes_workdir', '/nonexistent', "batch_sizes_workdir '/nonexistent' does not "
     'exist: pass the --workdir of a finished experiments/batch_sizes.py run'),
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


def test_images_as_small_as_each_model_takes_pass():
  _validate(model='cnn', data='synthetic:400:4x4x1')
  _validate(model='cnn', features=(8,), data='synthetic:400:2x2x1')  # one max-pool
  _validate(model='resnet', data='synthetic:400:1x1x1')  # padded convolutions: any size
  _validate(model='cnn', augment='crop_flip')


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
    overrides.check_overrides(config, {'norm': 'layer'}, grid_keys=('norm',))
  with pytest.raises(settings.ConfigError, match='--config.features is not used with '
                                                 'model=mlp'):
    overrides.check_overrides(config, {'features': (3,)})
  overrides.check_overrides(config, {'hidden': (3,), 'seeds': 2}, grid_keys=('norm',))


def _script_config(norms=('batch', 'none'), **values):
  """A script's config; with `norms`, as bn_vs_no_bn.py's, whose grid sets norm from them."""
  config = settings.resolve(settings.base_config(), **values)
  if norms:
    config.norms = norms
  return config


@pytest.mark.parametrize('values, overridden, message', [
    ({}, {'renorm_rmax': 2.0}, r'--config.renorm_rmax is not used: it applies only with '
     r'norm=batch_renorm, and this script runs norm=batch and none \(--config.norms\): drop '
     r'it, or list batch_renorm in --config.norms\.'),
    ({}, {'renorm_dmax_steps': 9}, '--config.renorm_dmax_steps is not used'),
    ({}, {'bn_noise': 0.5}, '--config.bn_noise is not used: it applies only with '
     'norm=noisy_batch'),
    ({}, {'momentum': 0.5}, r'--config.momentum is not used: it applies only with '
     r'optimizer=momentum or nesterov, and this run has optimizer=adam: drop it, or set '
     r'--config.optimizer=momentum\.'),
    ({}, {'half_precision_dtype': 'float16'}, '--config.half_precision_dtype is not used: it '
     'applies only with half_precision=true, and this run has half_precision=false'),
    ({'norms': ('none',)}, {'precise_bn_examples': 100}, '--config.precise_bn_examples is not '
     'used: it applies only with norm=batch, batch_renorm or noisy_batch, and this script runs '
     'norm=none'),
    ({'norms': ('none',)}, {'bn_momentum': 0.9}, '--config.bn_momentum is not used'),
    ({'norms': ('none', 'layer')}, {'bn_stats': 'local'}, '--config.bn_stats is not used'),
    ({'norms': ('batch', 'layer')}, {'norm_groups': 8}, '--config.norm_groups is not used'),
    ({'norms': ('none',)}, {'bn_epsilon': 1e-5}, '--config.bn_epsilon is not used'),
    ({}, {'bn_group_size': 4}, '--config.bn_group_size is not used: it applies only with '
     'bn_stats=ghost, and this run has bn_stats=sync'),
    ({}, {'lr_decay_epochs': (1,)}, '--config.lr_decay_epochs is not used: it applies only '
     'with lr_schedule=step, and this run has lr_schedule=constant'),
    ({}, {'lr_decay_factor': 0.5}, '--config.lr_decay_factor is not used'),
    ({'norms': None, 'norm': 'none'}, {'precise_bn_examples': 100}, 'this run has norm=none'),
])
def test_settings_no_run_reads_are_refused(values, overridden, message):
  with pytest.raises(settings.ConfigError, match=message):
    grid_keys = () if values.get('norms', ()) is None else ('norm',)
    overrides.check_overrides(_script_config(**values), overridden, grid_keys)


@pytest.mark.parametrize('values, overridden, grid_keys', [
    ({}, {}, ('norm',)),  # the defaults never count
    ({}, {'bn_momentum': 0.9, 'bn_epsilon': 1e-5, 'precise_bn_examples': 100}, ('norm',)),
    ({'norms': ('batch_renorm', 'none')}, {'renorm_rmax': 2.0}, ('norm',)),
    ({'norms': None, 'norm': 'batch_renorm'}, {'renorm_rmax': 2.0}, ()),
    ({'norms': None, 'norm': 'noisy_batch'}, {'bn_noise': 0.5}, ()),
    ({'optimizer': 'nesterov'}, {'momentum': 0.5}, ('norm',)),
    ({'half_precision': True}, {'half_precision_dtype': 'float16'}, ('norm',)),
    ({'lr_schedule': 'step'}, {'lr_decay_epochs': (1,), 'lr_decay_factor': 0.5}, ('norm',)),
    ({'bn_stats': 'ghost'}, {'bn_group_size': 4}, ('norm',)),
    # A grid that sets norm without a list of its values (santurkar2018.py): unknown, passes.
    ({'norms': None}, {'bn_noise': 0.5, 'renorm_rmax': 2.0}, ('norm',)),
])
def test_settings_some_run_reads_pass(values, overridden, grid_keys):
  overrides.check_overrides(_script_config(**values), overridden, grid_keys)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**values):
  return settings.resolve(settings.base_config(), **{
      'data': 'synthetic:400', 'epochs': 1, 'seeds': 1, 'progress': False, 'devices': 1,
      'compilation_cache': False, **values})


def test_an_empty_workdir_is_refused_before_training_and_nothing_lands_here(tmp_path,
                                                                            monkeypatch):
  monkeypatch.chdir(tmp_path)
  script = load_script('bn_vs_no_bn', 'experiments')
  config = settings.resolve(script.get_config(), **_tiny().to_dict())
  with pytest.raises(settings.ConfigError, match=r'^--workdir is empty: pass --workdir=DIR, '
                                                 "the directory for the script's results"):
    script.main(config, '')
  assert not os.listdir(tmp_path)  # no summary.md, curves.png or runs
  checks.check_workdir(None)  # sweep.run: no workdir, nothing written


def test_an_unusable_tensorboard_directory_is_refused_before_the_workdir_opens(
    small_dataset, tmp_path, monkeypatch):
  board = tmp_path / 'tensorboard'
  board.write_text('')
  run = lambda: sweep.sweep(_tiny(), small_dataset, [{'norm': 'batch'}], experiment='checks',
                            workdir=str(tmp_path))
  with pytest.raises(settings.ConfigError, match=rf'^the TensorBoard directory {board} is a '
                                                 'file, not a directory: move it away, or pass '
                                                 r'--config.tensorboard=false\.$'):
    run()
  assert os.listdir(tmp_path) == ['tensorboard']  # no .lock, no checkpoints/
  board.unlink()
  board.mkdir()
  monkeypatch.setattr(checks.os, 'access', lambda *args: False)
  with pytest.raises(settings.ConfigError, match=f'{board} is not writable: move it away'):
    run()
  assert os.listdir(tmp_path) == ['tensorboard'] and not os.listdir(board)
  checks.check_sweep([_tiny(tensorboard=False)], small_dataset, 1, str(tmp_path))


def test_images_smaller_than_the_model_takes_are_refused_once_loaded():
  tiny = data.load('synthetic:40:3x3x1')  # as a spec without a shape (idx:, tfds:) would load
  with pytest.raises(settings.ConfigError, match='model=cnn needs images of at least 4x4 '
                                                 r'pixels .* got 3x3 \(synthetic:400\)'):
    checks.check_sweep([_tiny(model='cnn')], tiny, 1, None)
  checks.check_sweep([_tiny(model='resnet')], tiny, 1, None)


def test_more_evals_per_epoch_than_steps_is_refused(small_dataset):
  config = _tiny(evals_per_epoch=11)
  with pytest.raises(settings.ConfigError, match=r'^evals_per_epoch=11 is more than the 10 '
                                                 r'steps of an epoch \(300 training examples, '
                                                 r'batch 32\): at most 10 validation points '
                                                 'fit; pass --config.evals_per_epoch=10 or '
                                                 'fewer'):
    checks.check_sweep([config], small_dataset, 1, None)
  # A grid's longest epoch counts: batch 64 has 5 steps, 10 evaluations fit batch 32's epoch.
  checks.check_sweep([_tiny(evals_per_epoch=10), _tiny(evals_per_epoch=10, batch_size=64)],
                     small_dataset, 1, None)


def test_a_rate_decay_no_run_reaches_is_refused(small_dataset):
  config = _tiny(epochs=2, lr_schedule='step', lr_decay_epochs=(1, 2))
  with pytest.raises(settings.ConfigError, match=r'^lr_decay_epochs=\(1, 2\): the decay at '
                                                 'epoch 2 comes at or after the end of '
                                                 r'training \(epoch 2\), so it never happens'):
    checks.check_sweep([config], small_dataset, 1, None)
  # Runs of several budgets (prefixes of one another): one that reaches it is enough.
  checks.check_sweep([settings.resolve(config, epochs=e) for e in (1, 2, 3)], small_dataset, 1,
                     None)


def test_a_compilation_cache_dir_that_cannot_be_a_directory_is_refused(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('')
  with pytest.raises(settings.ConfigError, match=rf'^compilation_cache_dir {afile} is a file, '
                                                 'not a directory: pass '
                                                 '--config.compilation_cache_dir=DIR with a '
                                                 'directory, or --config.compilation_cache='
                                                 'false'):
    _validate(compilation_cache_dir=str(afile))
  with pytest.raises(settings.ConfigError, match=f'compilation_cache_dir {afile}/jax cannot be '
                                                 f'created: {afile} is a file'):
    _validate(compilation_cache_dir=str(afile / 'jax'))
  _validate(compilation_cache_dir=str(tmp_path / 'new' / 'jax'))  # made when first used
  _validate(compilation_cache_dir=str(afile), compilation_cache=False)  # not used
  assert os.listdir(tmp_path) == ['afile']


def test_claims_refuse_a_missing_batch_size_study_before_writing(tmp_path):
  script = load_script('claims', 'experiments')
  config = script.get_config()
  config.update(data='synthetic:400', claims='batch_size', batch_sizes_workdir='/nonexistent')
  with pytest.raises(settings.ConfigError, match="^batch_sizes_workdir '/nonexistent' does not "
                                                 'exist'):
    script.main(config, str(tmp_path / 'claims'))
  assert not os.listdir(tmp_path)  # no claims.md with the claim 'not run'


def test_grid_entries_that_make_one_run_are_refused_unless_they_repeat_it(small_dataset):
  config = _tiny(norm='none')
  grid = [{'bn_momentum': 0.9}, {'bn_momentum': 0.99}]  # BN's momentum, without BN
  with pytest.raises(settings.ConfigError, match=r"^grid entries \{'bn_momentum': 0\.9\} and "
                     r"\{'bn_momentum': 0\.99\} are the same run: no run reads bn_momentum "
                     r'\(bn_momentum applies only with norm=batch, .*and they have norm=none\)'):
    sweep.sweep(config, small_dataset, grid, experiment='checks')
  configs = [settings.resolve(config, **g) for g in grid]
  overrides.check_distinct_runs(grid, configs, [settings.identity(c) for c in configs[:1]] + [
      settings.identity(settings.resolve(config, norm='batch', bn_momentum=0.99))])  # 2 runs
  repeated = [{'norm': 'none'}, {}, {'seeds': 2}]  # one run, named thrice: fine
  configs = [settings.resolve(config, **g) for g in repeated]
  overrides.check_distinct_runs(repeated, configs, [settings.identity(c) for c in configs])
