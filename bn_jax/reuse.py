"""What a sweep can keep of its workdir: finished runs (re-used, or handled by
`on_code_change` when made by code that may give other numbers), the checkpoints of unfinished
ones (named by run key, host code and seeds; their programs' fingerprint inside) and the states
runs keep (`save_states_at`)."""

import functools
import hashlib
import json
import os
import shutil

import jax

from bn_jax import checkpoint
from bn_jax import code_version
from bn_jax import results
from bn_jax import settings


def _threefry_hint(made_by, code):
  """Why runs of this very code can be other programs: the scripts lower threefry unrolled
  (`cli.run` calls `threefry.install()`), Python code may not."""
  if made_by.get('threefry') is None or made_by['threefry'] == code.get('threefry'):
    return ''
  if made_by['threefry']:
    return (' They were made with the threefry lowering the scripts install: call '
            'bn_jax.threefry.install() first to share a script\'s workdir.')
  return (' They were made without the threefry lowering the scripts install (in Python '
          'without bn_jax.threefry.install()): use them from there, or retrain.')


def reusable(work, runs, code, on_code_change, save_states, fingerprint):
  """The finished runs this sweep can use, by (run key, seed); applies `on_code_change` to
  those made by code that may give other numbers (`code_version.same_numbers`;
  `fingerprint(key, seeds trained together)` gives a configuration's programs fingerprint
  today)."""
  if not work:
    return {}
  wanted = {(key, s): work.finished[key, s] for key, (_, _, seeds) in runs.items()
            for s in seeds if (key, s) in work.finished}
  stale = [r for r in wanted.values() if not code_version.same_numbers(
      r['code'], code, functools.partial(fingerprint, r['run_key']))]
  if stale and on_code_change == 'refuse':
    raise settings.ConfigError(
        f'{len(stale)} finished runs in {work.results_path} were made by code that may give '
        f'other numbers (their programs or the host code that shapes a run differ from '
        f'today\'s; made at commit {stale[0]["code"]["commit"]}'
        f'{" with uncommitted changes" if stale[0]["code"].get("dirty") else ""}): pass '
        '--config.on_code_change=retrain to train them again with this code, '
        '--config.on_code_change=reuse to use them as they are, or use another --workdir.'
        + _threefry_hint(stale[0]['code'], code))
  if stale and on_code_change == 'retrain':
    work.supersede(stale)
    for r in stale:
      del wanted[r['run_key'], r['seed']]
  elif stale and results.is_writer():
    print(f're-using {len(stale)} finished runs made by code that may give other numbers '
          '(on_code_change=reuse); their records name their code.')
  if save_states:
    lost = [(key, s, step) for (key, s), r in wanted.items()
            for step in [None] + [p['step'] for p in r.get('saved', [])]
            if not os.path.exists(work.state_path(key, s, step))]
    if lost:
      raise settings.ConfigError(
          f'{len(lost)} finished runs in {work.results_path} have no saved final state (e.g. '
          f'{work.state_path(*lost[0])}), which this experiment measures: use another '
          '--workdir, or --config.on_code_change=retrain after deleting their records.')
  return wanted


def checkpoint_name(key, code, seeds):
  """`<run key>-<tag>`, the tag a hash of the host code and the seeds trained together (the
  directory's RUN_FILE names its programs)."""
  tag = hashlib.sha1(f'{code["host"]} {list(seeds)}'.encode()).hexdigest()[:8]
  return f'{key}-{tag}'


# In a run's checkpoint directory: the seeds it trains together, and its programs' fingerprint.
RUN_FILE = 'seeds.json'


def seeds_to_train(work, key, code, new):
  """The seeds to train for the unrecorded seeds `new`: those of a checkpoint of this host code
  that holds them all (a kill after some of its seeds were recorded), else `new` itself (a
  checkpoint of other programs is discarded when training starts, `checkpointer`)."""
  parent = os.path.join(work.path, 'checkpoints') if work else ''
  for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    seeds = run_file(os.path.join(parent, name)).get('seeds')
    if isinstance(seeds, list) and name == checkpoint_name(key, code, seeds) and \
       set(new) <= set(seeds):
      return seeds
  return new


def run_file(directory):
  """A checkpoint directory's RUN_FILE ({} when missing or unreadable)."""
  try:
    with open(os.path.join(directory, RUN_FILE), encoding='utf-8') as f:
      found = json.load(f)
  except (OSError, ValueError):
    return {}
  return found if isinstance(found, dict) else {}


def checkpointer(work, key, code, seeds, c, programs):
  """The run's checkpoints: `checkpoints/<key>-<tag>`, the tag naming the host code and seeds
  and its RUN_FILE the `programs` fingerprint, so a checkpoint of code that may give other
  numbers or of other seeds is never resumed (it is deleted instead)."""
  name = checkpoint_name(key, code, seeds)
  parent = os.path.dirname(work.checkpoint_dir(name))
  if os.path.isdir(parent) and results.is_writer():
    for other in os.listdir(parent):
      if other.startswith(key + '-') and (
          other != name or run_file(os.path.join(parent, other)).get('programs') != programs):
        print(f'discarding checkpoints/{other}: another code version or seed set of this run')
        shutil.rmtree(os.path.join(parent, other), ignore_errors=True)
  manager = checkpoint.Checkpointer(work.checkpoint_dir(name), keep=c.checkpoint_keep,
                                    every_steps=c.checkpoint_every_steps,
                                    min_seconds=c.checkpoint_min_seconds)
  results.atomic_write(os.path.join(manager.directory, RUN_FILE), json.dumps(
      {'seeds': list(seeds), 'programs': programs}))
  return manager


def state_saver(work, key, seeds):
  """`fit`'s `on_save`: keeps every seed's variables at a `save_states_at` step (the states
  are written before the checkpoint that passes them, so a resumed run has them all)."""
  if not work or not results.is_writer():
    return None

  def save(step, variables):
    for i, seed in enumerate(seeds):
      work.save_state(key, seed, jax.tree.map(lambda x: x[i], variables), step)
  return save
