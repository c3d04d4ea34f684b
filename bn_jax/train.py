"""TrainState with `batch_stats`, the pure train / eval steps, and their chunked programs.

`train_step` and `eval_step` are pure functions of their arguments, jit-able as is, with an
optional `axis_name` for data parallelism. `train_chunk` runs any number of them (up to a
whole epoch) in one `lax.fori_loop`, with the dataset on the device passed as an argument; the
seeds of a configuration are stacked on a leading axis (`jax.vmap`), so one compiled program
trains them all. The loop that drives these programs is `bn_jax.loop.fit`.

Images stay uint8 on the device: `gather_batch` turns a batch's pixels into float32 model
inputs by the dataset's lookup table (`data.Dataset.pixel_table`: pixel / 255, standardized
or not), an entry of `DeviceData.arrays` like the pixels, so nothing is closed over. Data
augmentation (`bn_jax.augment`) is a static field of the `TrainState`, applied in `train_step`
only, with keys drawn from the run's rng and the step.
"""

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
from jax import lax

from bn_jax import augment as augmentations
from bn_jax import data as datasets
from bn_jax import optim


class TrainState(train_state.TrainState):
  """Params, optimizer state and step, plus the BN running averages, the (static) data
  augmentation of the train step, one of `augment.AUGMENTATIONS`, and for float16 compute
  the loss scale (Flax's `DynamicScale`; None otherwise)."""
  batch_stats: Any = flax.struct.field(default_factory=dict)
  augment: str = flax.struct.field(pytree_node=False, default='none')
  dynamic_scale: Optional[dynamic_scale_lib.DynamicScale] = None


def create_train_state(model, rng, learning_rate=None, input_shape=(1, 28, 28, 1), tx=None,
                       augment='none', loss_scale=False):
  """Initializes params, BN statistics and the optimizer state (its rate a vmappable entry).

  Args:
    model: a Flax module (`bn_jax.models.create_model`).
    rng: the init key.
    learning_rate: Adam's rate when `tx` is None (not needed with a `tx`).
    input_shape: the shape of a dummy batch.
    tx: an optimizer from `bn_jax.optim.make_optimizer`; None gives its Adam at
      `learning_rate`.
    augment: the train step's data augmentation, one of `augment.AUGMENTATIONS`.
    loss_scale: train with dynamic loss scaling (for float16 compute).

  Returns:
    A `TrainState`.
  """
  augmentations.check(augment)
  tx = _default_tx(tx, learning_rate)
  variables = model.init({'params': rng}, jnp.zeros(input_shape, jnp.float32), train=False)
  return state_of(model, variables, tx, augment, loss_scale)


def _default_tx(tx, learning_rate):
  """`tx`, or the Adam at `learning_rate` the sweep builds from a default config."""
  if tx is not None:
    return tx
  if learning_rate is None:
    raise ValueError('create_train_state needs learning_rate (for its default Adam) or tx (an '
                     'optimizer, e.g. from optim.make_optimizer).')
  return optim.make_optimizer('adam', learning_rate=float(learning_rate))


def state_of(model, variables, tx, augment='none', loss_scale=False):
  """The `TrainState` of `model`'s `variables` at the start of training: the one place a
  state is built (`create_train_state` for one seed, `states_of` for stacked seeds)."""
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}), augment=augment,
                           dynamic_scale=dynamic_scale_lib.DynamicScale() if loss_scale else None)


def metric_sums(logits, labels, mask):
  """Sums of loss and correct predictions over the real (mask=1) examples, and their count."""
  mask = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def train_step(state, batch, rng, *, axis_name=None):
  """One optimizer step on `batch` ({'image', 'label', 'mask'}); returns (state, metric sums).

  Under several devices the same function runs per device with `axis_name` set: the loss is
  the mean over the global batch, so summing gradients across devices averages them.
  `state.augment` transforms the images first, example i of the global batch by a key from
  (rng, step, i) alone: the same whatever the chunking or the number of devices.
  """
  rng = jax.random.fold_in(rng, state.step)  # fresh dropout mask every step
  first = 0 if axis_name is None else lax.axis_index(axis_name) * len(batch['mask'])
  images = augmentations.apply(state.augment, batch['image'],
                               jax.random.fold_in(rng, augmentations.STREAM), first)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))  # ... and on every device

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mask=batch['mask'], mutable=['batch_stats'], rngs={'dropout': rng})
    sums = metric_sums(logits, batch['label'], batch['mask'])
    count = sums['count'] if axis_name is None else lax.psum(sums['count'], axis_name)
    return sums['loss'] / jnp.maximum(count, 1.0), (sums, updates)

  params = state.params
  if axis_name is not None:
    # Each device's own gradient, summed below. Without the cast, shard_map differentiates the
    # replicated params into an already summed gradient, and the psum below would count it
    # once per device (measured: 8x the gradient on 8 devices; pmap's cast is a no-op).
    params = jax.tree.map(lambda p: lax.pcast(p, axis_name, to='varying'), params)
  scaler = state.dynamic_scale
  if scaler is None:
    grads, (sums, updates) = jax.grad(loss_fn, has_aux=True)(params)
  else:  # float16: the loss scaled up for the gradient, the gradient scaled back down
    scaler, finite, (_, (sums, updates)), grads = scaler.value_and_grad(
        loss_fn, has_aux=True, axis_name=axis_name)(params)
    if axis_name is not None:  # DynamicScale averaged the devices' parts: the step sums them
      grads = jax.tree.map(lambda g: g * lax.psum(1, axis_name), grads)
  batch_stats = updates.get('batch_stats', state.batch_stats)
  if axis_name is not None:
    if scaler is None:
      grads = lax.psum(grads, axis_name)
    sums = lax.psum(sums, axis_name)
    # BN running averages stay identical on every device. With per-device (local / ghost)
    # statistics, averaging every step is exact: the EMA of the mean is the mean of the EMAs.
    batch_stats = lax.pmean(batch_stats, axis_name)
  new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if scaler is not None:  # an overflowing step changes only the scale (Flax's imagenet example)
    keep = lambda a, b: jax.tree.map(functools.partial(jnp.where, finite), a, b)
    new = new.replace(params=keep(new.params, state.params),
                      opt_state=keep(new.opt_state, state.opt_state), dynamic_scale=scaler)
  return new, sums


