r"""Ioffe & Szegedy 2015, Figure 1: BN trains a sigmoid MLP faster and better, and keeps the
inputs to its sigmoids from drifting.

  python experiments/papers/ioffe2015.py --workdir=runs/papers/ioffe2015 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/ioffe2015.py --workdir=runs/papers/ioffe2015_quick --config.quick=true

The paper's network: 28x28 input, 3 fully connected hidden layers of 100 sigmoid units, small
random Gaussian weights, batch 60, 50,000 steps, BN before each sigmoid vs none. It does not
give the optimizer: we use plain SGD at the rate of `lrs` that gives the no-BN network the best
mean validation accuracy after `select_steps` steps, for both networks (the rule is fixed
before anything trains). Every point of the curves is its own run with a `max_steps` budget:
the runs of one network are prefixes of each other (same seed, data order and constant rate),
so the final state of the run of budget s is the network after s steps.

Findings and their measures (verdicts by `bn_jax.papers.RULE`, paired by seed):
  (a) BN reaches higher test accuracy at 5k steps and at the end: BN minus none.
  (b, c) the 15th/50th/85th percentiles of the inputs to the last hidden layer's sigmoids (on
      `probe_examples` fixed test examples, eval mode) drift less with BN: `papers.drift`
      (none minus BN) over the budgets in `steps`, the last one the reference.
Writes report.md, accuracy.png and percentiles.png to the workdir.
"""

import os

import matplotlib
import numpy as np

from bn_jax import claims
from bn_jax import cli
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

NORMS = ('batch', 'none')
Q = (15, 50, 85)


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.hidden = (100, 100, 100)
  config.activation = 'sigmoid'
  config.dropout = 0.0
  config.init_std = 0.01  # "small random Gaussian values": N(0, 0.01^2), every layer
  config.optimizer = 'sgd'
  config.batch_size = 60
  config.seeds = 5
  config.evals_per_epoch = 2
  config.steps = (500, 2000, 5000, 10000, 20000, 50000)  # budgets: curve points, the last the end
  config.accuracy_at = 5000  # finding (a) at this budget (one of `steps`) and at the end
  config.lrs = (0.1, 0.3, 1.0, 3.0)  # SGD rates tried on the no-BN network
  config.select_steps = 5000  # ... for this many steps
  config.probe_examples = 1000  # fixed test examples whose sigmoid inputs are tracked
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:600', hidden=(16, 16, 16), seeds=2, steps=(10, 30, 60),
                accuracy_at=30, lrs=(0.3, 1.0), select_steps=30, probe_examples=100,
                progress=False)


def check(config):
  if config.accuracy_at not in config.steps:
    raise settings.ConfigError(f'accuracy_at={config.accuracy_at} must be one of steps='
                               f'{tuple(config.steps)}: e.g. --config.accuracy_at=5000')
  if list(config.steps) != sorted(set(config.steps)) or config.steps[0] < 1:
    raise settings.ConfigError(f'steps must be increasing positive budgets, got '
                               f'{tuple(config.steps)}')


def choose_rate(study, config):
  """The rule: the rate of `lrs` with the best mean val accuracy of the no-BN network after
  `select_steps` steps (diverged runs count 0), on seeds disjoint from the tested ones (the
  `seeds` after them); returns (rate, {rate: mean accuracy})."""
  grid = [{'norm': 'none', 'learning_rate': lr, 'max_steps': config.select_steps,
           'first_seed': config.first_seed + config.seeds} for lr in config.lrs]
  accuracy = {lr: float(np.nan_to_num(claims.final(rs, 'val_accuracy'), nan=0.0).mean())
              for lr, rs in zip(config.lrs, study.runs(grid))}
  return max(accuracy, key=accuracy.get), accuracy


