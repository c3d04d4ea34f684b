"""A configuration's programs: its initial states, and its init, eval and train-chunk
programs lowered and compiled ahead of time (`compile_programs`), with their fingerprint
(`code_version.programs_fingerprint`).

A sweep compiles every configuration's programs from a thread pool while others train; `fit`
then dispatches them without compiling.
"""

import dataclasses
import math
import threading
import time

import jax
import jax.numpy as jnp

from bn_jax import code_version
from bn_jax import optim
from bn_jax.host import ONE_DEVICE
from bn_jax.train import TrainState
from bn_jax.host import index_rows
from bn_jax.train import init_states
from bn_jax.train import init_variables
from bn_jax.train import states_of
from bn_jax.train import without_optimizer


@dataclasses.dataclass
class Programs:
  """A configuration's initial states (seeds stacked) after compiling its programs, and their
  fingerprint (`code_version.programs_fingerprint`)."""
  states: TrainState
  compile_seconds: float
  fingerprint: str = ''


def compile_programs(model, data, schedule, *, seeds, learning_rate, eval_batch_size=1000,
                     runner=ONE_DEVICE, optimizer=None, augment='none', loss_scale=False):
  """Initializes the states and compiles the train-chunk and eval programs ahead of time.

  Compiled programs land in jit's cache, so `fit` dispatches them without compiling; a sweep
  calls this for all its configurations at once from a thread pool.
  """
  t0 = time.perf_counter()
  states, lowered = lower_programs(model, data, schedule, seeds=seeds,
                                   learning_rate=learning_rate, eval_batch_size=eval_batch_size,
                                   runner=runner, optimizer=optimizer, augment=augment,
                                   loss_scale=loss_scale, compile_eval=True)
  lowered[-1].compile()
  return Programs(states, time.perf_counter() - t0, code_version.programs_fingerprint(lowered))


def program_fingerprint(model, data, schedule, **kwargs):
  """The fingerprint `compile_programs` gives these programs, without compiling them."""
  return code_version.programs_fingerprint(lower_programs(model, data, schedule, **kwargs)[1])


def lower_programs(model, data, schedule, *, seeds, learning_rate, eval_batch_size=1000,
                   runner=ONE_DEVICE, optimizer=None, augment='none', loss_scale=False,
                   compile_eval=False):
  """The initial states and the lowered init, eval and train-chunk programs."""
  eval_batch_size = eval_batch_size_on(eval_batch_size, runner)
  keys = seed_keys(seeds)
  tx = optimizer or optim.make_optimizer('adam', learning_rate=float(learning_rate))
  shape = (1,) + data.image_shape
  rows = runner.abstract(eval_blocks(data, 'val', eval_batch_size).shape[1:], jnp.int32,
                         split_last=True)
  # A model's init and eval programs serve all its configurations: one thread compiles them,
  # the others wait and find them in jit's cache (two threads compiling one program at once
  # do the work twice, and their writes of one persistent-cache file can interleave: measured,
  # a truncated cache entry).
  model, lock = _shared_model(model)
  with lock:
    variables = init_variables(model, keys[:, 0], shape)
    lowered = [init_variables.lower(model, keys[:, 0], shape),
               states_of.lower(model, variables, tx, augment, bool(loss_scale))]
    states = runner.put(jax.device_get(init_states(model, keys[:, 0], learning_rate, shape,
                                                   tx, augment, loss_scale)))
    lowered.append(runner.evaluate.lower(without_optimizer(states), data.arrays, rows))
    if compile_eval:
      lowered[-1].compile()
  order = runner.abstract(
      (len(seeds), schedule.steps_per_epoch, schedule.batch_size), jnp.int32,
      split_last=True)
  lowered.append(runner.train_chunks.lower(states, data.arrays, order,
                                           runner.put(keys[:, 1]), 0, 0))
  return states, lowered


_MODELS, _MODELS_GUARD = {}, threading.Lock()


def _shared_model(model):
  """The first model seen equal to `model` (Flax modules hash and compare by their fields),
  and its lock. States built from it share one `apply_fn`: bound methods compare their module
  by identity, so equal but distinct models would give every configuration its own eval
  program (measured: 10 eval compiles in the 10-configuration grid instead of 2)."""
  with _MODELS_GUARD:
    return _MODELS.setdefault(model, (model, threading.Lock()))


def seed_keys(seeds):
  """Per seed: (init key, dropout key); (seeds, 2) keys."""
  return jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(list(seeds)))


def eval_batch_size_on(batch_size, runner):
  """Rounded up to a multiple of the device count: eval batches split evenly too."""
  return -(-batch_size // runner.num_devices) * runner.num_devices


def eval_blocks(data, split, batch_size):
  """A split's indices as blocks of R rows (R = the validation set's rows), so one compiled
  eval program serves every split."""
  rows_per_block = max(1, math.ceil(data.size('val') / batch_size))
  rows = math.ceil(data.size(split) / batch_size)
  blocks = math.ceil(rows / rows_per_block)
  return index_rows(data.splits[split], batch_size, blocks * rows_per_block).reshape(
      blocks, rows_per_block, batch_size)
