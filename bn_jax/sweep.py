"""The sweep every experiment runs through: trains only the (configuration, seed) pairs that
its workdir has not finished, records each run as soon as it finishes, resumes after a kill.

A configuration is keyed by its identity (`settings.identity`), so growing a grid or `seeds`
trains just the new pairs, the missing seeds of a configuration stacked in one program.
Finished runs made by code that may give other numbers are handled by `config.on_code_change`
(refuse, retrain or reuse; `bn_jax.reuse`). Unfinished ones checkpoint to
`checkpoints/<run key>-<tag>/` (the tag names the host code and the seeds being trained) and
resume from there. A configuration whose seeds were partly
recorded when the process died resumes its checkpoint with all the seeds it was training (their
numbers depend on training together) and records the missing ones.
"""

import concurrent.futures
import contextlib
import functools
import os
import threading
import time

import jax
import numpy as np

from bn_jax import checks
from bn_jax import code_version
from bn_jax import data
from bn_jax import host
from bn_jax import interrupt
from bn_jax import locks
from bn_jax import loop
from bn_jax import overrides
from bn_jax import parallel
from bn_jax import placement
from bn_jax import programs as programs_lib
from bn_jax import results
from bn_jax import reuse
from bn_jax import settings
from bn_jax import shards
from bn_jax import summaries
from bn_jax import threefry
from bn_jax import train


def enable_compilation_cache(config):
  """Turns on JAX's persistent compilation cache (every program, however quick); its path
  (`settings.compilation_cache_path`; `checks.validate` checks a set one is a directory)."""
  if not config.compilation_cache:
    return None
  path = settings.compilation_cache_path(config)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path


def load_data(config):
  """Everything a script does before its sweep: other hosts joined (if configured; before any
  JAX call, which JAX requires), settings checked, compilation cache on, data loaded."""
  parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                  config.process_id)
  checks.validate(config)
  enable_compilation_cache(config)
  dataset = data.load(config.data, val_fraction=config.val_fraction,
                      split_seed=config.split_seed, data_dir=config.data_dir or None,
                      train_examples=config.train_examples, standardize=config.standardize)
  if results.is_writer():
    print(f'{config.data}: {dataset.sizes()}')
  return dataset


def sweep(config, dataset, grid, *, experiment, workdir=None, runner=None, save_states=False,
          compile_threads=0, script=None):
  """Runs every configuration of `grid` (a list of overrides of `config`) for its seeds
  (`settings.seed_list`); returns their records in grid order (one per seed).

  Args:
    config: the resolved base config; `grid` entries override it.
    dataset: a `data.Dataset`.
    experiment: the name recorded in every record (a workdir holds one experiment).
    workdir: with one, finished runs are re-used and new ones appended to results.jsonl at
      once; without, everything trains and nothing is written.
    runner: one device (default for one device) or a `parallel.DataParallel`.
    save_states: also keep each run's final variables (`Workdir.load_state`), for
      measurements of trained weights.
    compile_threads: threads compiling programs ahead (0: one per CPU core).
    script: the script whose hash joins the code version (default: the `__main__` file).
  Returns:
    A list of records, the seeds of each grid entry in order.
  """
  runner = runner or placement.make_runner(config)
  configs = _validated(config, dataset, grid, runner, workdir)
  code = {**code_version.version(script), 'threefry': threefry.installed()}
  shard = shards.parse(config.shard)
  if shard and not workdir:
    raise settings.ConfigError(f'shard={config.shard!r} needs a --workdir the shards share.')
  work = (results.Workdir(workdir, experiment, resume=config.resume, overwrite=config.overwrite,
                          shard=shard) if workdir else None)
  identities = [settings.identity(c, runner.num_devices, dataset.fingerprint) for c in configs]
  if not save_states:
    overrides.check_distinct_runs(grid, configs, identities)
  runs = {}  # run key -> [config, identity, seeds]: a grid may name one configuration twice
  for c, identity in zip(configs, identities):
    runs.setdefault(results.run_key(identity), [c, identity, set()])[2].update(
        settings.seed_list(c))
  device_data = host.DeviceData.put(dataset, runner)
  fingerprint = functools.lru_cache(maxsize=None)(  # (run key, seeds trained together) -> str
      lambda key, n: programs_lib.program_fingerprint(
          **_programs_of(runs[key][0], device_data, runner), seeds=list(range(n))))
  finished = reuse.reusable(work, runs, code, config.on_code_change, save_states, fingerprint)
  todo = []  # (key, config, identity, seeds to train, seeds to record)
  mine = shards.assigned(shard, runs)
  for key, (c, identity, seeds) in runs.items():
    new = sorted(s for s in seeds if (key, s) not in finished and key in mine)
    if new:
      todo.append((key, c, identity, reuse.seeds_to_train(work, key, code, new), new))
  missing = sum(len(t[4]) for t in todo)
  if work and results.is_writer():
    part = f' (shard {shard[0]}/{shard[1]})' if shard else ''
    total = sum(len(runs[key][2]) for key in mine)
    print(f'{workdir}{part}: {total - missing} of {total} runs finished before; training '
          f'{missing} runs in {len(todo)} configurations.', flush=True)
  # The settings the grid varies (TensorBoard names each run by those in its identity).
  varied = {k for entry in grid for k in entry if len({repr(c[k]) for c in configs}) > 1}
  trainer = _Trainer(experiment, work, code, save_states, varied,
                     isinstance(runner, parallel.DataParallel))
  trainer.train_all(todo, placement.lanes(config, runner, dataset, device_data, len(todo)),
                    compile_threads)
  every = {**finished, **trainer.recorded}
  if shard:
    every = _all_shards_done(work, runs, trainer.recorded, shard, missing)
  return [every[results.run_key(identity), s]
          for c, identity in zip(configs, identities) for s in settings.seed_list(c)]


