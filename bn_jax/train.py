"""TrainState with `batch_stats`, the pure train / eval steps, and the chunked training loop.

Everything above `fit` is a pure function of its arguments, jit-able as is. The loop runs a
`lax.scan` of `train_step` over a chunk of K steps per dispatch (K up to a whole epoch), with the
dataset on the device passed as an argument, and seeds stacked on a leading axis (`jax.vmap`), so
one compiled program trains every seed of a configuration.
"""

import functools
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from tqdm.auto import tqdm


class TrainState(train_state.TrainState):
  """Params, Adam state and step, plus the BN running averages."""
  batch_stats: Any = flax.struct.field(default_factory=dict)


def create_train_state(model, rng, learning_rate, input_shape=(1, 28, 28, 1)):
  """Initializes params and BN statistics; Adam with the rate as a state entry (vmappable)."""
  variables = model.init({'params': rng}, jnp.zeros(input_shape, jnp.float32), train=False)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}))


def metric_sums(logits, labels, mask):
  """Sums of loss and correct predictions over the real (mask=1) examples, and their count."""
  mask = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def train_step(state, batch, rng, *, axis_name=None):
  """One Adam step on `batch` ({'image', 'label', 'mask'}); returns (state, metric sums).

  Under several devices the same function runs per device with `axis_name` set: the loss is
  the mean over the global batch, so summing gradients across devices averages them.
  """
  rng = jax.random.fold_in(rng, state.step)  # fresh dropout mask every step
  if axis_name is not None:
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))  # ... and on every device

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mask=batch['mask'], mutable=['batch_stats'], rngs={'dropout': rng})
    sums = metric_sums(logits, batch['label'], batch['mask'])
    count = sums['count'] if axis_name is None else lax.psum(sums['count'], axis_name)
    return sums['loss'] / jnp.maximum(count, 1.0), (sums, updates)

  grads, (sums, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, sums = lax.psum((grads, sums), axis_name)
  state = state.apply_gradients(
      grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  return state, sums


def eval_step(state, batch, *, axis_name=None):
  """Metric sums of the model in eval mode (BN running averages) on a padded batch."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  sums = metric_sums(logits, batch['label'], batch['mask'])
  return sums if axis_name is None else lax.psum(sums, axis_name)


def gather_batch(data, idx):
  """Rows `idx` of (images, labels); index -1 marks padding (mask 0)."""
  images, labels = data
  safe = jnp.maximum(idx, 0)
  return {'image': images[safe], 'label': labels[safe], 'mask': idx >= 0}


def epoch_order(rng, epoch, *, num_examples, batch_size, num_rows):
  """The epoch's shuffle as (num_rows, batch_size) indices, padded with -1.

  A function of (rng, epoch) alone, so any chunk of any epoch can be recomputed on restart.
  """
  perm = jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)
  pad = num_rows * batch_size - num_examples
  return jnp.concatenate([perm, -jnp.ones(pad, perm.dtype)]).reshape(num_rows, batch_size)


def train_chunk(state, data, order, start, rng, *, num_steps, axis_name=None):
  """`num_steps` train steps in one `lax.scan`, on rows start.. of `order`; summed metrics.

  `data` is passed in, never closed over (a closed-over array is baked into the program). A row
  that is all padding is a no-op step, so chunks need not divide the epoch.
  """

  def body(state, i):
    batch = gather_batch(data, lax.dynamic_index_in_dim(order, start + i, keepdims=False))
    new_state, sums = train_step(state, batch, rng, axis_name=axis_name)
    state = jax.tree.map(lambda new, old: jnp.where(sums['count'] > 0, new, old),
                         new_state, state)
    return state, sums

  state, sums = lax.scan(body, state, jnp.arange(num_steps))
  return state, jax.tree.map(lambda x: jnp.sum(x, 0), sums)


def evaluate(state, data, *, batch_size, axis_name=None):
  """Metric sums over a whole dataset in padded, masked batches: each example counts once."""
  n = data[1].shape[0]
  rows = math.ceil(n / batch_size)
  order = jnp.concatenate([jnp.arange(n), -jnp.ones(rows * batch_size - n, jnp.int32)])

  def body(sums, idx):
    step_sums = eval_step(state, gather_batch(data, idx), axis_name=axis_name)
    return jax.tree.map(jnp.add, sums, step_sums), None

  zeros = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  sums, _ = lax.scan(body, jax.tree.map(jnp.float32, zeros),
                     order.reshape(rows, batch_size))
  return sums


def means(sums):
  """Metric sums (numpy, any leading axes) -> mean loss and accuracy."""
  count = np.maximum(np.asarray(sums['count']), 1.0)
  return {'loss': np.asarray(sums['loss']) / count,
          'accuracy': np.asarray(sums['correct']) / count}


# --- The loop -----------------------------------------------------------------------------------

def fit(model, dataset, *, seeds=(0,), learning_rate=1e-3, batch_size=32, epochs=5,
        chunk_steps=0, eval_batch_size=1000, progress=True, desc='train'):
  """Trains one configuration for every seed at once; returns one result dict per seed.

  `chunk_steps` is K, the number of steps per dispatched program (0: a whole epoch). Each
  result holds `history` (per epoch: train loss/accuracy as averages over the epoch's batches
  in train mode, validation loss/accuracy, seconds), `final` (last epoch's numbers, test
  metrics and eval-mode metrics on the whole training set), `status` and `compile_seconds`.
  """
  n_train = len(dataset.train_labels)
  if not 0 < batch_size <= n_train:
    raise ValueError(f'batch_size must be in [1, {n_train}] (the training set size), '
                     f'got {batch_size}.')
  steps_per_epoch = math.ceil(n_train / batch_size)  # the last batch may be partial
  k = steps_per_epoch if chunk_steps <= 0 else min(chunk_steps, steps_per_epoch)
  n_chunks = math.ceil(steps_per_epoch / k)
  seeds = list(seeds)

  put = lambda x, y: (jax.device_put(x), jax.device_put(y))
  train_data = put(dataset.train_images, dataset.train_labels)
  val_data = put(dataset.val_images, dataset.val_labels)
  test_data = put(dataset.test_images, dataset.test_labels)
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(jnp.asarray(seeds))
  init_keys, dropout_keys, shuffle_keys = keys[:, 0], keys[:, 1], keys[:, 2]

  # Compile every program once, ahead of time, and time it apart from training.
  t0 = time.perf_counter()
  init = jax.jit(jax.vmap(lambda key: create_train_state(
      model, key, learning_rate, (1,) + dataset.train_images.shape[1:])))
  states = init(init_keys)
  order_fn = jax.jit(jax.vmap(functools.partial(
      epoch_order, num_examples=n_train, batch_size=batch_size, num_rows=n_chunks * k),
      in_axes=(0, None))).lower(shuffle_keys, 0).compile()
  chunk_fn = jax.jit(jax.vmap(functools.partial(train_chunk, num_steps=k),
                              in_axes=(0, None, 0, None, 0)), donate_argnums=0)
  order0 = order_fn(shuffle_keys, 0)
  chunk_fn = chunk_fn.lower(states, train_data, order0, 0, dropout_keys).compile()
  eval_fn = jax.jit(jax.vmap(functools.partial(evaluate, batch_size=eval_batch_size),
                             in_axes=(0, None)))
  eval_val = eval_fn.lower(states, val_data).compile()
  compile_seconds = time.perf_counter() - t0

  histories = [[] for _ in seeds]
  diverged_at = [None] * len(seeds)
  bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
  for epoch in range(epochs):
    t_epoch = time.perf_counter()
    order = order_fn(shuffle_keys, epoch)
    epoch_sums = None
    for c in range(n_chunks):
      states, sums = chunk_fn(states, train_data, order, c * k, dropout_keys)
      epoch_sums = sums if epoch_sums is None else jax.tree.map(jnp.add, epoch_sums, sums)
      # One host sync per chunk: progress, and a NaN/inf check on the chunk's loss sums.
      loss = np.asarray(sums['loss'])
      for s in np.flatnonzero(~np.isfinite(loss)):
        if diverged_at[s] is None:
          diverged_at[s] = {'epoch': epoch, 'step': epoch * steps_per_epoch + min(
              (c + 1) * k, steps_per_epoch)}
      bar.update(min((c + 1) * k, steps_per_epoch) - c * k)
    train = means(jax.device_get(epoch_sums))
    val = means(jax.device_get(eval_val(states, val_data)))
    seconds = time.perf_counter() - t_epoch
    for s in range(len(seeds)):
      histories[s].append({
          'epoch': epoch + 1, 'train_loss': float(train['loss'][s]),
          'train_accuracy': float(train['accuracy'][s]), 'val_loss': float(val['loss'][s]),
          'val_accuracy': float(val['accuracy'][s]), 'seconds': seconds})
    bar.set_postfix(val_acc=f'{np.nanmean(val["accuracy"]):.4f}')
    if all(d is not None for d in diverged_at):
      break  # every seed diverged: nothing left to learn
  bar.close()

  test = means(jax.device_get(eval_fn(states, test_data)))
  train_eval = means(jax.device_get(eval_fn(states, train_data)))
  results = []
  for s, seed in enumerate(seeds):
    last = histories[s][-1]
    final = {key: last[key] for key in ('train_loss', 'train_accuracy', 'val_loss',
                                        'val_accuracy')}
    final.update(test_loss=float(test['loss'][s]), test_accuracy=float(test['accuracy'][s]),
                 train_eval_loss=float(train_eval['loss'][s]),
                 train_eval_accuracy=float(train_eval['accuracy'][s]))
    results.append({'seed': seed, 'history': histories[s], 'final': final,
                    'status': 'ok' if diverged_at[s] is None else 'diverged',
                    'diverged_at': diverged_at[s], 'compile_seconds': compile_seconds,
                    'steps_per_epoch': steps_per_epoch})
  return results, states
