"""TrainState with `batch_stats`, the pure train / eval steps, and the chunked training loop.

Everything above `fit` is a pure function of its arguments, jit-able as is. The loop runs a
`lax.scan` of `train_step` over a chunk of K steps per dispatch (K up to a whole epoch), with the
dataset on the device passed as an argument, and seeds stacked on a leading axis (`jax.vmap`), so
one compiled program trains every seed of a configuration.
"""

import dataclasses
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

from bn_jax import checkpoint


class TrainState(train_state.TrainState):
  """Params, Adam state and step, plus the BN running averages."""
  batch_stats: Any = flax.struct.field(default_factory=dict)


def create_train_state(model, rng, learning_rate, input_shape=(1, 28, 28, 1)):
  """Initializes params and BN statistics; Adam, its rate a state entry (so it can be vmapped)."""
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
  batch_stats = updates.get('batch_stats', state.batch_stats)
  if axis_name is not None:
    grads, sums = lax.psum((grads, sums), axis_name)
    # BN running averages stay identical on every device. With per-device (local / ghost)
    # statistics, averaging every step is exact: the EMA of the mean is the mean of the EMAs.
    batch_stats = lax.pmean(batch_stats, axis_name)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), sums


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


def train_chunk(state, data, order, rng, start, stop, *, num_steps, axis_name=None):
  """Steps on rows start .. start+num_steps-1 of `order` in one `lax.scan`; summed metrics.

  Rows from `stop` on are skipped (state unchanged), so chunks need not divide the epoch.
  `data` is passed in, never closed over (a closed-over array is baked into the program).
  """
  no_metrics = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}

  def body(state, i):
    batch = gather_batch(data, lax.dynamic_index_in_dim(order, start + i, keepdims=False))
    return lax.cond(start + i < stop,
                    lambda s: train_step(s, batch, rng, axis_name=axis_name),
                    lambda s: (s, jax.tree.map(jnp.float32, no_metrics)), state)

  state, sums = lax.scan(body, state, jnp.arange(num_steps))
  return state, jax.tree.map(lambda x: jnp.sum(x, 0), sums)


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
init_states = jax.jit(
    jax.vmap(create_train_state, in_axes=(None, 0, None, None)),
    static_argnums=(0, 3))
train_chunks = jax.jit(
    lambda states, data, order, rngs, start, stop, num_steps: over_seeds(
        functools.partial(train_chunk, num_steps=num_steps),
        (0, None, 0, 0, None, None))(states, data, order, rngs, start, stop),
    static_argnums=6, donate_argnums=0)
evaluate_seeds = jax.jit(over_seeds(evaluate, (0, None, None)))


# --- Host side: indices, data on the device, metrics ----------------------------------------

def index_rows(indices, batch_size, num_rows=None):
  """Indices -> (num_rows, batch_size) int32 rows, padded at the end with -1."""
  num_rows = num_rows or max(1, math.ceil(len(indices) / batch_size))
  rows = np.full(num_rows * batch_size, -1, np.int32)
  rows[:len(indices)] = indices
  return rows.reshape(num_rows, batch_size)


