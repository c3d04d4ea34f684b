"""The one step timer: seconds per train step and per eval step of a model, as the
training loop runs them (one seed, one `train_chunks` call of `steps` steps, compiled and
warmed up first). Used by the overhead claim and by benchmarks/speed.py."""

import time

import jax
import numpy as np

from bn_jax import train


def step_times(model, data, batch_size, steps=200, repeats=1):
  """Times `repeats` chunks of `steps` train steps and as many eval steps.

  Args:
    model: a Flax model of bn_jax.models.
    data: a `train.DeviceData`.
    batch_size: examples per step.
  Returns:
    {'train': [seconds per train step] * repeats, 'eval': [seconds per eval step] * repeats,
     'state_bytes': bytes of params, BN statistics and optimizer state}.
  """
  states = train.init_states(model, jax.random.split(jax.random.key(0), 1), 1e-3,
                             (1,) + data.image_shape)
  rngs = jax.random.split(jax.random.key(1), 1)
  n = data.size('train')
  order = jax.device_put(np.stack([train.epoch_order(
      0, 0, num_examples=n, batch_size=batch_size, num_rows=max(steps, -(-n // batch_size)))]))
  rows = jax.device_put(np.arange(steps * batch_size).reshape(steps, batch_size) % n)
  train_fn = lambda s: train.train_chunks(s, data.arrays, order, rngs, 0, steps)
  eval_fn = lambda s: train.evaluate_seeds(s, data.arrays, rows)
  states, sums = train_fn(states)  # compile and warm up both
  jax.block_until_ready((sums, eval_fn(states)))
  out = {'train': [], 'eval': [], 'state_bytes': sum(
      x.nbytes for x in jax.tree.leaves((states.params, states.batch_stats, states.opt_state)))}
  for _ in range(repeats):
    t0 = time.perf_counter()
    states, sums = train_fn(states)
    jax.block_until_ready(sums)
    out['train'].append((time.perf_counter() - t0) / steps)
    t0 = time.perf_counter()
    jax.block_until_ready(eval_fn(states))
    out['eval'].append((time.perf_counter() - t0) / steps)
  return out
