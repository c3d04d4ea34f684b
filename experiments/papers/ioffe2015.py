r"""Ioffe & Szegedy 2015, Figure 1: BN trains a sigmoid MLP faster and better, and keeps the
inputs to its sigmoids from drifting.

  python experiments/papers/ioffe2015.py --workdir=runs/papers/ioffe2015 \
      --config.data=idx:/usr/share/datasets/fashion-mnist      # ~20 min on a 2-core CPU
  python experiments/papers/ioffe2015.py --workdir=runs/papers/ioffe2015_quick --config.quick=true
  python experiments/papers/ioffe2015.py --config.scale=paper   # MNIST, as the paper

The paper's network: 28x28 input, 3 fully connected hidden layers of 100 sigmoid units, small
random Gaussian weights, batch 60, 50,000 steps, BN before each sigmoid vs none; the paper does
not give the optimizer. Ours: plain SGD, each network at its own best rate of one grid `lrs`,
chosen by mean validation accuracy after `select_steps` steps on `select_seeds` seeds other
than the tested ones (the rule is fixed before anything trains). Each network trains once per
seed; the curves are read from the states and metrics it keeps at `points` (`save_states_at`:
100, 500, then evenly to the end), validation runs every 100 steps.

Findings and their measures (verdicts by `bn_jax.papers.RULE`, paired by seed):
  (a) BN trains faster: steps to `target` validation accuracy, none minus BN (a network that
      never gets there counts the whole budget); BN's test accuracy is higher at
      `accuracy_at` steps and at the end: BN minus none.
  (b, c) the 15th/50th/85th percentiles of the inputs to the last hidden layer's sigmoids (on
      `probe_examples` fixed test examples, eval mode, at step 0 and every point) drift less
      with BN: `papers.drift` relative to the final spread and absolute, none minus BN.
Writes report.md, accuracy.png and percentiles.png to the workdir.
"""

import os

import numpy as np

from bn_jax import cli
from bn_jax import health
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

NORMS = ('batch', 'none')
Q = (15, 50, 85)


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.scale = 'default'  # 'paper': MNIST, the paper's data (everything else is its setting)
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.hidden = (100, 100, 100)
  config.activation = 'sigmoid'
  config.dropout = 0.0
  config.init_std = 0.01  # "small random Gaussian values": N(0, 0.01^2), every layer
  config.optimizer = 'sgd'
  config.batch_size = 60
  config.seeds = 5
  config.max_steps = 50000
  config.evals_per_epoch = 9  # validation every 100 steps (900 a epoch): steps to `target`
  config.points = (100, 500, 2500)  # curve points: these, then every last one to the end
  config.accuracy_at = 5000  # finding (a) at this step (one of the points) and at the end
  config.target = 0.8  # finding (a): validation accuracy to reach
  config.lrs = (0.1, 0.3, 1.0, 3.0, 10.0)  # SGD rates tried on each network ...
  config.select_steps = 10000  # ... for this many steps
  config.select_seeds = 2  # ... on seeds after the tested ones
  config.probe_examples = 1000  # fixed test examples whose sigmoid inputs are tracked
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:600', hidden=(16, 16, 16), seeds=2, max_steps=60,
                evals_per_epoch=3, points=(10, 15), accuracy_at=30, target=0.3,
                lrs=(0.3, 1.0), select_steps=30, probe_examples=100, progress=False)


def paper(config):
  """The paper's own setting: MNIST; the rest of the default is the paper's already."""
  config.update(data='tfds:mnist', seeds=5, max_steps=50000)


def budgets(config):
  """The steps the runs keep (`save_states_at`): `points` but the last, then every last
  point's steps to the end (which is one)."""
  *early, every = config.points
  return tuple(sorted(set(early) | set(range(every, config.max_steps + 1, every)) |
                      {config.max_steps}))


def check(config):
  steps = budgets(config)
  if config.accuracy_at not in steps:
    raise settings.ConfigError(f'accuracy_at={config.accuracy_at} must be one of the curve '
                               f'points {steps}: e.g. --config.accuracy_at={steps[-2]}')
  if not 0 < config.target < 1:
    raise settings.ConfigError(f'target={config.target} must be a validation accuracy in '
                               '(0, 1), e.g. --config.target=0.8')


def choose_rates(study, config):
  """The rule: per network, the rate of `lrs` with the best mean val accuracy after
  `select_steps` steps (diverged runs count 0), on the `select_seeds` seeds after the tested
  ones; returns {norm: (rate, {rate: mean accuracy})}."""
  chosen = {}
  for norm in NORMS:
    grid = [{'norm': norm, 'learning_rate': lr, 'max_steps': config.select_steps,
             'first_seed': config.first_seed + config.seeds, 'seeds': config.select_seeds}
            for lr in config.lrs]
    accuracy = {lr: float(np.nan_to_num(sweep.final(rs, 'val_accuracy'), nan=0.0).mean())
                for lr, rs in zip(config.lrs, study.runs(grid))}
    chosen[norm] = max(accuracy, key=accuracy.get), accuracy
  return chosen