def epoch_order(seed, epoch, *, num_examples, batch_size, num_rows):
  """The epoch's shuffle as (num_rows, batch_size) indices, padded with -1.

  A function of (seed, epoch) alone, so any chunk of any epoch can be recomputed on restart.
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  # Fewer rows than examples (whole batches only): this epoch's last few examples sit out.
  return index_rows(perm[:num_rows * batch_size], batch_size, num_rows)


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """Train, validation and test examples in one pair of device arrays, split by index ranges."""
  arrays: tuple  # (images, labels): train first, so train indices are 0 .. n_train-1
  splits: dict  # name -> np.ndarray of indices into `arrays`
  image_shape: tuple  # of one example, e.g. (28, 28, 1)

  @classmethod
  def put(cls, dataset, runner=None):
    """Puts the examples on the device (replicated on every device of `runner`)."""
    parts = [(dataset.train_images, dataset.train_labels),
             (dataset.val_images, dataset.val_labels),
             (dataset.test_images, dataset.test_labels)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    bounds = np.cumsum([0] + [len(p[1]) for p in parts])
    splits = {name: np.arange(bounds[i], bounds[i + 1])
              for i, name in enumerate(('train', 'val', 'test'))}
    return cls((runner or ONE_DEVICE).put((images, labels)), splits, images.shape[1:])

  def size(self, split):
    return len(self.splits[split])


def means(sums):
  """Metric sums (numpy, any leading axes) -> mean loss and accuracy."""
  count = np.maximum(np.asarray(sums['count']), 1.0)
  return {'loss': np.asarray(sums['loss']) / count,
          'accuracy': np.asarray(sums['correct']) / count}


class OneDevice:
  """Runs the seed-stacked programs on the default device. `parallel.DataParallel` runs the
  same programs data-parallel over many devices and hosts, with the same methods."""
  num_devices = 1

  def put(self, tree, split_last=False):
    """Host arrays -> device arrays (`split_last`: the batch axis, split over devices)."""
    del split_last
    return jax.device_put(tree)

  def abstract(self, shape, dtype, split_last=False):
    del split_last
    return jax.ShapeDtypeStruct(shape, dtype)

  def get(self, tree):
    return jax.device_get(tree)

  train_chunks = staticmethod(train_chunks)
  evaluate = staticmethod(evaluate_seeds)


ONE_DEVICE = OneDevice()


# --- The loop -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
  """How an epoch is cut into dispatched chunks, and where validation happens."""
  num_examples: int
  batch_size: int
  epochs: int = 5
  max_steps: int = 0  # a budget in steps instead of epochs (0: epochs * steps_per_epoch)
  chunk_steps: int = 0  # K, steps per dispatched program (0: as long as the eval interval)
  evals_per_epoch: int = 1
  num_devices: int = 1  # several: the last partial batch is dropped (see README)

  def __post_init__(self):
    if not 0 < self.batch_size <= self.num_examples:
      raise ValueError(f'batch_size must be in [1, {self.num_examples}] (the training set '
                       f'size), got {self.batch_size}.')
    if self.batch_size % self.num_devices:
      raise ValueError(f'batch_size {self.batch_size} is not divisible by the {self.num_devices} '
                       'devices: choose a multiple of the device count (or --config.devices).')
    if self.epochs < 0 or self.max_steps < 0 or self.chunk_steps < 0:
      raise ValueError('epochs, max_steps and chunk_steps must be >= 0, got '
                       f'{self.epochs}, {self.max_steps}, {self.chunk_steps}.')
    if self.evals_per_epoch < 1:
      raise ValueError(f'evals_per_epoch must be >= 1, got {self.evals_per_epoch}.')

  @property
  def steps_per_epoch(self):
    if self.num_devices > 1:  # cross-device BN means are unweighted: keep batches whole
      return self.num_examples // self.batch_size
    return math.ceil(self.num_examples / self.batch_size)  # the last batch may be partial

  @property
  def total_steps(self):
    return self.max_steps or self.epochs * self.steps_per_epoch

  @property
  def num_epochs(self):
    return math.ceil(self.total_steps / self.steps_per_epoch)

  @property
  def k(self):
    interval = max(1, self.steps_per_epoch // self.evals_per_epoch)
    return min(self.chunk_steps or interval, self.steps_per_epoch)

  @property
  def chunks_per_epoch(self):
    return math.ceil(self.steps_per_epoch / self.k)

  def evaluates_after(self, chunk):
    """Validate after this chunk: the last of the epoch, or one crossing an eval point."""
    s, e, k = self.steps_per_epoch, self.evals_per_epoch, self.k
    return chunk == self.chunks_per_epoch - 1 or (chunk + 1) * k * e // s > chunk * k * e // s

  @property
  def examples_per_epoch(self):
    return min(self.num_examples, self.steps_per_epoch * self.batch_size)

  def examples_after(self, step):
    """Training examples seen after `step` steps (the last batch of an epoch may be partial)."""
    epochs, rest = divmod(step, self.steps_per_epoch)
    return epochs * self.examples_per_epoch + min(rest * self.batch_size,
                                                  self.examples_per_epoch)


@dataclasses.dataclass
class Programs:
  """A configuration's initial states (seeds stacked) after compiling its programs."""
  states: TrainState
  compile_seconds: float


