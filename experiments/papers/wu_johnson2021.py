r"""Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3: PreciseBN against the EMA of
BN's statistics.

  python experiments/papers/wu_johnson2021.py --workdir=runs/papers/wu_johnson2021 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/wu_johnson2021.py --workdir=runs/papers/wu_johnson2021_quick \
      --config.quick=true

The BN-MLP trained with every BN momentum of `momenta` (0.9 / 0.99 / 0.999 weigh the newest
batch 0.1 / 0.01 / 0.001) at a small and a large batch. After every epoch e (the runs with an
`epochs` budget of e are prefixes of each other: same seed, data order and rate), test
accuracy with the EMA statistics and with PreciseBN's (`bn_jax.precise_bn`: true averages over
batches of the training batch size, train-mode statistics, no dropout), from each count of
training examples in `precise_examples` (0 = all).
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed), in the EMA's hardest setting
(the large batch, the highest momentum):
  PreciseBN is more accurate than EMA: final test accuracy, PreciseBN (all) minus EMA;
  PreciseBN is more stable: epoch-to-epoch instability (mean |change| of test accuracy from
    one epoch to the next), EMA minus PreciseBN;
  10^4 examples suffice: half a point minus (all - 10^4) final test accuracy.
Writes report.md and epochs.png to the workdir.
"""

import os

import numpy as np

from bn_jax import claims
from bn_jax import cli
from bn_jax import papers
from bn_jax import precise_bn
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.momenta = (0.9, 0.99, 0.999)
  config.batch_sizes = (32, 1024)  # small, large
  config.epochs = 5
  config.seeds = 5
  config.precise_examples = (100, 1000, 10000, 0)  # 0 = every training example
  config.suffice = 10000  # finding 3: this many examples
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:800', hidden=(16,), momenta=(0.9, 0.999), batch_sizes=(16, 128),
                epochs=3, seeds=2, precise_examples=(100, 0), suffice=100, progress=False)


def precise_accuracy(study, config, momentum, batch_size, record, examples, test):
  """Test accuracy of a run's final weights with PreciseBN statistics from `examples`
  training examples (0 = all)."""
  model = study.model(bn_momentum=momentum, batch_size=batch_size)
  variables = study.variables(record)
  train = study.dataset.train_images
  rows = precise_bn.sample(len(train), examples or len(train), record['seed'])
  stats = precise_bn.population_stats(model, variables, train[np.sort(rows)], batch_size)
  return claims.accuracy(model, {**variables, 'batch_stats': stats}, *test)


def instability(curves):
  """Per seed: mean |accuracy(e) - accuracy(e - 1)| over epochs, from (epochs, seeds)."""
  return np.abs(np.diff(curves, axis=0)).mean(0)


def main(config, workdir):
  if config.suffice not in config.precise_examples or 0 not in config.precise_examples:
    raise settings.ConfigError(f'precise_examples must include suffice={config.suffice} and 0 '
                               f'(all), got {tuple(config.precise_examples)}')
  dataset = sweep.load_data(config)
  study = claims.Study(config, dataset, workdir, experiment='wu_johnson2021')
  epochs = range(1, config.epochs + 1)
  keys = [(m, b, e) for m in config.momenta for b in config.batch_sizes for e in epochs]
  runs = dict(zip(keys, study.runs([{'bn_momentum': m, 'batch_size': b, 'epochs': e}
                                    for m, b, e in keys])))
  test = (dataset.test_images, dataset.test_labels)
  ema = {k: claims.final(rs, 'test_accuracy') for k, rs in runs.items()}
  precise = {(k, n): np.array([precise_accuracy(study, config, k[0], k[1], r, n, test)
                               for r in rs])
             for k, rs in runs.items() for n in config.precise_examples}

  curve = lambda m, b, n=None: np.stack([ema[m, b, e] if n is None else precise[(m, b, e), n]
                                         for e in epochs])  # (epochs, seeds)
  large, high = max(config.batch_sizes), max(config.momenta)
  report.plot_lines(os.path.join(workdir, 'epochs.png'), list(epochs), {
      f'{label}, batch {b}, momentum {m}': (c.mean(1), c.std(1))
      for m in config.momenta for b in config.batch_sizes
      for label, c in (('EMA', curve(m, b)), ('PreciseBN', curve(m, b, 0)))},
                    xlabel='epoch', ylabel='test accuracy', title='Wu & Johnson 2021, §3')
  last = (high, large, config.epochs)
  setting = f'BN-MLP, batch {large}, BN momentum {high}, {config.epochs} epochs'
  # The finding is the EMA's lag: its running averages must have forgotten their initial
  # values, or the comparison measures those (a record's `warnings` say so too).
  gates = (papers.arm_gates('EMA', runs[last]) +
           papers.arm_gates('PreciseBN', runs[last], statistics='precise'))
  rows = [
      papers.finding('PreciseBN is more accurate than EMA', setting,
                     precise[last, 0] - ema[last], 'accuracy', 'yes (Fig. 3)',
                     f'PreciseBN {precise[last, 0].mean():.4f}, EMA {ema[last].mean():.4f}',
                     gates=gates),
      papers.finding('PreciseBN is more stable from epoch to epoch', setting,
                     instability(curve(high, large)) - instability(curve(high, large, 0)),
                     'accuracy', 'yes (Fig. 3)',
                     f'instability EMA {instability(curve(high, large)).mean():.4f}, '
                     f'PreciseBN {instability(curve(high, large, 0)).mean():.4f}',
                     gates=gates),
      papers.finding(f'{config.suffice} examples suffice', f'{setting}; within half a point of '
                     'all examples', precise[last, 0] - precise[last, config.suffice],
                     'accuracy', '10^3-10^4 suffice (Fig. 4)',
                     f'{config.suffice}: {precise[last, config.suffice].mean():.4f}, all: '
                     f'{precise[last, 0].mean():.4f}', margin=0.005,
                     gates=papers.arm_gates('PreciseBN', runs[last], statistics='precise')),
  ]
  counts = [n or 'all' for n in config.precise_examples]
  table = ['| batch | momentum | EMA | ' + ' | '.join(f'PreciseBN {n}' for n in counts) +
           ' | instability EMA / PreciseBN |', '|---|---|---|' + '---|' * len(counts) + '---|']
  for m in config.momenta:
    for b in config.batch_sizes:
      k = (m, b, config.epochs)
      table.append(f'| {b} | {m} | {ema[k].mean():.4f} | ' + ' | '.join(
          f'{precise[k, n].mean():.4f}' for n in config.precise_examples) +
                   f' | {instability(curve(m, b)).mean():.4f} / '
                   f'{instability(curve(m, b, 0)).mean():.4f} |')
  details = '\n'.join([f'Final test accuracy (mean over {config.seeds} seeds):', '', *table])
  notes = ['PreciseBN examples are a fixed random subset per seed, in batches of the training '
           'batch size; the paper: ResNet-50 on ImageNet.',
           'Optimizer: ' + f'{config.optimizer} {config.learning_rate:g}, hidden '
           f'{tuple(config.hidden)}.']
  papers.write_report(workdir, 'Wu & Johnson 2021: PreciseBN vs EMA', config.data, rows,
                      notes, ['epochs.png'], details)


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick},
          grid_keys=('bn_momentum', 'batch_size', 'epochs'),
          workdir='runs/papers/wu_johnson2021')