def _validated(config, dataset, grid, runner, workdir):
  """The grid's configurations, each checked (`checks.validate`), then the sweep as a whole
  (`checks.check_sweep`)."""
  configs = [settings.resolve(config, **overrides) for overrides in grid]
  for c in configs:
    checks.validate(c, runner.num_devices, len(dataset.train_labels))
    if c.standardize != dataset.standardize:
      raise settings.ConfigError(
          f'standardize={c.standardize}, but the dataset was loaded with standardize='
          f'{dataset.standardize}: it is a data setting, one per sweep; set '
          '--config.standardize (sweep.load_data loads the data with it), not a grid entry.')
  checks.check_sweep(configs, dataset, runner.num_devices, workdir)
  return configs


def _all_shards_done(work, runs, recorded, shard, trained):
  """Every record of the sweep from every shard's file; `ShardDone` while some are missing."""
  every = {**work.refresh(), **recorded}
  left = [(key, s) for key, (_, _, seeds) in runs.items() for s in seeds
          if (key, s) not in every]
  if left:
    raise shards.ShardDone(
        f'shard {shard[0]}/{shard[1]}: its {trained} runs are done; {len(left)} runs of other '
        'shards are not finished yet, so the tables come with the last shard to finish (or '
        'the same command without --config.shard, which trains nothing then).')
  return every


class _Trainer:
  """Trains a sweep's configurations on worker threads and records each as it finishes."""

  def __init__(self, experiment, work, code, save_states, varied, data_parallel):
    self.experiment, self.work, self.code = experiment, work, code
    self.save_states, self.varied, self.data_parallel = save_states, varied, data_parallel
    self.lock, self.stop, self.recorded = threading.Lock(), threading.Event(), {}

  def train_all(self, todo, lanes, compile_threads):
    """Programs compile ahead on `compile_threads`; each lane trains `lane.threads`
    configurations at once, each on its own thread (a run's numbers do not depend on the
    others); configuration j goes to lane j mod len(lanes)."""
    pick = lambda j: lanes[j % len(lanes)]
    with concurrent.futures.ThreadPoolExecutor(compile_threads or os.cpu_count() or 1) as pool, \
         contextlib.ExitStack() as stack:
      workers = [stack.enter_context(concurrent.futures.ThreadPoolExecutor(lane.threads))
                 for lane in lanes]
      compiled = [pool.submit(lambda c, seeds, lane: programs_lib.compile_programs(
          **_programs_of(c, lane.data, lane.runner), seeds=seeds), t[1], t[3], pick(j))
                  for j, t in enumerate(todo)]
      running = [workers[j % len(lanes)].submit(self.train_one, *t, programs, pick(j))
                 for j, (t, programs) in enumerate(zip(todo, compiled))]
      concurrent.futures.wait(running)
      if self.stop.is_set():
        pool.shutdown(cancel_futures=True)
      errors = [f.exception() for f in running if f.exception()]
      if errors:  # a real error before an interruption
        raise next((e for e in errors if not isinstance(e, interrupt.Interrupted)), errors[0])

  def train_one(self, key, c, identity, seeds, new, programs, lane):
    """Trains one configuration's `seeds` together on `lane`'s devices and records those in
    `new` (all of them unless a checkpoint resumes seeds recorded before)."""
    if self.stop.is_set() or interrupt.requested():  # nothing of this one started yet
      self.stop.set()
      raise interrupt.Interrupted(None, interrupt.signum())
    work = self.work
    try:
      programs = programs.result()
      checkpointer = (reuse.checkpointer(work, key, self.code, seeds, c, programs.fingerprint)
                      if work else None)
      logger = (summaries.RunSummaries(work.path, key, seeds, identity, self.varied)
                if work and c.tensorboard else None)
      t0 = time.perf_counter()
      seed_results, states = loop.fit(
          settings.make_model(c, self.data_parallel), lane.data, seeds=seeds,
          programs=programs, runner=lane.runner, checkpointer=checkpointer,
          desc=self.label(c), should_stop=interrupt.requested,
          logger=logger,
          on_save=reuse.state_saver(work, key, seeds) if self.save_states else None,
          **{k: v for k, v in settings.fit_args(c).items() if k not in loop.COMPILE_ARGS})
      wall = time.perf_counter() - t0
    except BaseException:
      self.stop.set()  # the configurations not started yet are skipped
      raise
    made_by = {**self.code, 'programs': programs.fingerprint, 'program_seeds': len(seeds)}
    records = [results.make_record(experiment=self.experiment, config=c, identity=identity,
                                   seed_result=r, code=made_by, wall_seconds=wall,
                                   devices=lane.devices) for r in seed_results
               if r['seed'] in new]
    with self.lock:
      if work:
        self.record(key, c, seeds, new, states, records, checkpointer)
      self.recorded.update({(key, r['seed']): r for r in records})
      _say_warnings(self.label(c), records)

  def label(self, c):
    """A configuration's name on the console: model, norm, batch size and the other settings
    the grid varies."""
    return f'{c.model}/{c.norm} bs={c.batch_size}' + ''.join(
        f' {k}={c[k]}' for k in sorted(self.varied) if k not in ('model', 'norm', 'batch_size'))

  def record(self, key, c, seeds, new, states, records, checkpointer):
    """Writes a configuration's records (its final states first, when kept), then deletes its
    checkpoints."""
    locks.check_lock(self.work.path)
    if self.save_states:  # before the records: a recorded run always has its state
      for i, seed in enumerate(seeds):
        if seed in new:
          pick = functools.partial(lambda x, j: x[j], j=i)
          self.work.save_state(key, seed, {'params': jax.tree.map(pick, states.params),
                                           'batch_stats': jax.tree.map(pick, states.batch_stats)})
    results.append_records(self.work.results_path, records)
    if not c.keep_checkpoints and results.is_writer():
      checkpointer.delete()
      with contextlib.suppress(OSError):  # checkpoints/ too, when no run's are left
        os.rmdir(os.path.dirname(checkpointer.directory))


