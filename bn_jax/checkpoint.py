"""Checkpoints of a training run with Orbax: save, keep the last K, restore the newest good one.

A checkpoint holds everything `loop.fit` needs to continue exactly: the stacked TrainStates
(params, Adam state, BN batch_stats, step), the metric sums of the epoch in progress, and, as
JSON, the data position (epoch, next chunk), the history so far and the divergence record. The
dropout rngs and each epoch's shuffle are functions of (seed, step) and (seed, epoch), so they
need no saving. The JSON also holds a SHA-256 of every array; a restore that does not
reproduce them (a flipped byte on disk) is refused and the next older checkpoint tried.
"""

import glob
import hashlib
import os
import shutil
import sys
import threading
import time

import jax
import numpy as np

from bn_jax import errors

# Orbax's save machinery keeps process-wide state: two threads saving at once (a sweep trains
# configurations concurrently) time out waiting on each other's signals. Every Orbax call
# holds this lock, and saves are synchronous (a save of these small states takes milliseconds).
_ORBAX = threading.Lock()


def _ocp():
  """Orbax, imported when a checkpoint is first used (`import bn_jax` stays light)."""
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  return orbax.checkpoint


class CorruptCheckpoints(errors.UserError, ValueError):
  """No checkpoint of a run restores intact; the message names the directory and the fix."""


class Checkpointer:
  """An Orbax `CheckpointManager` over one run directory (one configuration, all its seeds)."""

  def __init__(self, directory, *, keep=3, every_steps=0, min_seconds=0.0):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps  # 0: only at the end of each epoch
    self.min_seconds = min_seconds  # never save more often than this
    self.last_time = time.monotonic()
    with _ORBAX:
      self.manager = _ocp().CheckpointManager(
          self.directory,
          options=_ocp().CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False))

  def due(self, step, last_saved_step, epoch_end):
    """Save at every epoch end and once `every_steps` have passed since the last save, but
    not within `min_seconds` of the last save (small runs would spend their time saving)."""
    if time.monotonic() - self.last_time < self.min_seconds:
      return False
    return epoch_end or (self.every_steps > 0 and step - last_saved_step >= self.every_steps)

  def save(self, step, arrays, meta):
    """Saves `arrays` (a pytree of jax arrays) and `meta` (JSON) as checkpoint `step`.

    A disk without room for it is one `OSError` naming the space needed and free, before
    anything is written; a save that fails midway leaves no temporary directory behind.
    """
    self.last_time = time.monotonic()
    meta = {**meta, 'checksums': checksums(arrays)}
    need = sum(x.nbytes for x in jax.tree.leaves(arrays)) + 2**20  # + room for metadata
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise errors.WorkdirError(self._full_disk(step, f'it needs ~{need / 2**20:.1f} MiB, '
                                          f'{free / 2**20:.1f} MiB are free'))
    with _ORBAX:
      try:
        args = _ocp().args
        self.manager.save(step, args=args.Composite(
            arrays=args.StandardSave(arrays), meta=args.JsonSave(meta)))
        self.manager.wait_until_finished()
      except Exception as e:  # Orbax reports a full disk as ValueError, among others
        for partial in glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*')):
          shutil.rmtree(partial, ignore_errors=True)
        if 'No space left on device' in str(e):
          raise errors.WorkdirError(self._full_disk(step, 'no space left on device')) from e
        raise

  def _full_disk(self, step, why):
    return (f'cannot save checkpoint {step} in {self.directory} ({why}): free some space (or '
            'lower --config.checkpoint_keep) and rerun; the run resumes from its last '
            'checkpoint.')

  def restore(self, abstract_arrays):
    """The newest checkpoint that restores intact, as (arrays, meta); None if there is none.

    `abstract_arrays` gives the structure, shapes, dtypes and shardings to restore into (so
    that optimizer states and batch_stats come back as the right types). A checkpoint that
    fails to read or whose arrays do not match their checksums is skipped, saying so on the
    console; if none restores, `CorruptCheckpoints` names the directory.
    """
    with _ORBAX:
      steps = sorted(self.manager.all_steps(), reverse=True)
      for step in steps:
        problem = self._restore(step, abstract_arrays)
        if not isinstance(problem, str):
          return problem
        print(f'checkpoint {step} in {self.directory} {problem}; trying an older one.',
              file=sys.stderr, flush=True)
    if steps:
      raise CorruptCheckpoints(
          f'no checkpoint in {self.directory} restores intact (steps {steps}): delete that '
          'directory to train the run from the start.')
    return None

  def _restore(self, step, abstract_arrays):
    """(arrays, meta) of checkpoint `step`, or a string saying what is wrong with it."""
    try:
      args = _ocp().args
      restored = self.manager.restore(step, args=args.Composite(
          arrays=args.StandardRestore(abstract_arrays), meta=args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any corruption: try older)
      return f'cannot be read ({type(e).__name__}: {str(e)[:200]})'
    arrays, meta = restored['arrays'], dict(restored['meta'])
    saved, found = meta.pop('checksums', None), checksums(arrays)
    if saved != found:
      wrong = sorted(k for k in found if (saved or {}).get(k) != found[k])
      return f'is corrupt (checksum mismatch in {", ".join(wrong[:3]) or "its list"})'
    return arrays, meta

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
  return jax.tree.map(_ocp().utils.to_shape_dtype_struct, tree)


def checksums(arrays):
  """SHA-256 of every array of a pytree (dtype, shape and bytes), by its path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)  # replicated over hosts: every copy is the whole array
    leaf = np.ascontiguousarray(jax.device_get(leaf))
    digest = hashlib.sha256(f'{leaf.dtype} {leaf.shape} '.encode())
    digest.update(leaf.tobytes())
    out[jax.tree_util.keystr(path)] = digest.hexdigest()
  return out
