"""The one step timer: seconds per train step and per eval step of models, as the training
loop runs them (one seed, one `train_chunks` call of `steps` steps, compiled and warmed up
first). Used by the overhead claim and by benchmarks/speed.py.

Models compared with each other are timed in turn within every repeat (model A, model B, A,
B, ...), so the two times of one repeat are taken seconds apart. Timed one model after the
other, a change in the machine's speed between the two blocks flipped the BN / no BN ratio of
the overhead claim from 0.94 to 1.29 between two runs of the same code (on the 2-core CPU a
batch-16 BN step alone on the machine took 143 µs or 386 µs, switching every few seconds)."""

import time

import jax
import numpy as np

from bn_jax import host
from bn_jax import train


def step_times(models, data, batch_size, steps=200, repeats=1):
  """Times `repeats` rounds; a round times `steps` train steps, then as many eval steps, of
  each model in turn.

  Args:
    models: {name: a Flax model of bn_jax.models}.
    data: a `host.DeviceData`.
    batch_size: examples per step.
    steps: steps per timed chunk.
    repeats: rounds.
  Returns:
    {name: {'train': [seconds per train step] * repeats, 'eval': [seconds per eval step] *
    repeats, 'state_bytes': bytes of params, BN statistics and optimizer state}}; entry i of
    every model's lists comes from round i.
  """
  rngs = jax.random.split(jax.random.key(1), 1)
  n = data.size('train')
  order = jax.device_put(np.stack([host.epoch_order(
      0, 0, num_examples=n, batch_size=batch_size, num_rows=max(steps, -(-n // batch_size)))]))
  rows = jax.device_put(np.arange(steps * batch_size).reshape(steps, batch_size) % n)
  train_fn = lambda s: train.train_chunks(s, data.arrays, order, rngs, 0, steps)
  eval_fn = lambda s: train.evaluate_seeds(s, data.arrays, rows)
  states, out = {}, {}
  for name, model in models.items():
    states[name] = train.init_states(model, jax.random.split(jax.random.key(0), 1), 1e-3,
                                     (1,) + data.image_shape)
    states[name], sums = train_fn(states[name])  # compile and warm up both
    jax.block_until_ready((sums, eval_fn(states[name])))
    out[name] = {'train': [], 'eval': [], 'state_bytes': sum(x.nbytes for x in jax.tree.leaves(
        (states[name].params, states[name].batch_stats, states[name].opt_state)))}
  for _ in range(repeats):
    for name in models:
      t0 = time.perf_counter()
      states[name], sums = train_fn(states[name])
      jax.block_until_ready(sums)
      out[name]['train'].append((time.perf_counter() - t0) / steps)
      t0 = time.perf_counter()
      jax.block_until_ready(eval_fn(states[name]))
      out[name]['eval'].append((time.perf_counter() - t0) / steps)
  return out