def _programs_of(c, device_data, runner):
  """`programs_lib.compile_programs`' arguments but the seeds for configuration `c`."""
  schedule = loop.Schedule(device_data.size('train'), c.batch_size, c.epochs, c.max_steps,
                           c.chunk_steps, c.evals_per_epoch, runner.num_devices)
  return dict(
      model=settings.make_model(c, isinstance(runner, parallel.DataParallel)),
      data=device_data, schedule=schedule, learning_rate=c.learning_rate,
      eval_batch_size=c.eval_batch_size, runner=runner,
      optimizer=settings.make_optimizer(c, schedule.steps_per_epoch, schedule.total_steps),
      augment=c.augment, loss_scale=settings.loss_scale(c))


def _say_warnings(label, records):
  """The warnings of a configuration's runs (`label` names it), once on the console (process
  0)."""
  said = {}
  for r in records:
    for warning in r['warnings']:
      said.setdefault(warning, []).append(r['seed'])
  for warning, seeds in said.items():
    if results.is_writer():
      print(f'warning: {label} seeds {seeds}: {warning}',
            flush=True)


def run(config, dataset, *, experiment, runner=None, **overrides):
  """Trains every seed of one configuration (no workdir); returns one record per seed."""
  return sweep(config, dataset, [overrides], experiment=experiment, runner=runner)


class Study:
  """A study's training runs (the claims, a paper reproduction), every one through the
  resumable sweep: recorded in the workdir's results.jsonl with its final state, checkpointed,
  resumed after a kill, and never trained twice (a second call of a finished study trains
  nothing)."""

  def __init__(self, config, dataset, workdir, experiment='claims'):
    self.config, self.dataset, self.workdir = config, dataset, workdir
    self.experiment = experiment

  def runs(self, grid):
    """Trains what is missing of `grid` (a list of overrides of the config); returns, per grid
    entry, its records (seeds in order)."""
    records = sweep(self.config, self.dataset, grid, experiment=self.experiment,
                    workdir=self.workdir, save_states=True)
    out = []
    for entry in grid:  # an entry may set its own `seeds`
      n = entry.get('seeds', self.config.seeds)
      out.append(records[:n])
      records = records[n:]
    return out

  def steps_per_epoch(self, **overrides):
    """Training steps per epoch of the configuration `overrides` describe, on the devices a
    sweep of it uses (several drop the last partial batch)."""
    c = settings.resolve(self.config, **overrides)
    return loop.Schedule(len(self.dataset.train_labels), c.batch_size,
                         num_devices=placement.make_runner(c).num_devices).steps_per_epoch

  def model(self, **overrides):
    """The model of the configuration `overrides` describe."""
    return settings.make_model(settings.resolve(self.config, **overrides))

  def initial_variables(self, record, **overrides):
    """The variables a run started from (step 0): its seed's init under the configuration
    `overrides` describe (the same numbers `loop.fit` starts from)."""
    keys = programs_lib.seed_keys([record['seed']])[:, 0]
    model = self.model(**overrides)
    stacked = train.init_variables(model, keys, (1,) + self.dataset.image_shape)
    return jax.tree.map(lambda x: np.asarray(x[0]), stacked)

  def variables(self, record, step=None):
    """A run's final variables {'params', 'batch_stats'}, or those at one of its
    `save_states_at` steps."""
    return results.load_state(self.workdir, record, step)


def final(records, name):
  """Per seed: a final metric (NaN for diverged runs)."""
  return np.array([r['final'][name] if r['status'] == 'ok' else np.nan for r in records])
