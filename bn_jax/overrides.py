"""Settings a script would ignore, refused before it runs: on the command line
(`check_overrides`: a key its grid sets, the other model's widths, or a setting no run of the
script reads, `READ_ONLY_WITH`), or varied by its grid where no run reads them
(`check_distinct_runs`). Each refusal is a `settings.ConfigError` naming the setting and the
fix."""

from bn_jax import norms
from bn_jax import settings

# Settings only some runs read: setting -> (the setting that decides, the values it is read
# with). One given on the command line that no run of the script reads is refused
# (`check_overrides`); defaults never are.
READ_ONLY_WITH = {
    # each norm's settings, from its declaration (norms.REGISTRY); ghost BN's by bn_stats
    **{key: ('norm', tuple(n for n in users if n in settings.NORMS))
       for key, users in norms.SETTINGS.items()},
    **{key: ('norm', settings.RUNNING_STATS) for key in settings.RUNNING_STATS_KEYS},
    'bn_group_size': ('bn_stats', ('ghost',)),
    'momentum': ('optimizer', ('momentum', 'nesterov')),
    'half_precision_dtype': ('half_precision', (True,)),
    'lr_decay_epochs': ('lr_schedule', ('step',)),
    'lr_decay_factor': ('lr_schedule', ('step',)),
    'cnn_pools': ('model', ('cnn',)),
    'cnn_dense_norm': ('model', ('cnn',)),
}
# A setting a script's grid sets for every run -> the list of its values, where the script has
# one (e.g. bn_vs_no_bn.py's `norms`).
GRID_LISTS = {'norm': 'norms', 'batch_size': 'batch_sizes', 'learning_rate': 'lrs'}


def check_overrides(config, overridden, grid_keys=()):
  """Refuses command-line settings that this script would ignore: a key its grid sets (e.g.
  `norm` where the script compares `norms`), the other model's layer widths, or a setting no
  run reads (`READ_ONLY_WITH`)."""
  for key in overridden:
    top = key.split('.')[0]
    if top in grid_keys:
      hint = f' (set --config.{GRID_LISTS[top]} instead)' if GRID_LISTS.get(top) in config else ''
      raise settings.ConfigError(f'--config.{top} is not used by this script: its grid sets '
                                 f'{top} for every run{hint}.')
    own = {'mlp': ('hidden',), 'cnn': ('features',), 'resnet': ('resnet_depth', 'resnet_width')}
    unused = {k for keys in own.values() for k in keys} - set(own.get(config.model, ()))
    if top in unused and 'depths' not in config:
      raise settings.ConfigError(f'--config.{top} is not used with model={config.model} (the '
                                 'MLP has `hidden`, the CNN `features`, the ResNet '
                                 '`resnet_depth` and `resnet_width`): set its own, or '
                                 '--config.model.')
  _refuse_unread(config, overridden, grid_keys)


def _refuse_unread(config, overridden, grid_keys):
  """A command-line setting of `READ_ONLY_WITH` whose deciding setting takes none of the
  values it is read with: in the config, or in the script's list where its grid sets the
  deciding setting (without such a list the grid's values are unknown, and it passes)."""
  for top in dict.fromkeys(key.split('.')[0] for key in overridden):
    if top not in READ_ONLY_WITH:
      continue
    decider, reads = READ_ONLY_WITH[top]
    source = GRID_LISTS.get(decider) if decider in grid_keys else decider
    if not source or source not in config:
      continue
    values = tuple(config[source]) if source != decider else (config[decider],)
    if set(values) & set(reads):
      continue
    runs = (f'this script runs {decider}={either(values, "and")} (--config.{source})'
            if source != decider else f'this run has {decider}={either(values)}')
    fix = (f'list {either(reads)} in --config.{source}' if source != decider else
           f'set --config.{decider}={either(reads[:1])}')
    raise settings.ConfigError(f'--config.{top} is not used: it applies only with {decider}='
                               f'{either(reads)}, and {runs}: drop it, or {fix}.')


def either(values, word='or'):
  """'a', 'a or b', 'a, b or c' (booleans as the command line spells them)."""
  words = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
  return words[0] if len(words) == 1 else f'{", ".join(words[:-1])} {word} {words[-1]}'


def check_distinct_runs(grid, configs, identities):
  """Refuses grid entries that set different values but make one run (the same identity): a
  setting the grid varies is read by no run of it, e.g. bn_momentum with norm=none. (A study,
  which indexes its runs by entry, may name one run twice.)"""
  for i, identity in enumerate(identities):
    j = identities.index(identity)
    unread = sorted(k for k in set(grid[i]) | set(grid[j]) if configs[i][k] != configs[j][k]
                    and k not in ('seeds', 'first_seed'))  # which seeds: one run's records
    if not unread:
      continue
    why = [f'{k} applies only with {decider}={either(reads)}, and they have '
           f'{decider}={configs[i][decider]}' for k in unread if k in READ_ONLY_WITH
           for decider, reads in [READ_ONLY_WITH[k]]]
    raise settings.ConfigError(
        f'grid entries {grid[j]} and {grid[i]} are the same run: no run reads '
        f'{", ".join(unread)}' + (f' ({"; ".join(why)})' if why else '') +
        ': drop the entries that repeat a run, or vary a setting these runs read.')