def eval_step(state, batch, *, axis_name=None):
  """Metric sums of the model in eval mode (BN running averages) on a padded batch."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  sums = metric_sums(logits, batch['label'], batch['mask'])
  return sums if axis_name is None else lax.psum(sums, axis_name)


def without_optimizer(states):
  """`states` as evaluation sees them: no optimizer (`evaluate` reads params and batch_stats),
  so configurations that differ only in optimizer, schedule or batch size share one compiled
  evaluation program."""
  return states.replace(tx=None, opt_state=None)


def gather_batch(data, idx):
  """Rows `idx` of `DeviceData.arrays` (pixels, labels, pixel table) as a batch of float32
  model inputs (`data.to_inputs`) and labels; index -1 marks padding (mask 0)."""
  pixels, labels, table = data
  safe = jnp.maximum(idx, 0)
  return {'image': datasets.to_inputs(pixels[safe], table), 'label': labels[safe],
          'mask': idx >= 0}


def train_chunk(state, data, order, rng, start, stop, *, axis_name=None):
  """Steps on rows start .. stop-1 of `order` in one `lax.fori_loop`; summed metrics.

  The trip count is a run-time value, so one compiled program runs chunks of any length.
  `data` is passed in, never closed over (a closed-over array is baked into the program).
  """
  zeros = jax.tree.map(jnp.float32, {'loss': 0.0, 'correct': 0.0, 'count': 0.0})

  def body(i, carry):
    state, sums = carry
    batch = gather_batch(data, lax.dynamic_index_in_dim(order, i, keepdims=False))
    state, step_sums = train_step(state, batch, rng, axis_name=axis_name)
    return state, jax.tree.map(jnp.add, sums, step_sums)

  return lax.fori_loop(start, stop, body, (state, zeros))


def evaluate(state, data, rows, *, axis_name=None):
  """Metric sums over rows of indices (-1 = padding): each listed example counts once."""

  def body(sums, idx):
    step_sums = eval_step(state, gather_batch(data, idx), axis_name=axis_name)
    return jax.tree.map(jnp.add, sums, step_sums), None

  zeros = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  sums, _ = lax.scan(body, jax.tree.map(jnp.float32, zeros), rows)
  return sums


def over_seeds(fn, in_axes):
  """`jax.vmap(fn, in_axes)` over a leading seed axis; a single seed runs unbatched, since a
  vmap of size one turns matmuls into batched matmuls (measured ~20% slower on CPU)."""

  def mapped(*args):
    batched = [a for a, ax in zip(args, in_axes) if ax == 0]
    if jax.tree.leaves(batched)[0].shape[0] > 1:
      return jax.vmap(fn, in_axes)(*args)
    args = [jax.tree.map(lambda x: x[0], a) if ax == 0 else a for a, ax in zip(args, in_axes)]
    return jax.tree.map(lambda x: x[None], fn(*args))

  return mapped


# Seeds stacked on axis 0: one program trains / evaluates every seed of a configuration.
@functools.partial(jax.jit, static_argnums=(0, 2))
def init_variables(model, rngs, input_shape=(1, 28, 28, 1)):
  """`model`'s variables for every seed's rng (stacked on axis 0). Compiled once per model and
  input shape: a sweep's configurations that differ only in batch size or optimizer share it
  (Flax modules with equal fields are equal)."""
  return jax.vmap(lambda rng: model.init({'params': rng}, jnp.zeros(input_shape, jnp.float32),
                                         train=False))(rngs)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def states_of(model, variables, tx, augment, loss_scale):
  """The seeds' `TrainState`s from their stacked `variables` (`state_of` per seed)."""
  return jax.vmap(lambda v: state_of(model, v, tx, augment, loss_scale))(variables)


def init_states(model, rngs, learning_rate, input_shape=(1, 28, 28, 1), tx=None,
                augment='none', loss_scale=False):
  """`create_train_state` for every seed's rng (stacked on axis 0), `tx`, `augment` and
  `loss_scale` as there; the same numbers, from two programs (`init_variables`, then the
  optimizer state)."""
  augmentations.check(augment)
  tx = _default_tx(tx, learning_rate)
  return states_of(model, init_variables(model, rngs, input_shape), tx, augment,
                    bool(loss_scale))


train_chunks = jax.jit(over_seeds(train_chunk, (0, None, 0, 0, None, None)), donate_argnums=0)
evaluate_seeds = jax.jit(over_seeds(evaluate, (0, None, None)))
