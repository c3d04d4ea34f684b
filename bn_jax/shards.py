"""A sweep split over processes that share one workdir (`--config.shard=I/N`).

Shard I of N trains the configurations (all their seeds) it is assigned, and only those: the
sweep's run keys sorted, every N-th from the I-th (every shard of one command sees the same
configurations, so they agree, and the split is even whatever the keys); a configuration's seeds stay stacked in one program, so every
number is the one a single process gives (bit-identical on the same CPU model and library
versions); it holds its own lock (`.lock.shard-I-of-N`) and appends to
its own results file (`results.shard-I-of-N.jsonl`), so N processes started by any launcher
(a SLURM job array, a Kubernetes Indexed Job, `xargs -P`) never write the same file or train
the same pair. Every process reads every results file: the shard that finds the whole sweep
finished prints its tables, and so does the same command without `shard` afterwards, training
nothing. With `shard` unset, SLURM's `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT` (and
`SLURM_ARRAY_TASK_MIN`) give it when set.
"""

import glob
import os
import re

from bn_jax import errors

_FILE = re.compile(r'results\.shard-(\d+)-of-(\d+)\.jsonl$')


class ShardDone(Exception):
  """This shard trained its pairs; others of the sweep are not finished yet (not an error)."""


def parse(spec, environ=None):
  """(I, N) from 'I/N' (0 <= I < N), or from SLURM's array variables when `spec` is empty and
  they are set; None for an unsharded sweep (no spec, or N = 1)."""
  environ = os.environ if environ is None else environ
  if not spec and 'SLURM_ARRAY_TASK_ID' in environ and 'SLURM_ARRAY_TASK_COUNT' in environ:
    first = int(environ.get('SLURM_ARRAY_TASK_MIN', 0))
    spec = f"{int(environ['SLURM_ARRAY_TASK_ID']) - first}/{environ['SLURM_ARRAY_TASK_COUNT']}"
  if not spec:
    return None
  match = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', str(spec))
  if not match or not int(match[1]) < int(match[2]):
    raise errors.ConfigError(f'shard={spec!r} must be I/N with 0 <= I < N, e.g. '
                             '--config.shard=0/4 for the first of 4 shards.')
  index, count = int(match[1]), int(match[2])
  return None if count == 1 else (index, count)


def assigned(shard, keys):
  """The run keys of `keys` (a sweep's configurations) that `shard` trains: sorted, every N-th
  from the I-th; all of them without a shard."""
  keys = sorted(set(keys))
  return set(keys) if shard is None else set(keys[shard[0]::shard[1]])


def results_name(shard):
  return 'results.jsonl' if shard is None else f'results.shard-{shard[0]}-of-{shard[1]}.jsonl'


def lock_name(shard):
  return '.lock' if shard is None else f'.lock.shard-{shard[0]}-of-{shard[1]}'


def results_files(workdir):
  """Every results file of a workdir: results.jsonl first, then the shards' in order."""
  sharded = sorted(glob.glob(os.path.join(workdir, 'results.shard-*-of-*.jsonl')),
                   key=lambda p: tuple(int(x) for x in _FILE.search(p).groups()[::-1]))
  plain = os.path.join(workdir, 'results.jsonl')
  return ([plain] if os.path.exists(plain) else []) + sharded


def check_count(workdir, shard):
  """A workdir's shards all split the sweep N ways: another N is an error naming the fix."""
  if shard is None:
    return
  counts = {int(_FILE.search(p)[2]) for p in results_files(workdir) if _FILE.search(p)}
  other = sorted(counts - {shard[1]})
  if other:
    raise errors.WorkdirError(
        f'{workdir} holds the results of {other[0]} shards (results.shard-*-of-{other[0]}.jsonl)'
        f', but this is shard {shard[0]}/{shard[1]}: start every shard with '
        f'--config.shard=I/{other[0]}, or use another --workdir.')
