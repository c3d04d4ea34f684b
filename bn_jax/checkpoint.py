"""Checkpoints of a training run with Orbax: save, keep the last K, restore the newest good one.

A checkpoint holds everything `loop.fit` needs to continue exactly: the stacked TrainStates
(params, Adam state, BN batch_stats, step), the metric sums of the epoch in progress, and, as
JSON, the data position (epoch, next chunk), the history so far and the divergence record. The
dropout rngs and each epoch's shuffle are functions of (seed, step) and (seed, epoch), so they
need no saving.
"""

import logging
import os
import shutil
import threading
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
# Orbax's save machinery keeps process-wide state: two threads saving at once (a sweep trains
# configurations concurrently) time out waiting on each other's signals. Every Orbax call
# holds this lock, and saves are synchronous (a save of these small states takes milliseconds).
_ORBAX = threading.Lock()


class Checkpointer:
  """An Orbax `CheckpointManager` over one run directory (one configuration, all its seeds)."""

  def __init__(self, directory, *, keep=3, every_steps=0, min_seconds=0.0):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps  # 0: only at the end of each epoch
    self.min_seconds = min_seconds  # never save more often than this
    self.last_time = time.monotonic()
    with _ORBAX:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False))

  def due(self, step, last_saved_step, epoch_end):
    """Save at every epoch end and once `every_steps` have passed since the last save, but
    not within `min_seconds` of the last save (small runs would spend their time saving)."""
    if time.monotonic() - self.last_time < self.min_seconds:
      return False
    return epoch_end or (self.every_steps > 0 and step - last_saved_step >= self.every_steps)

  def save(self, step, arrays, meta):
    """Saves `arrays` (a pytree of jax arrays) and `meta` (JSON) as checkpoint `step`."""
    self.last_time = time.monotonic()
    with _ORBAX:
      self.manager.save(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
      self.manager.wait_until_finished()

  def restore(self, abstract_arrays):
    """The newest checkpoint that restores, as (arrays, meta); None if there is none.

    `abstract_arrays` gives the structure, shapes, dtypes and shardings to restore into (so
    that optimizer states and batch_stats come back as the right types). A corrupt or
    incomplete newest checkpoint is skipped with a warning; if none restores, an error names
    the directory.
    """
    with _ORBAX:
      return self._restore(abstract_arrays)

  def _restore(self, abstract_arrays):
    steps = sorted(self.manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract_arrays), meta=ocp.args.JsonRestore()))
        if errors:
          log.warning('resumed from checkpoint %d in %s', step, self.directory)
        return restored['arrays'], restored['meta']
      except Exception as e:  # pylint: disable=broad-except  (any corruption: try older)
        log.warning('checkpoint %d in %s cannot be restored (%s: %s); trying an older one',
                    step, self.directory, type(e).__name__, str(e)[:200])
        errors.append(step)
    if steps:
      raise RuntimeError(f'no checkpoint in {self.directory} can be restored (tried steps '
                         f'{steps}); delete that directory to start the run afresh.')
    return None

  def close(self):
    """Waits for pending saves; call before exiting."""
    with _ORBAX:
      self.manager.wait_until_finished()
      self.manager.close()

  def delete(self):
    """Removes the run's checkpoints (once its results are recorded, they are not needed)."""
    shutil.rmtree(self.directory, ignore_errors=True)


def abstract(tree):
  """Shapes, dtypes and shardings of a pytree of arrays: the target to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
