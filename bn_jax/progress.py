"""Progress of a run: tqdm's bar on a terminal, or one plain line per epoch in a log file."""

import time

import jax
import numpy as np
from tqdm.auto import tqdm


class Display:
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
