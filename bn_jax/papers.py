"""Reproductions of published BN results (`experiments/papers/`): findings with their gates,
the verdicts of a report (`bn_jax.verdicts`, Holm-corrected across its findings) and
`report.md`.

Each script measures a paper's finding as one effect per seed, signed so that the paper's
finding predicts a positive number (e.g. BN's test accuracy minus no BN's), or a difference it
predicts to be small (`margin`), with the gates its test needs (`arm_gates`: every arm trained,
did not diverge, and evaluated with warmed running averages).
"""

import os

import numpy as np

from bn_jax import health
from bn_jax import results
from bn_jax import verdicts

WORDS = {'supported': 'reproduced', 'contradicted': 'not reproduced'}
RULE = (verdicts.RULE + '; "supported" reads reproduced, "contradicted" not reproduced')
MIN_TRAIN_ACCURACY = 0.5  # an arm below it did not train (chance is 0.1)


def arm_gates(arm, records, statistics='ema', min_accuracy=MIN_TRAIN_ACCURACY):
  """The gates of one arm's runs: it trained (training accuracy >= `min_accuracy`), no seed
  diverged, and the running averages its numbers use were warmed (`statistics`: 'ema', or
  'precise' / 'corrected' / 'batch', which do not depend on the initial values)."""
  return [health.trained(arm, records, min_accuracy), health.no_divergence(arm, records),
          health.warmed(arm, records, statistics)]


def finding(name, setting, values, unit, paper='', ours='', gates=(), margin=None,
            why_fair=''):
  """One report row: the paper's finding `name`, our `setting`, the per-seed effects `values`
  in `unit`, its `gates`, an equivalence `margin` (None: a direction finding), and optionally
  the paper's own number beside ours. `why_fair`: one sentence on why our setting tests the
  paper's claim, shown under the table when the verdict is "not reproduced". Verdicts come
  with the report (`markdown`)."""
  return verdicts.finding(name, values, gates=gates, margin=margin, unit=unit,
                          setting=setting, paper=paper, ours=ours, why_fair=why_fair)


def markdown(title, data, rows, notes=(), plots=(), details=''):
  """report.md's text: the title, the data, a table of `rows` (from `finding`, decided
  together), the rule, `details` (markdown, e.g. a table of every run), the notes (our
  settings where they differ from the paper's) and the plots."""
  rows = verdicts.decide(rows, WORDS)
  lines = [f'# {title}', '', f'Data: `{data}`.', '',
           '| finding | our setting | effect, 95% interval [adjusted] | gates | verdict | paper '
           '| ours |', '|---|---|---|---|---|---|---|']
  for r in rows:
    margin = f", margin ±{r['margin']:g}" if r['margin'] is not None else ''
    lines.append(f"| {r['finding']} | {r['setting']} | {verdicts.effect_text(r)} {r['unit']} "
                 f"({r['seeds']} seeds{margin}) | {len(r['gates']) - len(r['failed'])} of "
                 f"{len(r['gates'])} passed | **{r['verdict']}** | {r['paper']} | {r['ours']} |")
  lines += ['', f'Verdict rule: {RULE}.', '', 'Gates:']
  lines += [f"- {r['finding']}: {'; '.join(r['gates'])}." for r in rows] + ['']
  refuted = [r for r in rows if r['verdict'] == WORDS['contradicted']]
  if refuted:
    lines += ['Why each "not reproduced" is a fair test:']
    lines += [f"- {r['finding']}: {r.get('why_fair') or 'no reason given by the script.'}"
              for r in refuted] + ['']
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


def drift(tracks, relative=True):
  """How far a distribution moves before it settles, from percentile tracks (checkpoints, 3,
  units) of the 15th / 50th / 85th percentiles, the last checkpoint the reference: per unit,
  the mean over earlier checkpoints of |median - final median| + |width - final width|, width
  = 85th - 15th percentile, divided by the final width when `relative` (scale free, so BN and
  no-BN inputs compare); averaged over units. 0 = no movement."""
  tracks = np.asarray(tracks, float)
  median, width = tracks[:, 1], tracks[:, 2] - tracks[:, 0]
  moved = (np.abs(median[:-1] - median[-1]) + np.abs(width[:-1] - width[-1])).mean(0)
  return float(np.mean(moved / np.maximum(width[-1], 1e-12) if relative else moved))
