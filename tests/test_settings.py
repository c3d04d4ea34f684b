"""Settings: run identity, config -> model, optimizer and fit arguments, presets (the checks:
test_checks.py)."""

import ml_collections
import pytest

from bn_jax import cli
from bn_jax import norms
from bn_jax import results
from bn_jax import settings


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
                 dict(dropout=0.0), dict(evals_per_epoch=2), dict(split_seed=1),
                 dict(bn_ema_bias_correction=True)):
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
  assert settings.identity(none) == settings.identity(settings.resolve(
      none, bn_ema_bias_correction=True))
  assert settings.identity(config, data_content='abc') != settings.identity(config)
  assert settings.fit_args(settings.resolve(config, bn_ema_bias_correction=True, bn_momentum=0.9)
                           )['bn_ema_bias_correction'] == 0.9  # the momentum to correct for
  assert settings.fit_args(settings.resolve(none, bn_ema_bias_correction=True))[
      'bn_ema_bias_correction'] is None
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
                            max_steps=11, evals_per_epoch=2, progress=False,
                            save_states_at=(4, 8))
  assert settings.fit_args(config) == dict(
      learning_rate=1e-3, batch_size=32, epochs=5, max_steps=11, chunk_steps=3,
      evals_per_epoch=2, eval_batch_size=7, progress=False, precise_bn_examples=0,
      augment='none', loss_scale=False, bn_ema_bias_correction=None, save_states_at=(4, 8))
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


def test_a_valued_preset_applies_only_at_its_value():
  def get_config():
    return ml_collections.ConfigDict({'scale': 'default', 'epochs': 3, 'data': 'real'})

  def paper(c):
    c.update(epochs=160, data='cifar:x')

  presets = {'scale=paper': paper}
  assert cli.resolve(get_config(), {}, presets).epochs == 3
  assert cli.resolve(get_config(), {'scale': 'other'}, presets).epochs == 3
  c = cli.resolve(get_config(), {'scale': 'paper', 'epochs': 2}, presets)
  assert (c.epochs, c.data) == (2, 'cifar:x')  # applied, then the flag wins


def test_compilation_cache_path_is_the_setting_or_the_user_cache(monkeypatch, tmp_path):
  config = settings.base_config()
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert settings.compilation_cache_path(config) == str(tmp_path / 'bn_jax' / 'jax')
  config.compilation_cache_dir = '/elsewhere/jax'
  assert settings.compilation_cache_path(config) == '/elsewhere/jax'
