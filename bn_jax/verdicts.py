"""Judgment: a finding is an effect per seed, the gates its test needs, and one verdict rule.

A finding measures one claim as an effect per seed, paired by seed and signed so that the
claim predicts a positive number (`direction`), or a difference the claim predicts to be
small (`equivalence`, within a stated margin). Its gates are the preconditions of a fair test
("each arm trained", "running averages warmed", "no arm diverged", ...), each measured from
the runs (`bn_jax.health`). `decide` applies `RULE` to a report's findings together: a failed gate makes the
verdict "invalid setup (gate: value)"; the others are tested and Holm-corrected as a family.

  rows = [verdicts.finding('BN trains faster', bn - none, gates=[...]), ...]
  rows = verdicts.decide(rows)   # each row gains p_adjusted, interval_adjusted, verdict
"""

import math

import numpy as np

from bn_jax import health

ALPHA = 0.05
RULE = (
    'per finding, one effect per seed (paired by seed). Any failed gate: "invalid setup '
    '(gate: value)", not tested. The others form the report\'s family of k tests, '
    "Holm-corrected at 0.05: a direction finding (the claim predicts > 0) is supported if its "
    'adjusted two-sided t-test p < 0.05 with mean > 0, contradicted if p < 0.05 with mean < 0; '
    'an equivalence finding (the claim predicts |effect| < margin) is supported if its '
    'adjusted two-one-sided-tests p < 0.05, contradicted if its adjusted interval lies wholly '
    'outside (-margin, margin); otherwise inconclusive, as is any finding with fewer than 2 '
    'seeds. Intervals: 95% t over seeds (raw) and 1 - 0.05/k (adjusted, Bonferroni)')


def finding(name, values, *, gates=(), margin=None, unit='', **fields):
  """One finding: `values` the effect per seed (NaN where a seed gives none), `gates` its
  preconditions, `margin` > 0 for an equivalence finding. Extra `fields` (the setting, the
  paper's number, ...) are kept for the report. Seeds without a value enter as a gate: every
  seed must give one (a diverged run is never dropped silently)."""
  values = np.asarray(values, float)
  measured = int(np.isfinite(values).sum())
  gates = [*gates, health.at_least('seeds with a value', measured, len(values))]
  row = {'finding': name, 'values': [float(v) for v in values], 'unit': unit,
         'margin': margin, 'gates': [str(g) for g in gates],
         'failed': [str(g) for g in gates if not g.passed], 'seeds': measured, **fields}
  row.update(_test(values[np.isfinite(values)], margin))
  return row


def _test(d, margin):
  """Mean, 95% interval and the raw p-value of one finding's test."""
  n = len(d)
  if n < 2:
    mean = float(d.mean()) if n else math.nan
    return {'mean': mean, 'interval': [math.nan, math.nan], 'p': math.nan, 'se': math.nan}
  mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
  t = _t(n - 1)
  half = t.ppf(1 - ALPHA / 2) * se
  if se == 0:  # every seed the same number: the test is decided by the mean alone
    p = 0.0 if (margin is None and mean != 0) or (margin and abs(mean) < margin) else 1.0
  elif margin is None:
    p = float(2 * t.sf(abs(mean) / se))
  else:  # two one-sided tests: H0 mean <= -margin and H0 mean >= margin, both rejected
    p = float(max(t.sf((mean + margin) / se), t.cdf((mean - margin) / se)))
  return {'mean': mean, 'interval': [mean - half, mean + half], 'p': p, 'se': se}


def holm(p_values):
  """Holm's step-down adjusted p-values (same order as given): the i-th smallest of k is
  multiplied by k - i + 1, and the running maximum taken, capped at 1."""
  p = np.asarray(p_values, float)
  order = np.argsort(p, kind='stable')
  adjusted = np.empty_like(p)
  running = 0.0
  for i, j in enumerate(order):
    running = max(running, min(1.0, (len(p) - i) * p[j]))
    adjusted[j] = running
  return adjusted


def decide(rows, words=None):
  """Applies `RULE` to a report's findings (from `finding`) together; returns new rows with
  `p_adjusted`, `interval_adjusted` and `verdict`. `words` renames the verdicts, e.g.
  {'supported': 'reproduced', 'contradicted': 'not reproduced'}."""
  words = {'supported': 'supported', 'contradicted': 'contradicted',
           'inconclusive': 'inconclusive', **(words or {})}
  family = [i for i, r in enumerate(rows) if not r['failed'] and math.isfinite(r['p'])]
  adjusted = dict(zip(family, holm([rows[i]['p'] for i in family]))) if family else {}
  out = []
  for i, r in enumerate(rows):
    r = dict(r)
    r['p_adjusted'] = float(adjusted.get(i, math.nan))
    r['interval_adjusted'] = _interval(r, len(family)) if i in adjusted else [math.nan] * 2
    if r['failed']:
      r['verdict'] = f'invalid setup ({"; ".join(r["failed"])})'
    else:
      r['verdict'] = words[_outcome(r)]
    out.append(r)
  return out


def effect_text(row):
  """A decided finding's effect as its tables print it: 'mean [low, high] [adjusted low,
  adjusted high]', 4 significant digits ('nan' where undefined)."""
  number = lambda x: f'{x:.4g}' if math.isfinite(x) else 'nan'
  span = lambda i: f'[{number(i[0])}, {number(i[1])}]'
  return (f"{number(row['mean'])} {span(row['interval'])} "
          f"{span(row.get('interval_adjusted', (math.nan, math.nan)))}")


def _interval(row, k):
  """The finding's t-interval at level 1 - ALPHA / k (Bonferroni over the family)."""
  if not math.isfinite(row['se']):
    return [math.nan, math.nan]
  half = _t(len([v for v in row['values'] if math.isfinite(v)]) - 1).ppf(
      1 - ALPHA / (2 * k)) * row['se']
  return [row['mean'] - half, row['mean'] + half]


def _outcome(row):
  p, mean, margin = row['p_adjusted'], row['mean'], row['margin']
  if not math.isfinite(p):
    return 'inconclusive'
  if margin is None:
    return 'inconclusive' if p >= ALPHA else ('supported' if mean > 0 else 'contradicted')
  if p < ALPHA:
    return 'supported'
  low, high = row['interval_adjusted']
  return 'contradicted' if low >= margin or high <= -margin else 'inconclusive'


def _t(df):
  """Student's t distribution (scipy, imported when a verdict is first computed)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return stats.t(df)
