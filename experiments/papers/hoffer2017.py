r"""Hoffer, Hubara & Soudry 2017, "Train longer, generalize better": the large batch
generalizes worse, and ghost BN with regime adaptation closes most of the gap.

  python experiments/papers/hoffer2017.py --workdir=runs/papers/hoffer2017 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/hoffer2017.py --workdir=runs/papers/hoffer2017_quick --config.quick=true

Their MNIST model "F1": 784 -> 5 x [Dense 512, BN, ReLU] -> 10, SGD with momentum 0.9, weight
decay 1e-4, rate 0.1 at batch 128 and 0.1 x sqrt(B / 128) at batch B. Four runs per seed:
  small     batch `small_batch` for `epochs` epochs
  large     batch `large_batch`, the same epochs (so B_large / B_small times fewer steps)
  ghost     the large batch with BN over ghost batches of `small_batch` examples
  adapted   ghost, trained for as many steps as the small batch ("regime adaptation")
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed, test accuracy):
  the large batch generalizes worse: small minus large;
  ghost BN with adaptation closes most of the gap: (adapted - large) - 0.5 (small - large),
  i.e. more than half the gap closed.
Writes report.md and accuracy.png to the workdir.
"""

import math
import os

import numpy as np

from bn_jax import claims
from bn_jax import cli
from bn_jax import loop
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

RUNS = ('small', 'large', 'ghost', 'adapted')
FITS_TRAINING_SET = 0.9  # training accuracy (eval mode) of an arm that fits its data


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.hidden = (512,) * 5
  config.dropout = 0.0
  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.learning_rate = 0.1  # at small_batch; x sqrt(B / small_batch) at batch B
  config.small_batch = 128
  config.large_batch = 4096
  config.epochs = 2  # of the small batch (the paper trains for far longer)
  config.seeds = 5
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:1200', hidden=(32,) * 2, small_batch=16, large_batch=128,
                epochs=1, seeds=2, progress=False)


def grid(config, num_train):
  """The four runs' overrides, by name (`num_train` training examples)."""
  small, large = config.small_batch, config.large_batch
  if large % small or large <= small:
    raise settings.ConfigError(f'large_batch={large} must be a multiple of small_batch='
                               f'{small} above it: ghost batches split it evenly.')
  rate = config.learning_rate * math.sqrt(large / small)
  steps = config.epochs * loop.Schedule(num_train, small, config.epochs).steps_per_epoch
  large_run = {'norm': 'batch', 'batch_size': large, 'learning_rate': rate}
  ghost = {**large_run, 'bn_stats': 'ghost', 'bn_group_size': small}
  return {'small': {'norm': 'batch', 'batch_size': small, 'learning_rate': config.learning_rate},
          'large': large_run, 'ghost': ghost, 'adapted': {**ghost, 'max_steps': steps}}


def main(config, workdir):
  dataset = sweep.load_data(config)
  study = claims.Study(config, dataset, workdir, experiment='hoffer2017')
  overrides = grid(config, len(dataset.train_labels))
  runs = dict(zip(RUNS, study.runs([overrides[name] for name in RUNS])))
  test = {name: claims.final(rs, 'test_accuracy') for name, rs in runs.items()}
  steps = {name: rs[0]['steps'] for name, rs in runs.items()}

  report.plot_bars(os.path.join(workdir, 'accuracy.png'),
                   [f'{name}\n{steps[name]} steps' for name in RUNS],
                   [np.nanmean(test[name]) for name in RUNS],
                   [np.nanstd(test[name]) for name in RUNS], ylabel='test accuracy')
  gap = test['small'] - test['large']
  mean = lambda name: f'{np.nanmean(test[name]):.4f}'
  setting = (f"F1 {len(config.hidden)}x{config.hidden[0]}, batch {config.small_batch} vs "
             f"{config.large_batch}, {config.epochs} epochs of the small batch")
  # A generalization gap counts only where the large batch also fits the training set.
  gates = lambda *names: [g for n in names for g in papers.arm_gates(
      n, runs[n], min_accuracy=FITS_TRAINING_SET)]
  rows = [
      papers.finding('the large batch generalizes worse', setting, gap, 'accuracy',
                     'worse (Table 1)', f"small {mean('small')}, large {mean('large')}",
                     gates=gates('small', 'large')),
      papers.finding('ghost BN with regime adaptation closes most of the gap',
                     f'{setting}; ghost batches of {config.small_batch}, '
                     f"{steps['adapted']} steps", (test['adapted'] - test['large']) - 0.5 * gap,
                     'accuracy beyond half the gap', 'gap closed (Table 1)',
                     f"adapted {mean('adapted')}, ghost without adaptation {mean('ghost')}",
                     gates=gates('small', 'large', 'adapted')),
  ]
  notes = [
      f"Runs (mean test accuracy over {config.seeds} seeds): " + ', '.join(
          f"{name} {mean(name)} ({steps[name]} steps, rate "
          f"{overrides[name]['learning_rate']:.3g})" for name in RUNS) + '.',
      f'SGD momentum {config.momentum}, weight decay {config.weight_decay:g} (not on biases and '
      'BN parameters), constant rate; the paper trains longer and decays the rate.',
      'Second finding: the effect is (adapted - large) - (small - large) / 2, above 0 when '
      'ghost BN with adaptation closes more than half of the gap.']
  papers.write_report(workdir, 'Hoffer, Hubara & Soudry 2017: ghost BN and regime adaptation',
                      config.data, rows, notes, ['accuracy.png'])


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick},
          grid_keys=('norm', 'batch_size', 'learning_rate', 'bn_stats', 'bn_group_size',
                     'max_steps'), workdir='runs/papers/hoffer2017')
