"""The training loop: epochs of chunked, seed-stacked programs, validation, checkpoints.

`fit` dispatches one compiled program (`train.train_chunks`) per chunk of at most K steps,
checks the chunk's mean loss for divergence, validates at the schedule's eval points (every
one ends a chunk) and saves checkpoints at chunk boundaries, so progress bar, metrics and
checkpoints cost no host sync per step. Its parts, in `_Run`: `train_epoch` (a chunk at a
time), `evaluate`, `save` / `resume` (checkpoints), `final` (test and train metrics,
PreciseBN, bias correction); `_Display` reports progress.
"""

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bn_jax import checkpoint
from bn_jax import interrupt
from bn_jax import precise_bn
from bn_jax.programs import Programs  # pylint: disable=unused-import  (re-exported)
from bn_jax.programs import compile_programs
from bn_jax.programs import eval_batch_size_on
from bn_jax.programs import eval_blocks
from bn_jax.programs import lower_programs  # pylint: disable=unused-import
from bn_jax.programs import program_fingerprint  # pylint: disable=unused-import
from bn_jax.programs import seed_keys
from bn_jax.schedule import Schedule
from bn_jax.train import DeviceData
from bn_jax.train import ONE_DEVICE
from bn_jax.train import epoch_order
from bn_jax.train import host_inputs
from bn_jax.train import means
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
  `learning_rate`, default 1e-3). With `programs` (from `compile_programs`, which takes the
  rate, optimizer, augmentation and loss scaling), those four are the programs' own: passing
  one too is an error.
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
  given = dict(learning_rate=learning_rate, optimizer=optimizer, augment=augment,
               loss_scale=loss_scale)
  if programs is None:
    programs = compile_programs(model, data, sched, seeds=list(seeds),
                                eval_batch_size=eval_batch_size, runner=runner,
                                **{**given, 'learning_rate': 1e-3 if learning_rate is None
                                   else learning_rate})
  elif [k for k in COMPILE_ARGS if given[k] != COMPILE_ARGS[k]]:
    raise ValueError(f'fit: with `programs`, the rate, optimizer, augmentation and loss scaling '
                     'are the programs\' own; pass '
                     f'{[k for k in COMPILE_ARGS if given[k] != COMPILE_ARGS[k]]} to '
                     'compile_programs instead.')
  run = _Run(model, data, sched, runner, list(seeds), eval_batch_size, divergence_loss,
             checkpointer, logger, should_stop, on_save)
  at = run.resume(programs.states)
  display = _Display(progress, desc, seeds, sched.total_steps, at.step)
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
    host = self.runner.get(at.states)
    arrays = self.runner.get(self.data.arrays)  # host copies: uint8 pixels, labels, table
    per_seed = []
    for s, seed in enumerate(self.seeds):
      pick = lambda tree: jax.tree.map(lambda x: x[s], tree)  # pylint: disable=cell-var-from-loop
      rows = self.data.splits['train'][precise_bn.sample(self.data.size('train'), num_examples,
                                                         seed)]
      per_seed.append(precise_bn.population_stats(
          self.model, {'params': pick(host.params), 'batch_stats': pick(host.batch_stats)},
          host_inputs(arrays, rows), batch_size))
    return self.runner.put(jax.tree.map(lambda *x: np.stack(x), *per_seed))


class _Display:
  """Progress: tqdm's bar on a terminal; without one (a cluster job's log file), one plain line
  per epoch: configuration, seeds, epoch and step, validation accuracy (mean over seeds), time
  since the start and the time left at this pace. Process 0 only."""

  def __init__(self, progress, desc, seeds, total_steps, start_step):
    show = progress and jax.process_index() == 0
    # disable=None: tqdm shows it only on a terminal (a log file gets no bar escape codes).
    self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, leave=False,
                    disable=None if show else True)
    self.lines = show and self.bar.disable
    self.desc, self.seeds, self.total = desc, list(seeds), total_steps
    self.start_step, self.t0 = start_step, time.perf_counter()

  def update(self, steps):
    self.bar.update(steps)

  def epoch(self, epoch, epochs, step, val_accuracy):
    self.bar.set_postfix(val_acc=f'{np.nanmean(val_accuracy):.4f}')
    if self.lines:
      elapsed = time.perf_counter() - self.t0
      left = elapsed / max(step - self.start_step, 1) * (self.total - step)
      print(f'{self.desc} seeds {self.seeds}: epoch {epoch}/{epochs}, step {step}/{self.total}'
            f', val acc {np.nanmean(val_accuracy):.4f}, {elapsed:.0f} s, ETA {left:.0f} s',
            flush=True)

  def close(self):
    self.bar.close()
