"""One writer per workdir: an exclusive `flock` on `WORKDIR/.lock` (or a shard's own lock,
`bn_jax.shards`), held until the process exits, and checked before every record is written."""

import atexit
import datetime
import fcntl
import glob
import os
import socket

from bn_jax import errors
from bn_jax import shards


class WorkdirInUse(errors.WorkdirError):
  """Another process writes to this workdir."""


_LOCKS = {}  # lock file path -> the open lock file this process holds (until it exits)


def lock(workdir, shard=None):
  """Makes this process the workdir's one writer (or shard `shard`'s, `bn_jax.shards`): an
  exclusive `flock` on `WORKDIR/.lock` (or `.lock.shard-I-of-N`), held until the process exits
  (the OS releases it when the holder dies, even by kill -9). A second process for the same
  lock, an unsharded process while a shard runs or a shard while an unsharded process runs gets
  an error naming the holder's pid and host; nothing is touched."""
  path = os.path.join(workdir, shards.lock_name(shard))
  if path in _LOCKS:
    return
  f = _take(path, workdir)
  # The unsharded writer and the shards exclude each other: take the other kind's locks once
  # (and let go) to see that no one holds them.
  others = (glob.glob(os.path.join(workdir, '.lock.shard-*')) if shard is None else
            [os.path.join(workdir, '.lock')])
  for other in others:
    try:
      _take(other, workdir).close()
    except WorkdirInUse:
      f.close()
      raise
  f.seek(0)
  f.truncate()
  f.write(f'pid {os.getpid()} on host {socket.gethostname()} since '
          f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
  f.flush()
  _LOCKS[path] = f
  atexit.register(f.close)  # the OS would release it anyway; this keeps exit quiet


def _take(path, workdir):
  """The lock file at `path`, flock-ed (exclusive, not waiting); WorkdirInUse if held."""
  f = open(path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or 'another process'
    f.close()
    raise WorkdirInUse(f'workdir {workdir} is in use by {holder} ({os.path.basename(path)}): '
                       'wait for it to finish (or stop it), or use another --workdir.') from None
  return f


def check_lock(workdir):
  """Raises `WorkdirInUse` if a lock this process took on `workdir` was deleted or replaced
  since it took it: another process may have taken a new one, and two writers would mix their
  records and checkpoints. Called before every record is written."""
  for path, held in _LOCKS.items():
    if os.path.dirname(path) != os.path.abspath(workdir):
      continue
    try:
      same = os.path.samestat(os.stat(path), os.fstat(held.fileno()))
    except OSError:
      same = False
    if not same:
      raise WorkdirInUse(f'{path} was deleted or replaced while this process (pid '
                         f'{os.getpid()}) held it, so another process may be writing to this '
                         'workdir: stop every process using it, then rerun (recorded runs are '
                         'kept).')