def saved(records, step, name):
  """Per seed: a metric at a kept step (NaN for diverged runs)."""
  return np.array([next(p[name] for p in r['saved'] if p['step'] == step)
                   if r['status'] == 'ok' else np.nan for r in records])


def steps_to(records, target, budget):
  """Per seed: the first validation step at `target` accuracy or above; `budget` if never."""
  return np.array([next((p['step'] for p in r['curve'] if p['val_accuracy'] >= target), budget)
                   for r in records], float)


def sigmoid_inputs(study, runs, rates, config, steps):
  """Per (norm, seed): percentile tracks (step 0 and `steps`, 3, units) of the last hidden
  layer's sigmoid inputs, and for BN of its normalized inputs (before gamma, beta)."""
  images = study.dataset.images('test', np.arange(min(config.probe_examples,
                                                      len(study.dataset.test_labels))))
  tracks, normalized = {}, {}
  for n in NORMS:
    model = study.model(norm=n, learning_rate=rates[n][0])
    for s, record in enumerate(runs[n]):
      states = [study.initial_variables(record, norm=n)] + [
          study.variables(record, step) for step in steps]
      inputs = [np.asarray(papers.preactivations(model, v, images)) for v in states]
      tracks[n, s] = np.stack([np.percentile(x, Q, axis=0) for x in inputs])
      if n == 'batch':
        bn = [v['params'][f'BatchNorm_{len(config.hidden) - 1}'] for v in states]
        normalized[s] = np.stack([np.percentile((x - p['bias']) / p['scale'], Q, axis=0)
                                  for x, p in zip(inputs, bn)])
  return tracks, normalized


def main(config, workdir):
  check(config)
  dataset = sweep.load_data(config)
  study = sweep.Study(config, dataset, workdir, experiment='ioffe2015')
  rates = choose_rates(study, config)
  steps = budgets(config)
  grid = [{'norm': n, 'learning_rate': rates[n][0], 'save_states_at': steps} for n in NORMS]
  runs = dict(zip(NORMS, study.runs(grid)))
  tracks, normalized = sigmoid_inputs(study, runs, rates, config, steps)
  drift = {(n, rel): np.array([papers.drift(tracks[n, s], rel) for s in range(config.seeds)])
           for n in NORMS for rel in (True, False)}
  plot_accuracy(os.path.join(workdir, 'accuracy.png'), runs, steps, rates, config)
  plot_percentiles(os.path.join(workdir, 'percentiles.png'), (0,) + steps, tracks)
  papers.write_report(workdir, 'Ioffe & Szegedy 2015, Figure 1', config.data,
                      findings(config, runs, rates, drift),
                      notes(config, rates, runs, drift, normalized),
                      ['accuracy.png', 'percentiles.png'])


def findings(config, runs, rates, drift):
  """The report's rows: speed, accuracy at `accuracy_at` and at the end, drift."""
  at, end, target = config.accuracy_at, config.max_steps, config.target
  to = {n: steps_to(runs[n], target, end) for n in NORMS}
  test = {(n, s): saved(runs[n], s, 'test_accuracy') for n in NORMS for s in (at, end)}
  fair = (f'each network runs at its own best SGD rate of {tuple(config.lrs)} (inside the '
          'grid), chosen on other seeds; same data order, init and budget')
  # A rate chosen at an edge of the grid leaves a better one untried: the network may not be
  # at its best, and the comparison not fair.
  inside = [gate for n, arm in (('batch', 'BN'), ('none', 'none')) for gate in (
      health.at_least(f'{arm} rate inside the grid (position of {rates[n][0]:g})',
                      config.lrs.index(rates[n][0]), 1),
      health.at_most(f'{arm} rate inside the grid (position of {rates[n][0]:g})',
                     config.lrs.index(rates[n][0]), len(config.lrs) - 2))]
  end_gates = (papers.arm_gates('BN', runs['batch']) + papers.arm_gates('none', runs['none']) +
               inside)
  # (a) is about speed: a baseline still untrained at `accuracy_at` is the effect itself, so
  # there it needs its own best rate, no divergence, that it trains by the end, and BN's
  # running averages warm at that step.
  warm_at = health.at_most(f'BN running averages warmed at {at} steps (momentum^steps)',
                           config.bn_momentum ** at, health.WARM)
  early_gates = end_gates + [warm_at]
  setting = (f'{len(config.hidden)}x{config.hidden[0]} sigmoid MLP, SGD (BN '
             f"{rates['batch'][0]:g}, none {rates['none'][0]:g}), batch {config.batch_size}")
  mean = lambda a: f'{np.nanmean(a):.4f}'
  return [
      papers.finding(f'BN reaches {target:g} validation accuracy in fewer steps', setting,
                     to['none'] - to['batch'], 'steps', 'faster (Fig. 1a)',
                     f"BN {np.mean(to['batch']):.0f}, none {np.mean(to['none']):.0f}",
                     gates=early_gates, why_fair=fair),
      papers.finding(f'BN reaches higher test accuracy at {at} steps', setting,
                     test['batch', at] - test['none', at], 'accuracy', 'higher (Fig. 1a)',
                     f"BN {mean(test['batch', at])}, none {mean(test['none', at])}",
                     gates=early_gates, why_fair=fair),
      papers.finding(f'BN reaches higher test accuracy at the end ({end} steps)', setting,
                     test['batch', end] - test['none', end], 'accuracy', 'higher (Fig. 1a)',
                     f"BN {mean(test['batch', end])}, none {mean(test['none', end])}",
                     gates=end_gates, why_fair=fair),
      papers.finding('the sigmoid inputs drift less with BN (relative to their final spread)',
                     setting, drift['none', True] - drift['batch', True], 'drift',
                     'stable with BN (Fig. 1b, c)',
                     f"BN {drift['batch', True].mean():.3f}, none {drift['none', True].mean():.3f}",
                     gates=end_gates, why_fair=fair),
      papers.finding('the sigmoid inputs drift less with BN (absolute)', setting,
                     drift['none', False] - drift['batch', False], 'drift',
                     'stable with BN (Fig. 1b, c)',
                     f"BN {drift['batch', False].mean():.3f}, "
                     f"none {drift['none', False].mean():.3f}", gates=end_gates, why_fair=fair),
  ]


