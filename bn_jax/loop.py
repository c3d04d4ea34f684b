"""The training loop: epochs of chunked, seed-stacked programs, validation, checkpoints.

`fit` dispatches one compiled program (`train.train_chunks`) per chunk of at most K steps,
checks the chunk's mean loss for divergence, validates at the schedule's eval points (every
one ends a chunk) and saves checkpoints at chunk boundaries, so progress bar, metrics and
checkpoints cost no host sync per step.
"""

import dataclasses
import functools
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bn_jax import checkpoint
from bn_jax import code_version
from bn_jax import interrupt
from bn_jax import optim
from bn_jax import precise_bn
from bn_jax.schedule import Schedule
from bn_jax.train import DeviceData
from bn_jax.train import ONE_DEVICE
from bn_jax.train import TrainState
from bn_jax.train import epoch_order
from bn_jax.train import host_inputs
from bn_jax.train import index_rows
from bn_jax.train import init_states
from bn_jax.train import init_variables
from bn_jax.train import means
from bn_jax.train import states_of
from bn_jax.train import without_optimizer

# A seed has diverged at the first chunk whose mean training loss (loss sum / count over the
# chunk) is not finite or exceeds this: 100 times the loss of a uniform guess over 10 classes,
# far above any trained or untrained net's (`fit`'s `divergence_loss` overrides it).
DIVERGENCE_LOSS = 100 * math.log(10)


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
  eval_batch_size = _eval_batch_size(eval_batch_size, runner)
  keys = seed_keys(seeds)
  tx = optimizer or optim.make_optimizer('adam', learning_rate=float(learning_rate))
  shape = (1,) + data.image_shape
  rows = runner.abstract(_eval_blocks(data, 'val', eval_batch_size).shape[1:], jnp.int32,
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


def fit(model, data, *, seeds=(0,), learning_rate=1e-3, batch_size=32, epochs=5, max_steps=0,
        chunk_steps=0, evals_per_epoch=1, eval_batch_size=1000, progress=True, desc='train',
        programs=None, runner=ONE_DEVICE, checkpointer=None, divergence_loss=DIVERGENCE_LOSS,
        should_stop=None, logger=None, precise_bn_examples=0, optimizer=None, augment='none',
        loss_scale=False, bn_ema_bias_correction=None, save_states_at=(), on_save=None):
  """Trains one configuration for every seed at once; returns (results per seed, states).

  Each result holds `history` (per epoch: train loss/accuracy as averages over the epoch's
  batches in train mode, validation loss/accuracy at the epoch's end, seconds), `curve`
  (validation at every eval point, with steps and examples seen and the learning rate of the
  last step), `final` (last epoch's
  numbers, test metrics, and eval-mode metrics over the whole training set) and `status`.
  Validation runs at the `Schedule`'s eval points: after step floor(j * S / E + 1/2) of each
  epoch of S steps, j = 1 .. E = `evals_per_epoch` (duplicates removed, the last at the
  epoch's end), and at the last step where `max_steps` ends an epoch early.
  Divergence: a seed has diverged (`status` 'diverged', `diverged_at` its epoch and step) at
  the first chunk whose mean training loss (loss sum / count over the chunk) is not finite or
  exceeds `divergence_loss` (default `DIVERGENCE_LOSS` = 100 ln 10, 100 times the loss of a
  uniform guess over 10 classes); once every seed has diverged, training stops after that
  epoch.
  `runner` (default: one device) decides where the programs run; `parallel.DataParallel`
  runs them over several devices and hosts. Returned states are host (numpy) arrays.
  `logger` (e.g. `summaries.RunSummaries`) gets `start(step)`, then `scalars(step, values)`
  at every eval point (validation and the learning rate), every epoch end (train metrics) and
  the end (test metrics), then `close(final)`.
  `optimizer`: an Optax transformation from `optim.make_optimizer` (default: Adam at
  `learning_rate`).
  `augment`: the train step's data augmentation (`bn_jax.augment`: 'none' | 'crop_flip'),
  train mode only; with `programs`, their states' own. `loss_scale`: dynamic loss scaling
  (float16 compute; `train.train_step`), likewise.
  `precise_bn_examples` > 0 (PreciseBN, `bn_jax.precise_bn`): after training, BN's population
  statistics are recomputed from that many training examples in batches of `batch_size`, and
  `final` also holds `precise_val_*` and `precise_test_*` (loss, accuracy) with them (models
  with running statistics only).
  `bn_ema_bias_correction` = BN's momentum m (None: off): `final` also holds
  `corrected_val_*` and `corrected_test_*` with the running averages bias-corrected for their
  initial values (`precise_bn.bias_corrected`, after t steps: mean / (1 - m^t)).
  `save_states_at`: steps (from the start of training) where a chunk ends and the run is
  measured: each result's `saved` lists, per step, train-mode loss/accuracy averaged over the
  steps since the previous such step, and eval-mode val/test loss/accuracy; `on_save(step,
  variables)` then gets the host copies of the seeds' stacked {'params', 'batch_stats'}. The
  states there equal those of a run with `max_steps` at that step, bit for bit, when the rate
  schedule does not depend on the run's length (constant, or decays at fixed epochs).
  `should_stop` (e.g. `interrupt.requested`) is asked at every chunk boundary before the last
  step: when it is true, fit saves a checkpoint and raises `interrupt.Interrupted`.
  With a `checkpoint.Checkpointer`, fit resumes from its newest good checkpoint and saves at
  every epoch end (and every `every_steps`, at chunk boundaries); it closes it when done.
  """
  data = data if isinstance(data, DeviceData) else DeviceData.put(data, runner)
  sched = Schedule(data.size('train'), batch_size, epochs, max_steps, chunk_steps,
                   evals_per_epoch, runner.num_devices, tuple(save_states_at))
  eval_batch_size = _eval_batch_size(eval_batch_size, runner)
  seeds = list(seeds)
  programs = programs or compile_programs(model, data, sched, seeds=seeds,
                                          learning_rate=learning_rate,
                                          eval_batch_size=eval_batch_size, runner=runner,
                                          optimizer=optimizer, augment=augment,
                                          loss_scale=loss_scale)
  states, rngs = programs.states, runner.put(seed_keys(seeds)[:, 1])
  # Metrics over a whole split of `st`, by default the current `states` (read when called).
  evaluate_split = lambda split, st=None: means(runner.get(functools.reduce(
      lambda a, b: jax.tree.map(jnp.add, a, b),
      [runner.evaluate(without_optimizer(states if st is None else st), data.arrays,
                       runner.put(rows, split_last=True))
       for rows in _eval_blocks(data, split, eval_batch_size)])))

  n = len(seeds)
  history, curve, diverged_at = [[] for _ in seeds], [[] for _ in seeds], [None] * n
  saved = [[] for _ in seeds]
  zero_sums = runner.put({key: np.zeros(n, np.float32) for key in ('loss', 'correct', 'count')})
  epoch_sums, step, start_epoch, start_offset = zero_sums, 0, 0, 0
  since_sums = zero_sums  # train metrics since the last `save_states_at` step
  if checkpointer:  # resume from the newest good checkpoint, if any
    restored = checkpointer.restore(checkpoint.abstract(
        {'states': states, 'epoch_sums': zero_sums, 'since_sums': zero_sums}))
    if restored:
      arrays, meta = restored
      states, epoch_sums = arrays['states'], arrays['epoch_sums']
      since_sums = arrays['since_sums']
      step, start_epoch, start_offset = meta['step'], meta['epoch'], meta['epoch_step']
      history, curve, diverged_at = meta['history'], meta['curve'], meta['diverged_at']
      saved = meta['saved']
  last_saved = step
  if logger:
    logger.start(step)

  def save(next_epoch, next_offset):  # where to go on: an epoch, a step within it
    meta = {'step': step, 'epoch': next_epoch, 'epoch_step': next_offset, 'history': history,
            'curve': curve, 'diverged_at': diverged_at, 'saved': saved}
    checkpointer.save(step, {'states': states, 'epoch_sums': epoch_sums,
                             'since_sums': since_sums}, meta)
    return step

  bar = tqdm(total=sched.total_steps, initial=step, desc=desc, leave=False,
             # None: tqdm shows it only on a terminal (a log file gets no bar escape codes).
             disable=True if not progress or jax.process_index() != 0 else None)
  # Without a terminal (a cluster job's log file), a plain line per epoch instead.
  log = _EpochLog(desc, seeds, sched.total_steps, step) if (
      progress and jax.process_index() == 0 and bar.disable) else None
  try:
    for epoch in range(start_epoch, sched.num_epochs):
      if all(diverged_at):
        break  # every seed diverged: nothing left to learn
      t_epoch = time.perf_counter()
      order = np.stack([epoch_order(seed, epoch, num_examples=sched.num_examples,
                                    batch_size=batch_size, num_rows=sched.steps_per_epoch)
                        for seed in seeds])
      order = runner.put(order, split_last=True)
      epoch_start = epoch * sched.steps_per_epoch
      stop, evals = sched.epoch_stop(epoch), sched.epoch_eval_steps(epoch)
      first = start_offset if epoch == start_epoch else 0
      epoch_sums = epoch_sums if first else zero_sums
      for begin, end in sched.chunks(epoch, first):
        states, sums = runner.train_chunks(states, data.arrays, order, rngs, begin, end)
        epoch_sums = jax.tree.map(jnp.add, epoch_sums, sums)
        since_sums = jax.tree.map(jnp.add, since_sums, sums)
        bar.update(epoch_start + end - step)
        step = epoch_start + end
        if step in sched.stops:
          _save_point(step, sched, means(runner.get(since_sums)), evaluate_split, saved)
          if on_save:
            on_save(step, runner.get({'params': states.params,
                                      'batch_stats': states.batch_stats}))
          since_sums = zero_sums
        # One host sync per chunk: the divergence check on the chunk's mean loss.
        chunk = runner.get({'loss': sums['loss'], 'count': sums['count']})
        mean_loss = chunk['loss'] / np.maximum(chunk['count'], 1.0)
        for s in np.flatnonzero(~(mean_loss <= divergence_loss)):  # NaN compares False
          diverged_at[s] = diverged_at[s] or {'epoch': epoch + 1, 'step': step}
        if end in evals:
          val = evaluate_split('val')
          rate = runner.get(states.opt_state.hyperparams['learning_rate'])  # the last step's
          for s in range(n):
            curve[s].append({'step': step, 'examples': sched.examples_after(step),
                             'val_loss': float(val['loss'][s]),
                             'val_accuracy': float(val['accuracy'][s]),
                             'learning_rate': float(rate[s])})
          if logger:
            logger.scalars(step, {'val/loss': val['loss'], 'val/accuracy': val['accuracy'],
                                  'learning_rate': rate})
        if end < stop and checkpointer and checkpointer.due(step, last_saved, False):
          last_saved = save(epoch, end)
        if end < stop and should_stop and should_stop():
          _stop(checkpointer, step, last_saved, lambda: save(epoch, end))
      train = means(runner.get(epoch_sums))
      seconds = time.perf_counter() - t_epoch
      for s in range(n):
        history[s].append({
            'epoch': epoch + 1, 'train_loss': float(train['loss'][s]),
            'train_accuracy': float(train['accuracy'][s]),
            'val_loss': curve[s][-1]['val_loss'], 'val_accuracy': curve[s][-1]['val_accuracy'],
            'seconds': seconds})
      bar.set_postfix(val_acc=f'{np.nanmean(val["accuracy"]):.4f}')
      if log:
        log.epoch(epoch + 1, sched.num_epochs, step, val['accuracy'])
      if logger:
        logger.scalars(step, {'train/loss': train['loss'], 'train/accuracy': train['accuracy']})
      if checkpointer and checkpointer.due(step, last_saved, True):
        last_saved = save(epoch + 1, 0)
      if step < sched.total_steps and should_stop and should_stop():
        _stop(checkpointer, step, last_saved, lambda: save(epoch + 1, 0))
  except BaseException:
    if logger:
      logger.close()  # what was written stays readable
    raise
  finally:
    bar.close()
    if checkpointer:
      checkpointer.close()  # pending async saves complete, even on an error

  test, train_eval = evaluate_split('test'), evaluate_split('train')
  precise = {}
  if precise_bn_examples and jax.tree.leaves(states.batch_stats):
    stats = _precise_stats(model, runner, data, states, seeds, precise_bn_examples, batch_size)
    precise_states = states.replace(batch_stats=stats)
    precise = {split: evaluate_split(split, precise_states) for split in ('val', 'test')}
  corrected = {}
  if bn_ema_bias_correction is not None and jax.tree.leaves(states.batch_stats) and step:
    corrected_states = states.replace(batch_stats=precise_bn.bias_corrected(
        states.batch_stats, bn_ema_bias_correction, step))
    corrected = {split: evaluate_split(split, corrected_states) for split in ('val', 'test')}
  if logger:
    logger.scalars(step, {'test/loss': test['loss'], 'test/accuracy': test['accuracy']})
    logger.close({'final/val_accuracy': [h[-1]['val_accuracy'] for h in history],
                  'final/test_accuracy': test['accuracy']})
  results = []
  for s, seed in enumerate(seeds):
    final = {key: history[s][-1][key] for key in ('train_loss', 'train_accuracy', 'val_loss',
                                                  'val_accuracy')}
    final.update(test_loss=float(test['loss'][s]), test_accuracy=float(test['accuracy'][s]),
                 train_eval_loss=float(train_eval['loss'][s]),
                 train_eval_accuracy=float(train_eval['accuracy'][s]))
    for name, numbers in (('precise', precise), ('corrected', corrected)):
      for split, metrics in numbers.items():
        final.update({f'{name}_{split}_loss': float(metrics['loss'][s]),
                      f'{name}_{split}_accuracy': float(metrics['accuracy'][s])})
    results.append({'seed': seed, 'history': history[s], 'curve': curve[s], 'final': final,
                    'saved': saved[s],
                    'status': 'diverged' if diverged_at[s] else 'ok',
                    'diverged_at': diverged_at[s], 'steps': step,
                    'steps_per_epoch': sched.steps_per_epoch,
                    'compile_seconds': programs.compile_seconds})
  return results, runner.get(states)


def _save_point(step, sched, train, evaluate_split, saved):
  """Appends the metrics of a `save_states_at` step to each seed's `saved` list."""
  val, test = evaluate_split('val'), evaluate_split('test')
  for s, points in enumerate(saved):
    points.append({'step': step, 'examples': sched.examples_after(step),
                   'train_loss': float(train['loss'][s]),
                   'train_accuracy': float(train['accuracy'][s]),
                   'val_loss': float(val['loss'][s]), 'val_accuracy': float(val['accuracy'][s]),
                   'test_loss': float(test['loss'][s]),
                   'test_accuracy': float(test['accuracy'][s])})


class _EpochLog:
  """One plain line per epoch: configuration, seeds, epoch and step, validation accuracy
  (mean over seeds), time since the start and the time left at this pace."""

  def __init__(self, desc, seeds, total_steps, start_step):
    self.desc, self.seeds, self.total = desc, list(seeds), total_steps
    self.start_step, self.t0 = start_step, time.perf_counter()

  def epoch(self, epoch, epochs, step, val_accuracy):
    elapsed = time.perf_counter() - self.t0
    left = elapsed / max(step - self.start_step, 1) * (self.total - step)
    print(f'{self.desc} seeds {self.seeds}: epoch {epoch}/{epochs}, step {step}/{self.total}, '
          f'val acc {np.nanmean(val_accuracy):.4f}, {elapsed:.0f} s, ETA {left:.0f} s',
          flush=True)


def _precise_stats(model, runner, data, states, seeds, num_examples, batch_size):
  """PreciseBN statistics of every seed (stacked, on the runner's devices)."""
  host = runner.get(states)
  arrays = runner.get(data.arrays)  # host copies: uint8 pixels, labels, pixel table
  per_seed = []
  for s, seed in enumerate(seeds):
    pick = lambda tree: jax.tree.map(lambda x: x[s], tree)
    rows = data.splits['train'][precise_bn.sample(data.size('train'), num_examples, seed)]
    per_seed.append(precise_bn.population_stats(
        model, {'params': pick(host.params), 'batch_stats': pick(host.batch_stats)},
        host_inputs(arrays, rows), batch_size))
  return runner.put(jax.tree.map(lambda *x: np.stack(x), *per_seed))


def _stop(checkpointer, step, last_saved, save):
  """Saves where training stands (unless just saved) and raises `Interrupted`."""
  if checkpointer and last_saved != step:
    save()
  raise interrupt.Interrupted(step, interrupt.signum())


def seed_keys(seeds):
  """Per seed: (init key, dropout key); (seeds, 2) keys."""
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
