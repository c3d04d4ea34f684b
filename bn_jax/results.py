"""Result records on disk: the workdir, `results.jsonl` (whole lines only), atomic files.

Only process 0 writes when several hosts train together. A run's stable key comes from its
resolved config, so a restarted sweep knows which runs are finished.
"""

import hashlib
import json
import os
import shutil
import tempfile

import jax

# Settings that do not change a run's numbers, left out of its key.
NOT_IN_KEY = ('progress', 'compilation_cache', 'compilation_cache_dir', 'resume', 'overwrite',
              'checkpoint_every_steps', 'checkpoint_min_seconds', 'checkpoint_keep',
              'keep_checkpoints', 'coordinator_address', 'num_processes', 'process_id',
              'bn_batch_of_one')


def is_writer():
  """Only process 0 writes results, plots and logs when several hosts train together."""
  return jax.process_index() == 0


def run_key(config):
  """A stable id of one configuration (all its seeds): a hash of the settings that matter."""
  settings = {k: v for k, v in jsonable(config.to_dict()).items() if k not in NOT_IN_KEY}
  return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def jsonable(value):
  if isinstance(value, dict):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  return value


def atomic_write(path, data):
  """Writes text or bytes to `path` via a temporary file and a rename (process 0 only)."""
  if not is_writer():
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def append_records(path, records):
  """Appends records to a JSON-lines file, one whole line per write, flushed (process 0)."""
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, allow_nan=True) + '\n')
      f.flush()
      os.fsync(f.fileno())


def read_records(path):
  """Reads a JSON-lines results file, ignoring a torn last line (a crash mid-write)."""
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.endswith('\n'):
        records.append(json.loads(line))
  return records


class Workdir:
  """A run directory: `results.jsonl`, `checkpoints/<run key>/`, tables and plots.

  Opening it checks everything that can be checked before training: the path is a directory
  and writable, and any results in it come from the same experiment. With `resume`, finished
  runs are kept (and skipped by a sweep) and unfinished ones resume from their checkpoints;
  without it, existing results are an error unless `overwrite`, which deletes them.
  """

  def __init__(self, path, experiment, *, resume=True, overwrite=False):
    self.path = os.path.abspath(path)
    self.results_path = os.path.join(self.path, 'results.jsonl')
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise NotADirectoryError(f'workdir {path!r} is a file: pass --workdir=DIR with a '
                               'directory path.')
    try:
      os.makedirs(self.path, exist_ok=True)
      with tempfile.TemporaryFile(dir=self.path) as probe:
        probe.write(b'\0' * 4096)
        probe.flush()
        os.fsync(probe.fileno())
    except OSError as e:
      raise OSError(f'workdir {path!r} cannot be created or written ({e.strerror}): choose '
                    'another --workdir (or free some space).') from e
    records = read_records(self.results_path) if os.path.exists(self.results_path) else []
    others = sorted({r.get('experiment') for r in records} - {experiment})
    if others:
      raise ValueError(f'{self.results_path} holds results of experiment {others[0]!r}, not '
                       f'{experiment!r}: use another --workdir.')
    if records and not resume and not overwrite:
      raise FileExistsError(f'{self.results_path} already holds {len(records)} results and '
                            '--config.resume=false: pass --config.overwrite=true to delete them, '
                            'or use another --workdir.')
    if not resume and is_writer():
      for stale in (self.results_path, os.path.join(self.path, 'checkpoints')):
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        elif os.path.exists(stale):
          os.remove(stale)
      records = []
    self.finished = {(r['run_key'], r['seed']): r for r in records if 'run_key' in r}

  def checkpoint_dir(self, key):
    return os.path.join(self.path, 'checkpoints', key)
