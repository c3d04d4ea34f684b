"""Result records on disk: the record layout, run keys, the workdir,
`results.jsonl` (whole lines only), final states and atomic files.

Only process 0 writes when several hosts train together. A run's key is a hash of its identity
(`settings.identity`); with the seed it names one record, and the record carries the code
version that made it (`bn_jax.code_version`), so a finished run is found again and never
mistaken for another code's.
"""

import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile

import flax
import jax
import optax

from bn_jax import errors
from bn_jax import health
from bn_jax import locks
from bn_jax import shards


def is_writer():
  """Only process 0 writes results, plots and logs when several hosts train together."""
  return jax.process_index() == 0


def run_key(identity):
  """A stable id of one configuration (all its seeds): a hash of its identity dict."""
  return hashlib.sha1(json.dumps(jsonable(identity), sort_keys=True).encode()).hexdigest()[:12]


def versions():
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'flax': flax.__version__, 'optax': optax.__version__}


def make_record(*, experiment, config, identity, seed_result, code, wall_seconds, devices):
  """The result record of one run (one seed): the one place that lays a record out."""
  r = seed_result
  return {
      'experiment': experiment,
      'run_key': run_key(identity),
      'identity': jsonable(identity),
      'seed': r['seed'],
      'model': config.model,
      'norm': config.norm,
      'batch_size': config.batch_size,
      'learning_rate': config.learning_rate,
      'epochs': config.epochs,
      'data': config.data,
      'config': {**jsonable(config.to_dict()), 'seed': r['seed']},
      'history': r['history'],
      'final': r['final'],
      'curve': r['curve'],  # validation at every eval point, with steps and examples
    'saved': r['saved'],  # metrics at the `save_states_at` steps
      'steps': r['steps'],
      # Seeds of a configuration train together; these are their shared seconds.
      'wall_seconds': wall_seconds,
      'compile_seconds': r['compile_seconds'],
      'status': r['status'],
      'diverged_at': r['diverged_at'],
      'warnings': health.warnings(config, r),
      'code': code,
      'versions': versions(),
      'devices': devices,
      'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


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
  """Appends records to a JSON-lines file as one write, flushed (process 0 only).

  The records of one call (the seeds of one configuration) land together or not at all on a
  kill, and always on a fresh line: a file that does not end in a newline (a torn write, an
  edit) gets one first, so a new record never joins a broken one.
  """
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  blob = ''.join(json.dumps(record, allow_nan=True) + '\n' for record in records).encode()
  with open(path, 'a+b') as f:
    if f.seek(0, os.SEEK_END):
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        blob = b'\n' + blob
    f.write(blob)
    f.flush()
    os.fsync(f.fileno())


REJECTED = 'results.rejected.txt'  # where a workdir moves lines of results.jsonl it cannot read


def scan_records(path):
  """Reads a JSON-lines results file -> (records, bad lines as (number, text, reason)).

  A line is a record when it is a JSON object naming its experiment; a last line that lacks
  its newline still counts when it parses (it was written whole). Blank lines are skipped.
  """
  records, bad = [], []
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  for number, raw in enumerate(lines, 1):
    text = raw.decode('utf-8', errors='replace')
    if not text.strip():
      continue
    try:
      record = json.loads(text)
    except ValueError as e:
      torn = number == len(lines)  # no newline after it
      bad.append((number, text, 'torn (a write cut short)' if torn else f'not JSON ({e})'))
      continue
    if not isinstance(record, dict) or 'experiment' not in record:
      bad.append((number, text, 'not a result record'))
      continue
    records.append(record)
  return records, bad


def read_records(path):
  """The records of a JSON-lines results file; a torn last line (a crash mid-write) is
  skipped, any other unreadable line is an error naming it."""
  records, bad = scan_records(path)
  for number, _, reason in bad:
    if not reason.startswith('torn'):
      raise errors.DataError(f'{path} line {number} is {reason}: run the experiment on this workdir '
                       f'once (it moves such lines to {REJECTED}), or delete that line.')
  return records


def _set_aside(path, records, bad):
  """Moves unreadable lines of `path` to REJECTED beside it and re-writes `path` with its
  `records` only (atomically); says so on the console."""
  rejected = os.path.join(os.path.dirname(path), REJECTED)
  with open(rejected, 'a', encoding='utf-8') as f:
    f.write(''.join(text + '\n' for _, text, _ in bad))
    f.flush()
    os.fsync(f.fileno())
  atomic_write(path, ''.join(json.dumps(r, allow_nan=True) + '\n' for r in records))
  for number, text, reason in bad:
    print(f'{path} line {number} is {reason} ({len(text)} characters): moved to {rejected}; '
          'a run it held, if any, trains again.', file=sys.stderr, flush=True)


class Workdir:
  """A run directory: `results.jsonl`, `checkpoints/`, `states/`, tables and plots.

  Opening it checks everything that can be checked before training: the path is a directory
  and writable, and any results in it come from the same experiment and carry run identities.
  With `resume`, finished runs are kept (and skipped by a sweep) and unfinished ones resume
  from their checkpoints; without it, existing results are an error unless `overwrite`, which
  deletes them.
  """

  def __init__(self, path, experiment, *, resume=True, overwrite=False, shard=None):
    self.path = os.path.abspath(path)
    self.shard = shard  # (I, N): this process writes results.shard-I-of-N.jsonl (`shards`)
    self.results_path = os.path.join(self.path, shards.results_name(shard))
    if shard and not resume:
      raise errors.WorkdirError('--config.resume=false deletes every shard\'s results: run it '
                                'once without --config.shard, then start the shards.')
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise errors.WorkdirError(f'workdir {path!r} is a file: pass --workdir=DIR with a '
                               'directory path.')
    try:
      os.makedirs(self.path, exist_ok=True)
      with tempfile.TemporaryFile(dir=self.path) as probe:
        probe.write(b'\0' * 4096)
        probe.flush()
        os.fsync(probe.fileno())
    except OSError as e:
      raise errors.WorkdirError(f'workdir {path!r} cannot be created or written ({e.strerror}): choose '
                    'another --workdir (or free some space).') from e
    if is_writer():
      locks.lock(self.path, shard)
    shards.check_count(self.path, shard)
    records = self._read()
    others = sorted({r.get('experiment') for r in records} - {experiment})
    if others:
      raise errors.WorkdirError(f'{self.results_path} holds results of experiment {others[0]!r}, not '
                       f'{experiment!r}: use another --workdir.')
    if records and not resume and not overwrite:
      raise errors.WorkdirError(f'{self.results_path} already holds {len(records)} results and '
                            '--config.resume=false: pass --config.overwrite=true to delete them, '
                            'or use another --workdir.')
    if not resume and is_writer():
      for stale in ('results.jsonl', 'superseded.jsonl', 'checkpoints', 'states'):
        stale = os.path.join(self.path, stale)
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        elif os.path.exists(stale):
          os.remove(stale)
      records = []
    if any('identity' not in r for r in records):
      raise errors.WorkdirError(f'{self.results_path} was written by an older bn_jax (records without a '
                       'run identity or code version): use another --workdir, or pass '
                       '--config.resume=false --config.overwrite=true to delete its results.')
    self.finished = {(r['run_key'], r['seed']): r for r in records}

  def _read(self):
    """The records of every results file (`shards.results_files`); process 0 first moves
    unreadable lines of its own file aside (another shard's file is only read: a line it is
    writing may be incomplete)."""
    records, self.sources = [], {}
    for path in shards.results_files(self.path):
      found, bad = scan_records(path)
      if bad and path == self.results_path and is_writer():
        _set_aside(path, found, bad)
      records += found
      self.sources.update({(r.get('run_key'), r.get('seed')): path for r in found})
    return records

  def refresh(self):
    """Reads every results file again (other shards append to theirs); returns `finished`."""
    self.finished = {(r['run_key'], r['seed']): r for r in self._read()}
    return self.finished

  def supersede(self, records):
    """Moves `records` from the results files holding them to superseded.jsonl (each file
    re-written atomically)."""
    gone = {(r['run_key'], r['seed']) for r in records}
    append_records(os.path.join(self.path, 'superseded.jsonl'), records)
    for path in sorted({self.sources.get(key, self.results_path) for key in gone}):
      keep = [r for r in scan_records(path)[0] if (r['run_key'], r['seed']) not in gone]
      atomic_write(path, ''.join(json.dumps(r, allow_nan=True) + '\n' for r in keep))
    for key in gone:
      self.finished.pop(key, None)

  def checkpoint_dir(self, name):
    return os.path.join(self.path, 'checkpoints', name)

  def state_path(self, key, seed, step=None):
    return state_path(self.path, key, seed, step)

  def save_state(self, key, seed, variables, step=None):
    atomic_write(self.state_path(key, seed, step), flax.serialization.msgpack_serialize(
        jax.device_get(variables)))


def state_path(workdir, key, seed, step=None):
  """Where a run's final variables (params, batch_stats), or those at a `save_states_at`
  `step`, are kept when a sweep saves them."""
  name = f'seed_{seed}.msgpack' if step is None else f'seed_{seed}.step_{step}.msgpack'
  return os.path.join(os.path.abspath(workdir), 'states', key, name)


def load_state(workdir, record, step=None):
  """The final variables {'params', 'batch_stats'} of a recorded run (sweep `save_states`),
  or those at one of its `save_states_at` steps."""
  with open(state_path(workdir, record['run_key'], record['seed'], step), 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())
