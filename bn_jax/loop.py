"""The training loop: epochs of chunked, seed-stacked programs, validation, checkpoints.

`fit` dispatches one compiled program (`train.train_chunks`) per chunk of at most K steps,
checks the chunk's mean loss for divergence, validates at the schedule's eval points (every
one ends a chunk) and saves checkpoints at chunk boundaries, so progress bar, metrics and
checkpoints cost no host sync per step. Its parts, in `_Run`: `train_epoch` (a chunk at a
time), `evaluate`, `save` / `resume` (checkpoints), `final` (test and train metrics,
PreciseBN, bias correction); `progress.Display` reports progress.
"""

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import checkpoint
from bn_jax import interrupt
from bn_jax import precise_bn
from bn_jax import progress as progress_lib
from bn_jax.programs import compile_programs
from bn_jax.programs import eval_batch_size_on
from bn_jax.programs import eval_blocks
from bn_jax.programs import seed_keys
from bn_jax.schedule import Schedule
from bn_jax.host import DeviceData
from bn_jax.host import ONE_DEVICE
from bn_jax.host import epoch_order
from bn_jax.host import host_inputs
from bn_jax.host import means
from bn_jax.train import without_optimizer

# A seed has diverged at the first chunk whose mean training loss (loss sum / count over the
# chunk) is not finite or exceeds this: 100 times the loss of a uniform guess over 10 classes,
# far above any trained or untrained net's (`fit`'s `divergence_loss` overrides it).
DIVERGENCE_LOSS = 100 * math.log(10)
# `fit`'s arguments (and defaults) that `compile_programs` takes instead when `programs` are given.
COMPILE_ARGS = {'learning_rate': None, 'optimizer': None, 'augment': 'none', 'loss_scale': False}


def fit(model, data, *, seeds=(0,), learning_rate=None, batch_size=32, epochs=5, max_steps=0,
        chunk_steps=0, evals_per_epoch=1, eval_batch_size=1000, progress=True, desc='train',
        programs=None, runner=ONE_DEVICE, checkpointer=None, divergence_loss=DIVERGENCE_LOSS,
        should_stop=None, logger=None, precise_bn_examples=0, optimizer=None, augment='none',
        loss_scale=False, bn_ema_bias_correction=None, save_states_at=(), on_save=None):
  """Trains one configuration for every seed at once; returns (results per seed, host states).

  A result holds `history` (per epoch: train loss/accuracy averaged over the epoch's batches in
  train mode, validation at the epoch's end, seconds), `curve` (validation at every eval point
  of the `Schedule`, with steps, examples and the last step's rate), `final` (the last epoch's
  numbers, test and eval-mode train metrics), `saved` and `status`.
  - Divergence: a seed's `status` is 'diverged' (`diverged_at`: epoch, step) from the first
    chunk whose mean training loss is not finite or exceeds `divergence_loss`; training stops
    after the epoch where every seed has diverged.
  - `optimizer` (`optim.make_optimizer`; default Adam at `learning_rate`, default 1e-3),
    `augment` ('none' | 'crop_flip') and `loss_scale` (float16's dynamic loss scaling): with
    `programs` (from `compile_programs`) these are the programs' own, and passing one is an error.
  - `runner`: one device, or `parallel.DataParallel`. `logger` (`summaries.RunSummaries`):
    `start(step)`, `scalars(step, values)` at eval points and epoch ends, `close(final)`.
  - `precise_bn_examples` > 0: PreciseBN statistics from that many training examples, in
    batches of `batch_size`; `final` gains `precise_val_*`, `precise_test_*`.
    `bn_ema_bias_correction` = BN's momentum m: `final` gains `corrected_val_*`,
    `corrected_test_*` (running averages / (1 - m^t) after t steps).
  - `save_states_at`: steps where a chunk ends and the run is measured: `saved` lists train
    metrics since the previous such step and eval-mode val/test metrics; `on_save(step,
    variables)` gets the seeds' stacked {'params', 'batch_stats'}, equal bit for bit to a run's
    with `max_steps` there when the rate schedule does not depend on the run's length.
  - `checkpointer` (`checkpoint.Checkpointer`): resume from its newest good checkpoint, save at
    epoch ends (and every `every_steps`). `should_stop` (`interrupt.requested`), asked at chunk
    boundaries: save, then raise `interrupt.Interrupted`.
  """
  data = data if isinstance(data, DeviceData) else DeviceData.put(data, runner)
  sched = Schedule(data.size('train'), batch_size, epochs, max_steps, chunk_steps,
                   evals_per_epoch, runner.num_devices, tuple(save_states_at))
  programs = _programs(programs, model, data, sched, seeds, eval_batch_size, runner,
                       dict(learning_rate=learning_rate, optimizer=optimizer, augment=augment,
                            loss_scale=loss_scale))
  run = _Run(model, data, sched, runner, list(seeds), eval_batch_size, divergence_loss,
             checkpointer, logger, should_stop, on_save)
  at = run.resume(programs.states)
  display = progress_lib.Display(progress, desc, seeds, sched.total_steps, at.step)
  try:
    for epoch in range(at.epoch, sched.num_epochs):
      if all(at.diverged_at):
        break  # every seed diverged: nothing left to learn
      run.train_epoch(at, epoch, display)
  except BaseException:
    if logger:
      logger.close()  # what was written stays readable
    raise
  finally:
    display.close()
    if checkpointer:
      checkpointer.close()  # pending async saves complete, even on an error
  final = run.final(at, precise_bn_examples, bn_ema_bias_correction, batch_size)
  return [{'seed': seed, 'history': at.history[s], 'curve': at.curve[s], 'final': final[s],
           'saved': at.saved[s], 'status': 'diverged' if at.diverged_at[s] else 'ok',
           'diverged_at': at.diverged_at[s], 'steps': at.step,
           'steps_per_epoch': sched.steps_per_epoch,
           'compile_seconds': programs.compile_seconds}
          for s, seed in enumerate(seeds)], runner.get(at.states)


