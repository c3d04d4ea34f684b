"""Stopping cleanly on SIGTERM or SIGINT (preemption, Ctrl-C).

The experiment scripts install `handle_signals()`. The first signal only sets a flag: the run
finishes its current chunk, saves a checkpoint, the records of finished runs are already on
disk, and `Interrupted` reaches the script, which says "interrupted at step N; run the same
command to resume" and exits non-zero. A second signal exits at once: every file bn_jax writes
is written atomically (results as whole lines, checkpoints finalized by Orbax with a rename),
so nothing is left half-written. With several hosts, `requested()` is true on every process as
soon as one of them got a signal, so all stop after the same step.
"""

import os
import signal

import jax
import numpy as np

_received = []  # the signals received so far


class Interrupted(Exception):
  """Training stopped on a signal at `step` (after saving a checkpoint), or between runs
  (`step` None)."""

  def __init__(self, step, signum=signal.SIGTERM):
    where = f'at step {step}' if step is not None else 'between runs'
    super().__init__(f'interrupted {where}; run the same command to resume')
    self.step, self.signum = step, signum


def handle_signals():
  """First SIGTERM / SIGINT: stop after the current chunk; second: exit at once."""

  def handler(signum, frame):
    del frame
    if _received:
      os._exit(128 + signum)  # pylint: disable=protected-access
    _received.append(signum)

  signal.signal(signal.SIGTERM, handler)
  signal.signal(signal.SIGINT, handler)


def requested():
  """True once this process (or, with several hosts, any process) received a signal. With
  several processes it is a collective: every process must call it at the same points."""
  local = bool(_received)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


def signum():
  """The first signal received (SIGTERM if none)."""
  return _received[0] if _received else signal.SIGTERM