def compile_programs(model, data, schedule, *, seeds, learning_rate, eval_batch_size=1000,
                     runner=ONE_DEVICE):
  """Initializes the states and compiles the train-chunk and eval programs ahead of time.

  Compiled programs land in jit's cache, so `fit` dispatches them without compiling; a sweep
  calls this for all its configurations at once from a thread pool.
  """
  t0 = time.perf_counter()
  eval_batch_size = _eval_batch_size(eval_batch_size, runner)
  keys = _seed_keys(seeds)
  states = runner.put(jax.device_get(init_states(
      model, keys[:, 0], learning_rate, (1,) + data.image_shape)))
  order = runner.abstract(
      (len(seeds), schedule.chunks_per_epoch * schedule.k, schedule.batch_size), jnp.int32,
      split_last=True)
  runner.train_chunks.lower(states, data.arrays, order, runner.put(keys[:, 1]), 0, 0,
                            schedule.k).compile()
  rows = runner.abstract(_eval_blocks(data, 'val', eval_batch_size).shape[1:], jnp.int32,
                         split_last=True)
  runner.evaluate.lower(states, data.arrays, rows).compile()
  return Programs(states, time.perf_counter() - t0)


def fit(model, data, *, seeds=(0,), learning_rate=1e-3, batch_size=32, epochs=5, max_steps=0,
        chunk_steps=0, evals_per_epoch=1, eval_batch_size=1000, progress=True, desc='train',
        programs=None, runner=ONE_DEVICE, checkpointer=None):
  """Trains one configuration for every seed at once; returns (results per seed, states).

  Each result holds `history` (per epoch: train loss/accuracy as averages over the epoch's
  batches in train mode, validation loss/accuracy at the epoch's end, seconds), `curve`
  (validation at every eval point, with steps and examples seen), `final` (last epoch's
  numbers, test metrics, and eval-mode metrics over the whole training set) and `status`.
  `runner` (default: one device) decides where the programs run; `parallel.DataParallel`
  runs them over several devices and hosts. Returned states are host (numpy) arrays.
  With a `checkpoint.Checkpointer`, fit resumes from its newest good checkpoint and saves at
  every epoch end (and every `every_steps`, at chunk boundaries); it closes it when done.
  """
  data = data if isinstance(data, DeviceData) else DeviceData.put(data, runner)
  sched = Schedule(data.size('train'), batch_size, epochs, max_steps, chunk_steps,
                   evals_per_epoch, runner.num_devices)
  eval_batch_size = _eval_batch_size(eval_batch_size, runner)
  seeds = list(seeds)
  programs = programs or compile_programs(model, data, sched, seeds=seeds,
                                          learning_rate=learning_rate,
                                          eval_batch_size=eval_batch_size, runner=runner)
  states, rngs = programs.states, runner.put(_seed_keys(seeds)[:, 1])
  evaluate_split = lambda split: means(runner.get(functools.reduce(
      lambda a, b: jax.tree.map(jnp.add, a, b),
      [runner.evaluate(states, data.arrays, runner.put(rows, split_last=True))
       for rows in _eval_blocks(data, split, eval_batch_size)])))

  n = len(seeds)
  history, curve, diverged_at = [[] for _ in seeds], [[] for _ in seeds], [None] * n
  zero_sums = runner.put({key: np.zeros(n, np.float32) for key in ('loss', 'correct', 'count')})
  epoch_sums, step, start_epoch, start_chunk = zero_sums, 0, 0, 0
  if checkpointer:  # resume from the newest good checkpoint, if any
    restored = checkpointer.restore(
        checkpoint.abstract({'states': states, 'epoch_sums': zero_sums}))
    if restored:
      arrays, meta = restored
      states, epoch_sums = arrays['states'], arrays['epoch_sums']
      step, start_epoch, start_chunk = meta['step'], meta['epoch'], meta['chunk']
      history, curve, diverged_at = meta['history'], meta['curve'], meta['diverged_at']
  last_saved = step

  def save(next_epoch, next_chunk):
    meta = {'step': step, 'epoch': next_epoch, 'chunk': next_chunk, 'history': history,
            'curve': curve, 'diverged_at': diverged_at}
    checkpointer.save(step, {'states': states, 'epoch_sums': epoch_sums}, meta)
    return step

  bar = tqdm(total=sched.total_steps, initial=step, desc=desc, leave=False,
             disable=not progress or jax.process_index() != 0)
  try:
    for epoch in range(start_epoch, sched.num_epochs):
      if all(diverged_at):
        break  # every seed diverged: nothing left to learn
      t_epoch = time.perf_counter()
      order = np.stack([epoch_order(seed, epoch, num_examples=sched.num_examples,
                                    batch_size=batch_size,
                                    num_rows=sched.chunks_per_epoch * sched.k)
                        for seed in seeds])
      order = runner.put(order, split_last=True)
      epoch_start = epoch * sched.steps_per_epoch
      stop = min(sched.steps_per_epoch, sched.total_steps - epoch_start)  # later rows: skipped
      first = start_chunk if epoch == start_epoch else 0
      epoch_sums = epoch_sums if first else zero_sums
      for c in range(first, sched.chunks_per_epoch):
        if c * sched.k >= stop:
          break
        states, sums = runner.train_chunks(states, data.arrays, order, rngs, c * sched.k, stop,
                                           sched.k)
        epoch_sums = jax.tree.map(jnp.add, epoch_sums, sums)
        done = min((c + 1) * sched.k, stop)
        bar.update(epoch_start + done - step)
        step = epoch_start + done
        # One host sync per chunk: a NaN/inf check on the chunk's loss sums.
        for s in np.flatnonzero(~np.isfinite(runner.get(sums['loss']))):
          diverged_at[s] = diverged_at[s] or {'epoch': epoch + 1, 'step': step}
        if sched.evaluates_after(c) or done == stop:
          val = evaluate_split('val')
          for s in range(n):
            curve[s].append({'step': step, 'examples': sched.examples_after(step),
                             'val_loss': float(val['loss'][s]),
                             'val_accuracy': float(val['accuracy'][s])})
        if done < stop and checkpointer and checkpointer.due(step, last_saved, False):
          last_saved = save(epoch, c + 1)
      train = means(runner.get(epoch_sums))
      seconds = time.perf_counter() - t_epoch
      for s in range(n):
        history[s].append({
            'epoch': epoch + 1, 'train_loss': float(train['loss'][s]),
            'train_accuracy': float(train['accuracy'][s]),
            'val_loss': curve[s][-1]['val_loss'], 'val_accuracy': curve[s][-1]['val_accuracy'],
            'seconds': seconds})
      bar.set_postfix(val_acc=f'{np.nanmean(val["accuracy"]):.4f}')
      if checkpointer:
        last_saved = save(epoch + 1, 0)
  finally:
    bar.close()
    if checkpointer:
      checkpointer.close()  # pending async saves complete, even on an error

  test, train_eval = evaluate_split('test'), evaluate_split('train')
  results = []
  for s, seed in enumerate(seeds):
    final = {key: history[s][-1][key] for key in ('train_loss', 'train_accuracy', 'val_loss',
                                                  'val_accuracy')}
    final.update(test_loss=float(test['loss'][s]), test_accuracy=float(test['accuracy'][s]),
                 train_eval_loss=float(train_eval['loss'][s]),
                 train_eval_accuracy=float(train_eval['accuracy'][s]))
    results.append({'seed': seed, 'history': history[s], 'curve': curve[s], 'final': final,
                    'status': 'diverged' if diverged_at[s] else 'ok',
                    'diverged_at': diverged_at[s], 'steps': step,
                    'steps_per_epoch': sched.steps_per_epoch,
                    'compile_seconds': programs.compile_seconds})
  return results, runner.get(states)


def _seed_keys(seeds):
  """Per seed: (init key, dropout key)."""
  return jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(list(seeds)))


def _eval_batch_size(batch_size, runner):
  """Rounded up to a multiple of the device count: eval batches split evenly too."""
  return -(-batch_size // runner.num_devices) * runner.num_devices


def _eval_blocks(data, split, batch_size):
  """A split's indices as blocks of R rows (R = the validation set's rows), so one compiled
  eval program serves every split."""
  rows_per_block = max(1, math.ceil(data.size('val') / batch_size))
  rows = math.ceil(data.size(split) / batch_size)
  blocks = math.ceil(rows / rows_per_block)
  return index_rows(data.splits[split], batch_size, blocks * rows_per_block).reshape(
      blocks, rows_per_block, batch_size)