def _programs(programs, model, data, sched, seeds, eval_batch_size, runner, given):
  """`fit`'s programs: those given (then `given`, the compile arguments, must be defaults), or
  compiled here."""
  if programs is None:
    rate = given['learning_rate']
    return compile_programs(model, data, sched, seeds=list(seeds),
                            eval_batch_size=eval_batch_size, runner=runner,
                            **{**given, 'learning_rate': 1e-3 if rate is None else rate})
  passed = [k for k in COMPILE_ARGS if given[k] != COMPILE_ARGS[k]]
  if passed:
    raise ValueError(f'fit: with `programs`, the rate, optimizer, augmentation and loss scaling '
                     f'are the programs\' own; pass {passed} to compile_programs instead.')
  return programs


@dataclasses.dataclass
class _At:
  """Where training stands: what a checkpoint keeps and a resumed run goes on from."""
  states: Any
  epoch_sums: Any  # train metric sums over the epoch so far
  since_sums: Any  # ... and since the last `save_states_at` step
  step: int = 0
  epoch: int = 0  # the epoch to go on with ...
  epoch_step: int = 0  # ... from this step within it
  history: list = None
  curve: list = None
  diverged_at: list = None
  saved: list = None
  last_saved: int = 0  # the step of the last checkpoint

  def meta(self, next_epoch, next_step):  # where to go on: an epoch, a step within it
    return {'step': self.step, 'epoch': next_epoch, 'epoch_step': next_step,
            'history': self.history, 'curve': self.curve, 'diverged_at': self.diverged_at,
            'saved': self.saved}

  def arrays(self):
    return {'states': self.states, 'epoch_sums': self.epoch_sums, 'since_sums': self.since_sums}