def main(config, workdir):
  check(config)
  dataset = sweep.load_data(config)
  study = claims.Study(config, dataset, workdir, experiment='ioffe2015')
  rate, tried = choose_rate(study, config)
  grid = [{'norm': n, 'learning_rate': rate, 'max_steps': s} for n in NORMS
          for s in config.steps]
  runs = dict(zip([(g['norm'], g['max_steps']) for g in grid], study.runs(grid)))

  test = {k: claims.final(rs, 'test_accuracy') for k, rs in runs.items()}
  images = dataset.images('test', np.arange(min(config.probe_examples,
                                                len(dataset.test_labels))))
  tracks = {}  # (norm, seed) -> (budgets, 3 percentiles, units)
  for n in NORMS:
    model = study.model(norm=n, learning_rate=rate)
    for seed in range(config.seeds):
      tracks[n, seed] = np.stack([papers.percentiles(
          model, study.variables(runs[n, s][seed]), images, q=Q) for s in config.steps])
  drift = {n: np.array([papers.drift(tracks[n, s]) for s in range(config.seeds)])
           for n in NORMS}

  out = workdir
  steps = list(config.steps)
  report.plot_lines(os.path.join(out, 'accuracy.png'), steps, {
      f'norm={n}': ([np.nanmean(test[n, s]) for s in steps], [np.nanstd(test[n, s])
                                                               for s in steps])
      for n in NORMS}, xlabel='training steps', ylabel='test accuracy', xlog=True,
                    title=f'Ioffe & Szegedy Fig. 1(a): SGD {rate:g}, batch {config.batch_size}')
  plot_percentiles(os.path.join(out, 'percentiles.png'), steps, tracks)

  last, at = steps[-1], config.accuracy_at
  mean = lambda a: f'{np.nanmean(a):.4f}'
  gates = lambda s: (papers.arm_gates(f'BN at {s} steps', runs['batch', s]) +
                     papers.arm_gates(f'none at {s} steps', runs['none', s]))
  rows = [
      papers.finding(f'BN reaches higher test accuracy at {at} steps', _setting(config, rate),
                     test['batch', at] - test['none', at], 'accuracy', 'higher (Fig. 1a)',
                     f"BN {mean(test['batch', at])}, none {mean(test['none', at])}",
                     gates=gates(at)),
      papers.finding(f'BN reaches higher test accuracy at the end ({last} steps)',
                     _setting(config, rate), test['batch', last] - test['none', last],
                     'accuracy', 'higher (Fig. 1a)',
                     f"BN {mean(test['batch', last])}, none {mean(test['none', last])}",
                     gates=gates(last)),
      papers.finding('the sigmoid inputs drift less with BN',
                     f'drift of the 15/50/85th percentiles over budgets {tuple(steps)}',
                     drift['none'] - drift['batch'], 'drift', 'stable with BN (Fig. 1b, c)',
                     f"drift BN {drift['batch'].mean():.3f}, none {drift['none'].mean():.3f}",
                     gates=gates(last)),
  ]
  notes = [f'Rate rule: SGD rates {tuple(config.lrs)} on the no-BN network for '
           f'{config.select_steps} steps, on {config.seeds} other seeds than the tested ones; '
           'mean val accuracy ' +
           ', '.join(f'{lr:g}: {a:.4f}' for lr, a in tried.items()) + f'; chosen {rate:g}.',
           f'Network: hidden {tuple(config.hidden)} {config.activation}, weights N(0, '
           f'{config.init_std:g}^2), no dropout, batch {config.batch_size}, {config.seeds} '
           f'seeds; the paper trains on MNIST for 50,000 steps.',
           'Drift (`bn_jax.papers.drift`): per unit, mean over the earlier budgets of '
           '(|median - final median| + |width - final width|) / final width, width = 85th - '
           f'15th percentile, averaged over the {config.hidden[-1]} units of the last hidden '
           'layer.']
  papers.write_report(workdir, 'Ioffe & Szegedy 2015, Figure 1', config.data, rows, notes,
                      ['accuracy.png', 'percentiles.png'])


def _setting(config, rate):
  return (f'{len(config.hidden)}x{config.hidden[0]} sigmoid MLP, SGD {rate:g}, batch '
          f'{config.batch_size}')


def plot_percentiles(path, steps, tracks):
  """Fig. 1(b, c): the percentiles of one sigmoid's input (unit 0, seed 0) over training."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
  for ax, n in zip(axes, NORMS):
    for i, q in enumerate(Q):
      ax.plot(steps, tracks[n, 0][:, i, 0], marker='o', label=f'{q}th percentile')
    ax.set(xscale='log', xlabel='training steps', ylabel='input to a last-layer sigmoid',
           title=f'norm={n}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick},
          grid_keys=('norm', 'learning_rate', 'max_steps'), workdir='runs/papers/ioffe2015')
