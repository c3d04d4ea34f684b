"""The run identity is complete: for every setting of `base_config()`, every norm and every
model, a changed setting that changes a few training steps' numbers changes the identity (a
setting forgotten in a norm's declaration fails here, not in a researcher's sweep)."""

import jax
import numpy as np
import pytest

from bn_jax import checks
from bn_jax import loop
from bn_jax import norms
from bn_jax import settings
from bn_jax import sweep

MODELS = {'mlp': {'hidden': (8,)}, 'cnn': {'features': (4, 4)},
          'resnet': {'resnet_depth': 8, 'resnet_width': 4}}
# Settings whose change is not a change of a run: which seeds (the record's seed names them).
SEEDS = ('seeds', 'first_seed')
# Values to try for string settings (the others: flipped, increased, extended).
CHOICES = {'data': 'synthetic:60:8x8x1', 'optimizer': 'momentum', 'lr_schedule': 'cosine',
           'activation': 'tanh', 'augment': 'crop_flip', 'bn_stats': 'local',
           'half_precision_dtype': 'float16', 'parallel': 'pmap', 'placement': 'per_device',
           'on_code_change': 'reuse', 'bn_batch_of_one': 'warn', 'shard': '0/1',
           'compilation_cache_dir': '/tmp/bn_jax_identity_cache', 'data_dir': '/tmp'}


def _base(model, norm):
  config = settings.base_config()
  config.update(data='synthetic:48:8x8x1', seeds=1, epochs=1, max_steps=2, batch_size=8,
                evals_per_epoch=1, progress=False, tensorboard=False, devices=1,
                compilation_cache=False, model=model, norm=norm, **MODELS[model])
  return config


def _changed(value, key):
  if key in CHOICES:
    return CHOICES[key]
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):  # a fraction stays one (momenta, rates, fractions)
    return value ** 2 if 0 < value < 1 else value * 1.5 if value else 0.1
  if isinstance(value, tuple):
    return value + (value[-1],) if value else (1,)
  return None  # another string: no valid value known


def _numbers(config):
  """Parameters, running statistics and validation loss after the config's steps."""
  dataset = sweep.load_data(config)
  model = settings.make_model(config)
  sched = loop.Schedule(len(dataset.train_labels), config.batch_size, config.epochs,
                        config.max_steps)
  (result,), states = loop.fit(
      model, dataset, seeds=settings.seed_list(config)[:1],
      optimizer=settings.make_optimizer(config, sched.steps_per_epoch, sched.total_steps),
      **{k: v for k, v in settings.fit_args(config).items() if k not in ('progress',)},
      progress=False)
  leaves = jax.tree.leaves((states.params, states.batch_stats))
  return [np.asarray(x, np.float64) for x in leaves] + [np.float64(result['final']['val_loss'])]


def _same(a, b):
  return len(a) == len(b) and all(x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-6)
                                  for x, y in zip(a, b))


@pytest.mark.slow
# Every norm on the MLP and every model with BN: a norm's settings do not depend on the model
# (one declaration, `norms.REGISTRY`) and a model's do not depend on the norm (`settings._layers`).
@pytest.mark.parametrize('model, norm', [('mlp', n) for n in settings.NORMS] +
                         [(m, 'batch') for m in MODELS if m != 'mlp'])
def test_a_setting_that_changes_the_numbers_changes_the_identity(model, norm):
  base = _base(model, norm)
  identity, numbers = settings.identity(base), _numbers(base)
  tried, missing = set(), []
  for key, value in base.items():
    new = _changed(value, key)
    if key in SEEDS or new is None:
      continue
    changed = settings.resolve(base, **{key: new})
    try:
      checks.validate(changed, 1, 54)
    except settings.ConfigError:
      continue  # not a setting this model and norm can take at this value
    tried.add(key)
    if settings.identity(changed) == identity and not _same(_numbers(changed), numbers):
      missing.append(f'{key}={new!r}')
  assert len(tried) >= 40
  declared = norms.REGISTRY[settings.norm_kind(base)]
  assert set(declared.settings.values()) <= tried  # every setting of the norm was changed
  assert not missing, (f'{model}/{norm}: these settings change the numbers but not the run '
                       f'identity: {missing}')