class _Run:
  """One `fit` call's fixed parts (model, data, schedule, devices, seeds, checkpointer,
  logger) and the steps of a run: resume, train an epoch a chunk at a time, evaluate, save,
  the final metrics."""

  def __init__(self, model, data, sched, runner, seeds, eval_batch_size, divergence_loss,
               checkpointer, logger, should_stop, on_save):
    self.model, self.data, self.sched, self.runner, self.seeds = (model, data, sched, runner,
                                                                  seeds)
    self.eval_batch_size = eval_batch_size_on(eval_batch_size, runner)
    self.divergence_loss, self.checkpointer, self.logger = (divergence_loss, checkpointer,
                                                            logger)
    self.should_stop, self.on_save = should_stop, on_save
    self.rngs = runner.put(seed_keys(seeds)[:, 1])
    self.zero_sums = runner.put({key: np.zeros(len(seeds), np.float32)
                                 for key in ('loss', 'correct', 'count')})

  def resume(self, states):
    """Where training starts: from the checkpointer's newest good checkpoint, if any."""
    n = len(self.seeds)
    at = _At(states, self.zero_sums, self.zero_sums, history=[[] for _ in range(n)],
             curve=[[] for _ in range(n)], diverged_at=[None] * n, saved=[[] for _ in range(n)])
    restored = self.checkpointer and self.checkpointer.restore(checkpoint.abstract(at.arrays()))
    if restored:
      arrays, meta = restored
      at = _At(arrays['states'], arrays['epoch_sums'], arrays['since_sums'], meta['step'],
               meta['epoch'], meta['epoch_step'], meta['history'], meta['curve'],
               meta['diverged_at'], meta['saved'], last_saved=meta['step'])
    if self.logger:
      self.logger.start(at.step)
    return at

  def train_epoch(self, at, epoch, display):
    """Trains `epoch` (from `at.epoch_step` when resumed within it) a chunk at a time; validates
    at its eval points and checkpoints as due."""
    t0, sched = time.perf_counter(), self.sched
    order = self.runner.put(np.stack([epoch_order(
        seed, epoch, num_examples=sched.num_examples, batch_size=sched.batch_size,
        num_rows=sched.steps_per_epoch) for seed in self.seeds]), split_last=True)
    stop, evals = sched.epoch_stop(epoch), sched.epoch_eval_steps(epoch)
    first, at.epoch_step = at.epoch_step, 0
    at.epoch_sums = at.epoch_sums if first else self.zero_sums
    for begin, end in sched.chunks(epoch, first):
      self.chunk(at, order, epoch, begin, end, display)
      if end in evals:
        val = self.validate(at)
      if end < stop and self.checkpointer and self.checkpointer.due(at.step, at.last_saved,
                                                                    False):
        self.save(at, epoch, end)
      if end < stop and self.should_stop and self.should_stop():
        self.stop(at, epoch, end)
    train = means(self.runner.get(at.epoch_sums))
    for s, history in enumerate(at.history):
      history.append({
          'epoch': epoch + 1, 'train_loss': float(train['loss'][s]),
          'train_accuracy': float(train['accuracy'][s]),
          'val_loss': at.curve[s][-1]['val_loss'],
          'val_accuracy': at.curve[s][-1]['val_accuracy'],
          'seconds': time.perf_counter() - t0})
    display.epoch(epoch + 1, sched.num_epochs, at.step, val['accuracy'])
    if self.logger:
      self.logger.scalars(at.step, {'train/loss': train['loss'],
                                    'train/accuracy': train['accuracy']})
    if self.checkpointer and self.checkpointer.due(at.step, at.last_saved, True):
      self.save(at, epoch + 1, 0)
    if at.step < sched.total_steps and self.should_stop and self.should_stop():
      self.stop(at, epoch + 1, 0)

  def chunk(self, at, order, epoch, begin, end, display):
    """Trains steps [begin, end) of `epoch` (its `order`); then the `save_states_at` point
    there, if one, and the divergence check (the one host sync per chunk)."""
    step = epoch * self.sched.steps_per_epoch + end
    at.states, sums = self.runner.train_chunks(at.states, self.data.arrays, order, self.rngs,
                                               begin, end)
    at.epoch_sums = jax.tree.map(jnp.add, at.epoch_sums, sums)
    at.since_sums = jax.tree.map(jnp.add, at.since_sums, sums)
    display.update(step - at.step)
    at.step = step
    if step in self.sched.stops:
      self.save_point(at)
    chunk = self.runner.get({'loss': sums['loss'], 'count': sums['count']})
    mean_loss = chunk['loss'] / np.maximum(chunk['count'], 1.0)
    for s in np.flatnonzero(~(mean_loss <= self.divergence_loss)):  # NaN compares False
      at.diverged_at[s] = at.diverged_at[s] or {'epoch': epoch + 1, 'step': step}

  def evaluate(self, split, states):
    """Eval-mode metrics of every seed over a whole split (host arrays)."""
    sums = [self.runner.evaluate(without_optimizer(states), self.data.arrays,
                                 self.runner.put(rows, split_last=True))
            for rows in eval_blocks(self.data, split, self.eval_batch_size)]
    return means(self.runner.get(functools.reduce(
        lambda a, b: jax.tree.map(jnp.add, a, b), sums)))

  def validate(self, at):
    """Validation at an eval point: each seed's curve, the logger."""
    val = self.evaluate('val', at.states)
    rate = self.runner.get(at.states.opt_state.hyperparams['learning_rate'])  # the last step's
    for s, curve in enumerate(at.curve):
      curve.append({'step': at.step, 'examples': self.sched.examples_after(at.step),
                    'val_loss': float(val['loss'][s]),
                    'val_accuracy': float(val['accuracy'][s]), 'learning_rate': float(rate[s])})
    if self.logger:
      self.logger.scalars(at.step, {'val/loss': val['loss'], 'val/accuracy': val['accuracy'],
                                    'learning_rate': rate})
    return val

  def save_point(self, at):
    """A `save_states_at` step: train metrics since the last one, val and test metrics, and the
    variables to `on_save`."""
    train = means(self.runner.get(at.since_sums))
    val, test = self.evaluate('val', at.states), self.evaluate('test', at.states)
    for s, points in enumerate(at.saved):
      points.append({'step': at.step, 'examples': self.sched.examples_after(at.step),
                     'train_loss': float(train['loss'][s]),
                     'train_accuracy': float(train['accuracy'][s]),
                     'val_loss': float(val['loss'][s]),
                     'val_accuracy': float(val['accuracy'][s]),
                     'test_loss': float(test['loss'][s]),
                     'test_accuracy': float(test['accuracy'][s])})
    if self.on_save:
      self.on_save(at.step, self.runner.get({'params': at.states.params,
                                             'batch_stats': at.states.batch_stats}))
    at.since_sums = self.zero_sums

  def save(self, at, next_epoch, next_step):
    self.checkpointer.save(at.step, at.arrays(), at.meta(next_epoch, next_step))
    at.last_saved = at.step

  def stop(self, at, next_epoch, next_step):
    """Saves where training stands (unless just saved) and raises `Interrupted`."""
    if self.checkpointer and at.last_saved != at.step:
      self.save(at, next_epoch, next_step)
    raise interrupt.Interrupted(at.step, interrupt.signum())

  def final(self, at, precise_bn_examples, bn_ema_bias_correction, batch_size):
    """Per seed: the last epoch's numbers, test and train metrics (eval mode), and those with
    PreciseBN or bias-corrected statistics when asked for (models with running statistics)."""
    splits = {'': {'test': self.evaluate('test', at.states),
                   'train_eval': self.evaluate('train', at.states)}}
    has_stats = bool(jax.tree.leaves(at.states.batch_stats))
    if precise_bn_examples and has_stats:
      states = at.states.replace(batch_stats=self.precise_stats(at, precise_bn_examples,
                                                                batch_size))
      splits['precise_'] = {k: self.evaluate(k, states) for k in ('val', 'test')}
    if bn_ema_bias_correction is not None and has_stats and at.step:
      states = at.states.replace(batch_stats=precise_bn.bias_corrected(
          at.states.batch_stats, bn_ema_bias_correction, at.step))
      splits['corrected_'] = {k: self.evaluate(k, states) for k in ('val', 'test')}
    if self.logger:
      test = splits['']['test']
      self.logger.scalars(at.step, {'test/loss': test['loss'], 'test/accuracy': test['accuracy']})
      self.logger.close({'final/val_accuracy': [h[-1]['val_accuracy'] for h in at.history],
                         'final/test_accuracy': test['accuracy']})
    finals = []
    for s, history in enumerate(at.history):
      final = {key: history[-1][key] for key in ('train_loss', 'train_accuracy', 'val_loss',
                                                 'val_accuracy')}
      for prefix, metrics in splits.items():
        for split, values in metrics.items():
          final.update({f'{prefix}{split}_loss': float(values['loss'][s]),
                        f'{prefix}{split}_accuracy': float(values['accuracy'][s])})
      finals.append(final)
    return finals

  def precise_stats(self, at, num_examples, batch_size):
    """PreciseBN statistics of every seed (stacked, on the runner's devices)."""
    arrays = self.runner.get(self.data.arrays)  # host copies: uint8 pixels, labels, table
    train = self.data.splits['train']
    return self.runner.put(precise_bn.seeds_population_stats(
        self.model, self.runner.get(at.states), self.seeds, len(train), num_examples,
        lambda rows: host_inputs(arrays, train[rows]), batch_size))
