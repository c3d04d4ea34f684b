"""PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore's precise_bn.py):
BN's population statistics recomputed after training as true averages over batches, instead
of the exponential moving averages kept during training.

Each batch of `batch_size` training examples goes through the model in train mode (its own
batch statistics, as in training) with dropout off; the population mean and variance of every
BN layer are the plain averages of the per-batch means and variances. With one batch holding
the whole set they are that set's exact statistics (the full pass of the claims study).

`bias_corrected` is the cheaper control: the moving averages themselves, with the weight of
their initial values removed as Adam does for its moments.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import norms

STATISTICS = ('mean', 'var')  # the batch_stats leaves recomputed; others (counters) are kept


def exact_model(model):
  """`model` with BN momentum 0 (running averages = the last batch's statistics), no
  dropout, and statistics of its own batch (no cross-device axis)."""
  norm = norms.resolve(model.norm)
  changes = {'momentum': 0.0}
  if hasattr(norm, 'axis_name'):
    changes['axis_name'] = None
  return without_dropout(model).clone(norm=norm.replace(**changes))


def without_dropout(model):
  """`model` with dropout off (the ResNet has none)."""
  return model.clone(dropout=0.0) if hasattr(model, 'dropout') else model


@functools.partial(jax.jit, static_argnums=(0,))
def _batch_statistics(exact, variables, batches):
  """Per batch (leading axis of `batches`): the BN statistics of that batch alone."""

  def one(images):
    _, updates = exact.apply(variables, images, train=True, mutable=['batch_stats'])
    return updates['batch_stats']

  return jax.lax.map(one, batches)


def population_stats(model, variables, images, batch_size):
  """BN population statistics of `images` as averages over batches of `batch_size`.

  Args:
    model: a bn_jax model with a BN-like norm (its constructor has `replace(momentum=...)`).
    variables: {'params', 'batch_stats'} of one seed.
    images: (N, ...) examples; the first N // batch_size * batch_size are used (at least one
      batch: a `batch_size` above N means one batch of all N).
    batch_size: examples per batch (the training batch size, as PreciseBN prescribes).
  Returns:
    A `batch_stats` tree like `variables['batch_stats']`, its means and variances replaced.
  """
  batch_size = min(batch_size, len(images))
  n = len(images) // batch_size * batch_size
  batches = jnp.asarray(images[:n]).reshape((-1, batch_size) + images.shape[1:])
  per_batch = _batch_statistics(exact_model(model), variables, batches)
  averaged = jax.tree.map(lambda x: jnp.mean(x, 0), per_batch)
  return jax.tree_util.tree_map_with_path(
      lambda path, old, new: new if path[-1].key in STATISTICS else old,
      variables['batch_stats'], averaged)


def seeds_population_stats(model, states, seeds, num_train, num_examples, images_of,
                           batch_size):
  """`population_stats` for each seed of host `states` (seeds stacked on the leading axis),
  over `images_of(rows)` of the seed's `sample`; stacked likewise."""
  per_seed = []
  for s, seed in enumerate(seeds):
    variables = {'params': states.params, 'batch_stats': states.batch_stats}
    variables = jax.tree.map(lambda x: x[s], variables)  # pylint: disable=cell-var-from-loop
    images = images_of(sample(num_train, num_examples, seed))
    per_seed.append(population_stats(model, variables, images, batch_size))
  return jax.tree.map(lambda *x: np.stack(x), *per_seed)


def sample(num_train, num_examples, seed):
  """The training examples PreciseBN uses for `seed`: a fixed random subset of
  `num_examples` (all of them when `num_examples` >= `num_train`)."""
  order = np.random.default_rng([seed, 2021]).permutation(num_train)
  return order[:num_examples]


def bias_corrected(batch_stats, momentum, steps):
  """BN running averages with their initial values' weight removed (Adam's bias correction).

  After t updates x <- m x + (1 - m) b_i from x_0, x_t = m^t x_0 + (1 - m^t) * (the weighted
  average of the b_i). The means start at 0: mean / (1 - m^t). The variances start at 1:
  1 + (var - 1) / (1 - m^t). Other leaves (counters) are kept. `steps` >= 1.
  """
  keep = 1.0 - float(momentum) ** int(steps)
  correct = {'mean': lambda x: x / keep, 'var': lambda x: 1.0 + (x - 1.0) / keep}
  return jax.tree_util.tree_map_with_path(
      lambda path, x: correct[path[-1].key](x) if path[-1].key in correct else x, batch_stats)
