"""Claims made for BN, measured (their verdicts: `bn_jax.verdicts`): the BN-specific
measurements the claims need (gradient norms per layer, shifted inputs,
statistics re-estimated by a full pass, accuracy with batch statistics), and `Study`, which
runs the study's training through the resumable sweep."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_jax import loop
from bn_jax import precise_bn
from bn_jax import programs
from bn_jax import results
from bn_jax import settings
from bn_jax import sweep
from bn_jax import train

def layer_grad_norms(apply_fn, variables, images, labels):
  """L2 norm of the loss gradient of each Conv / Dense kernel, input layer first (BN in train
  mode; no dropout rng is needed when dropout is 0)."""

  def loss(params):
    logits, _ = apply_fn({**variables, 'params': params}, images, train=True,
                         mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(variables['params'])
  layers = [re.fullmatch(r'(Conv|Dense)_(\d+)', name) for name in grads]
  order = sorted((m[1] == 'Dense', int(m[2]), m[0]) for m in layers if m)  # convs come first
  return [float(jnp.linalg.norm(grads[name]['kernel'])) for _, _, name in order]


def shift(images, a, b):
  """Brightness/contrast shift x * a + b of images in [0, 1] (not clipped)."""
  return images * a + b


def full_pass_batch_stats(model, variables, images):
  """BN statistics of one pass over all `images` (PreciseBN with a single batch): the running
  averages a model would have if they were exactly this data's statistics."""
  return precise_bn.population_stats(model, variables, images, batch_size=len(images))


def accuracy(model, variables, images, labels, batch_statistics=0, chunk=500):
  """Accuracy in eval mode (running averages, `chunk` examples at a time) or, with
  `batch_statistics=B`, normalizing each batch of B examples by its own statistics (train-mode
  BN, dropout off)."""
  if not batch_statistics:
    predicted = np.concatenate([_predict(model, variables, images[i:i + chunk])
                                for i in range(0, len(labels), chunk)])
    return float((predicted == np.asarray(labels)).mean())
  n = len(labels) // batch_statistics * batch_statistics
  plain = precise_bn.without_dropout(model)
  batches = images[:n].reshape((-1, batch_statistics) + images.shape[1:])
  logits = jax.lax.map(lambda x: plain.apply(variables, x, train=True,
                                             mutable=['batch_stats'])[0], batches)
  return float((logits.reshape(n, -1).argmax(-1) == labels[:n]).mean())


@functools.partial(jax.jit, static_argnums=0)  # Flax modules hash by their settings
def _predict(model, variables, images):
  return model.apply(variables, images, train=False).argmax(-1)


class Study:
  """A study's training runs (the claims, a paper reproduction), every one through the
  resumable sweep: recorded in the workdir's results.jsonl with its final state, checkpointed,
  resumed after a kill, and never trained twice (a second call of a finished study trains
  nothing)."""

  def __init__(self, config, dataset, workdir, experiment='claims'):
    self.config, self.dataset, self.workdir = config, dataset, workdir
    self.experiment = experiment

  def runs(self, grid):
    """Trains what is missing of `grid` (a list of overrides of the config); returns, per grid
    entry, its records (seeds in order)."""
    records = sweep.sweep(self.config, self.dataset, grid, experiment=self.experiment,
                          workdir=self.workdir, save_states=True)
    out = []
    for overrides in grid:  # an entry may set its own `seeds`
      n = overrides.get('seeds', self.config.seeds)
      out.append(records[:n])
      records = records[n:]
    return out

  def steps_per_epoch(self, **overrides):
    """Training steps per epoch of the configuration `overrides` describe, on the devices a
    sweep of it uses (several drop the last partial batch)."""
    c = settings.resolve(self.config, **overrides)
    return loop.Schedule(len(self.dataset.train_labels), c.batch_size,
                         num_devices=sweep.make_runner(c).num_devices).steps_per_epoch

  def model(self, **overrides):
    """The model of the configuration `overrides` describe."""
    return settings.make_model(settings.resolve(self.config, **overrides))

  def initial_variables(self, record, **overrides):
    """The variables a run started from (step 0): its seed's init under the configuration
    `overrides` describe (the same numbers `loop.fit` starts from)."""
    keys = programs.seed_keys([record['seed']])[:, 0]
    model = self.model(**overrides)
    stacked = train.init_variables(model, keys, (1,) + self.dataset.image_shape)
    return jax.tree.map(lambda x: np.asarray(x[0]), stacked)

  def variables(self, record, step=None):
    """A run's final variables {'params', 'batch_stats'}, or those at one of its
    `save_states_at` steps."""
    return results.load_state(self.workdir, record, step)


def final(records, name):
  """Per seed: a final metric (NaN for diverged runs)."""
  return np.array([r['final'][name] if r['status'] == 'ok' else np.nan for r in records])
