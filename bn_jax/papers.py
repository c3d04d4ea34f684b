"""Reproductions of published BN results (`experiments/papers/`): the verdict rule, the rows
of a report and `report.md`.

Each script measures a paper's finding as one effect per seed, signed so that the paper's
finding predicts a positive number (e.g. BN's test accuracy minus no BN's), and gives its
verdict by `RULE` from the 95% t-interval over seeds (`claims.effect`).
"""

import math
import os

import numpy as np

from bn_jax import claims
from bn_jax import results

RULE = ("effect signed so that the paper's finding predicts > 0, one value per seed; "
        'reproduced if its 95% t-interval over seeds lies above 0, not reproduced if it lies '
        'below 0, inconclusive if it contains 0 (or fewer than 2 seeds give a value)')


def verdict(interval):
  """`RULE`: 'reproduced' / 'not reproduced' / 'inconclusive' from a 95% interval."""
  low, high = interval
  if math.isnan(low) or math.isnan(high):
    return 'inconclusive'
  return {'supported': 'reproduced', 'not supported': 'not reproduced',
          'inconclusive': 'inconclusive'}[claims.verdict(interval)]


def finding(name, setting, values, unit, paper='', ours=''):
  """One report row: the paper's finding `name`, our `setting`, the per-seed effects `values`
  (signed as `RULE` says) in `unit`, and optionally the paper's own number beside ours."""
  mean, interval = claims.effect(values)
  return {'finding': name, 'setting': setting, 'mean': mean, 'interval': list(interval),
          'unit': unit, 'seeds': int(sum(1 for v in values if math.isfinite(v))),
          'verdict': verdict(interval), 'paper': paper, 'ours': ours}


def _number(x):
  return 'nan' if not math.isfinite(x) else f'{x:.4g}'


def markdown(title, data, rows, notes=(), plots=(), details=''):
  """report.md's text: the title, the data, a table of `rows` (from `finding`), the rule,
  `details` (markdown, e.g. a table of every run), the notes (our settings where they differ
  from the paper's) and the plots."""
  lines = [f'# {title}', '', f'Data: `{data}`.', '',
           '| finding | our setting | effect (95% interval) | verdict | paper | ours |',
           '|---|---|---|---|---|---|']
  for r in rows:
    low, high = r['interval']
    lines.append(f"| {r['finding']} | {r['setting']} | {_number(r['mean'])} "
                 f"[{_number(low)}, {_number(high)}] {r['unit']} ({r['seeds']} seeds) | "
                 f"**{r['verdict']}** | {r['paper']} | {r['ours']} |")
  lines += ['', f'Verdict rule: {RULE}.', '']
  if details:
    lines += [details, '']
  lines += [f'- {n}' for n in notes]
  if plots:
    lines += [''] + [f'![{os.path.splitext(os.path.basename(p))[0]}]({p})' for p in plots]
  return '\n'.join(lines) + '\n'


def write_report(workdir, title, data, rows, notes=(), plots=(), details=''):
  """Writes `workdir/report.md` (atomically) and prints it; returns its path."""
  text = markdown(title, data, rows, notes, plots, details)
  path = os.path.join(workdir, 'report.md')
  if results.is_writer():
    results.atomic_write(path, text)
    print(text)
  return path


def preactivations(model, variables, images, layer=-1):
  """The MLP's inputs to the activation of hidden layer `layer` (after its norm), eval mode:
  (examples, units)."""
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  return state['intermediates']['preactivations'][layer]


def percentiles(model, variables, images, layer=-1, q=(15, 50, 85)):
  """Per unit of hidden layer `layer`: the `q` percentiles of its activation inputs over
  `images` (eval mode), shape (len(q), units)."""
  return np.percentile(np.asarray(preactivations(model, variables, images, layer)), q, axis=0)


def drift(tracks):
  """How far a distribution moves before it settles, from percentile tracks (checkpoints, 3,
  units) of the 15th / 50th / 85th percentiles, the last checkpoint the reference: per unit,
  the mean over earlier checkpoints of (|median - final median| + |width - final width|) /
  final width, width = 85th - 15th percentile; averaged over units. 0 = no movement; scale
  free, so BN and no-BN inputs compare."""
  tracks = np.asarray(tracks, float)
  median, width = tracks[:, 1], tracks[:, 2] - tracks[:, 0]
  moved = np.abs(median[:-1] - median[-1]) + np.abs(width[:-1] - width[-1])
  return float(np.mean(moved.mean(0) / np.maximum(width[-1], 1e-12)))