def notes(config, rates, runs, drift, normalized):
  rule = '; '.join(f'{n}: ' + ', '.join(f'{lr:g}: {a:.4f}' for lr, a in rates[n][1].items()) +
                   f' -> {rates[n][0]:g}' for n in NORMS)
  walls = {n: runs[n][0]['wall_seconds'] for n in NORMS}
  return [
      f'Rate rule: SGD rates {tuple(config.lrs)} for {config.select_steps} steps on seeds '
      f'{config.first_seed + config.seeds}..'
      f'{config.first_seed + config.seeds + config.select_seeds - 1}'
      f' (the tested seeds are {config.first_seed}..{config.first_seed + config.seeds - 1}); '
      f'mean val accuracy {rule}.',
      f'Paper: MNIST, 3x100 sigmoid, N(0, small) weights, batch 60, 50,000 steps, optimizer '
      f'not given. Ours: hidden {tuple(config.hidden)} {config.activation}, weights N(0, '
      f'{config.init_std:g}^2), no dropout, batch {config.batch_size}, {config.max_steps} steps, '
      f'{config.seeds} seeds; each network trained once per seed ({walls["batch"]:.0f} s BN, '
      f'{walls["none"]:.0f} s none, seeds together).',
      'Steps to the target: the first validation point (every '
      f'{runs["none"][0]["curve"][0]["step"]} steps) at or above it; a network that never '
      'reaches it counts the whole budget.',
      'Drift (`bn_jax.papers.drift`): per unit, mean over step 0 and the earlier points of '
      '|median - final median| + |width - final width|, width = 85th - 15th percentile, '
      'relative: divided by the final width; averaged over the '
      f'{config.hidden[-1]} units of the last hidden layer. The normalized input of BN '
      f'(before gamma, beta) drifts {np.mean([papers.drift(t) for t in normalized.values()]):.3f}'
      ' relative, '
      f'{np.mean([papers.drift(t, False) for t in normalized.values()]):.3f} absolute.',
  ]


def plot_accuracy(path, runs, steps, rates, config):
  series = {f'norm={n} (SGD {rates[n][0]:g})': (
      [np.nanmean(saved(runs[n], s, 'test_accuracy')) for s in steps],
      [np.nanstd(saved(runs[n], s, 'test_accuracy')) for s in steps]) for n in NORMS}
  report.plot_lines(path, list(steps), series, xlabel='training steps', ylabel='test accuracy',
                    xlog=True, title=f'Ioffe & Szegedy Fig. 1(a): batch {config.batch_size}')


def plot_percentiles(path, steps, tracks):
  """Fig. 1(b, c): the percentiles of one sigmoid's input (unit 0, seed 0) over training."""
  fig, axes = report.subplots(1, 2, figsize=(10, 3.8), sharex=True)
  for ax, n in zip(axes, NORMS):
    for i, q in enumerate(Q):
      ax.plot(steps, tracks[n, 0][:, i, 0], marker='o', label=f'{q}th percentile')
    ax.set(xscale='symlog', xlabel='training steps', ylabel='input to a last-layer sigmoid',
           title=f'norm={n}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick, 'scale=paper': paper},
          grid_keys=('norm', 'learning_rate', 'save_states_at'),
          workdir='runs/papers/ioffe2015')
