"""How training is cut into epochs, dispatched chunks and eval points (`Schedule`).

`loop.fit` runs one compiled program per chunk; every eval point ends a chunk, so validation,
checkpoints and interruption happen between programs, never inside one.
"""

import dataclasses
import math


def check_batch(batch_size, num_examples=None, num_devices=1):
  """Raises ValueError unless the batch fits the training set (when its size `num_examples` is
  known) and splits evenly over the devices."""
  if batch_size < 1 or (num_examples is not None and batch_size > num_examples):
    size = 'the training set size' if num_examples is None else num_examples
    raise ValueError(f'batch_size must be in [1, {size}], got {batch_size}.')
  if batch_size % num_devices:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {num_devices} devices: '
                     'choose a multiple of the device count (or --config.devices).')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How an epoch is cut into dispatched chunks, and where validation happens.

  Eval points: within an epoch of S steps with E evals, validation follows step
  floor(j * S / E + 1/2) for j = 1 .. E (halves round up; computed in integers, exact), the
  last being S, duplicates removed (E > S gives fewer points, never two at one step); an epoch
  a `max_steps` budget cuts short keeps its points before the cut and adds one at the cut.
  Chunks: each runs from the current step to min(current + K, the next eval point), so every
  eval point ends a chunk; K is `chunk_steps`, by default the longest gap between eval points.
  One compiled program runs chunks of every length (`train.train_chunk`).
  `stops`: further steps (counted from the start of training) where a chunk must end, e.g.
  where `loop.fit` keeps the state (`save_states_at`); they add no eval point.
  """
  num_examples: int
  batch_size: int
  epochs: int = 5
  max_steps: int = 0  # a budget in steps instead of epochs (0: epochs * steps_per_epoch)
  chunk_steps: int = 0  # K, steps per dispatched program (0: the longest eval interval)
  evals_per_epoch: int = 1
  num_devices: int = 1  # several: the last partial batch is dropped (see README)
  stops: tuple = ()

  def __post_init__(self):
    check_batch(self.batch_size, self.num_examples, self.num_devices)
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
  def eval_steps(self):
    """A whole epoch's eval points (steps within the epoch, 1 .. S), ascending."""
    s, e = self.steps_per_epoch, self.evals_per_epoch
    # floor(j*S/E + 1/2) = (2*j*S + E) // (2*E); j >= 1 can round to 0 only when E > 2*S.
    return tuple(sorted({(2 * j * s + e) // (2 * e) for j in range(1, e + 1)} - {0}))

  @property
  def k(self):
    """Most steps per dispatched chunk: `chunk_steps`, or the longest gap between eval points."""
    points = (0,) + self.eval_steps
    interval = max(b - a for a, b in zip(points, points[1:]))
    return min(self.chunk_steps or interval, self.steps_per_epoch)

  def epoch_stop(self, epoch):
    """Steps trained in `epoch` (0-based): S, or fewer where the step budget ends."""
    return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

  def epoch_eval_steps(self, epoch):
    """`epoch`'s eval points (steps within it): `eval_steps`, cut at the budget's end."""
    stop = self.epoch_stop(epoch)
    return tuple(p for p in self.eval_steps if p < stop) + (stop,)

  def chunks(self, epoch, start=0):
    """`epoch`'s chunks from step `start` on, as (start, end) steps within the epoch: each
    ends at min(start + K, the next eval point or stop)."""
    first, stop = epoch * self.steps_per_epoch, self.epoch_stop(epoch)
    stops = {s - first for s in self.stops if 0 < s - first < stop}
    bounds = []
    for point in sorted(set(self.epoch_eval_steps(epoch)) | stops):
      while start < point:
        bounds.append((start, min(start + self.k, point)))
        start = bounds[-1][1]
    return tuple(bounds)

  @property
  def chunks_per_epoch(self):
    return len(self.chunks(0))

  @property
  def examples_per_epoch(self):
    return min(self.num_examples, self.steps_per_epoch * self.batch_size)

  def examples_after(self, step):
    """Training examples seen after `step` steps (the last batch of an epoch may be partial)."""
    epochs, rest = divmod(step, self.steps_per_epoch)
    return epochs * self.examples_per_epoch + min(rest * self.batch_size,
                                                  self.examples_per_epoch)
