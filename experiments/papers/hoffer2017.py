r"""Hoffer, Hubara & Soudry 2017, "Train longer, generalize better": with the same epochs the
large batch generalizes worse; ghost BN narrows the gap and regime adaptation closes it.

  python experiments/papers/hoffer2017.py --workdir=runs/papers/hoffer2017 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/hoffer2017.py --workdir=runs/papers/hoffer2017_quick --config.quick=true
  python experiments/papers/hoffer2017.py --config.scale=paper   # the paper's MNIST F1 (a GPU)

The paper's MNIST model "F1": 784 -> 5 x [Dense 512, BN, ReLU] -> 10; SGD momentum 0.9, weight
decay 1e-4, rate 0.1 at batch 128 (x 0.1 at epochs 10, 20, 30, 50 epochs in their code) and
0.1 x sqrt(B / 128) at batch B; batch 4096 with ghost batches of 128; PyTorch's BN (running
averages move 0.1 a step: `bn_momentum` 0.9 here). Five arms per seed, on `train_examples`
training examples (a multiple of both batches, so every batch is whole):
  small     batch `small_batch` for `epochs` epochs
  large     batch `large_batch`, the same epochs (B_large / B_small times fewer steps) and rate
  sqrt      large, rate x sqrt(B_large / B_small)
  ghost     sqrt, BN over ghost batches of `small_batch` examples
  adapted   ghost for as many steps as the small batch ("regime adaptation": the epochs and the
            rate decays stretched by B_large / B_small)
A gap in test accuracy is a generalization gap only where both batches fit their training set
(training accuracy, eval mode, >= `fits`); the running averages must be warm (momentum^steps
<= 1%) in every arm, which `large_batch` and `epochs` are chosen for.
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed, test accuracy):
  the large batch generalizes worse: small - large;
  ghost BN narrows the gap at the same steps: ghost - sqrt;
  regime adaptation with ghost BN closes most of the gap: (adapted - large) - (small - large) / 2,
    above 0 when more than half of the gap is closed (needs a gap of at least `min_gap`).
Writes report.md and accuracy.png to the workdir.
"""

import math
import os

import numpy as np

from bn_jax import cli
from bn_jax import health
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

ARMS = ('small', 'large', 'sqrt', 'ghost', 'adapted')


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.scale = 'default'  # 'paper': the paper's MNIST F1 setting (preset `paper`)
  config.data = 'tfds:mnist'
  config.val_fraction = 0.05  # validation only draws the curves: a smaller set costs less
  config.train_examples = 10240  # a multiple of large_batch: every batch whole
  config.model = 'mlp'
  config.hidden = (256,) * 3  # F1 is 5 x 512 (scale=paper)
  config.dropout = 0.0
  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.weight_decay_norms_and_biases = True  # PyTorch's SGD decays every parameter
  config.bn_momentum = 0.9  # PyTorch's default (0.1), as the paper's code
  config.learning_rate = 0.1  # at small_batch; x sqrt(B / small_batch) at batch B
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (25,)  # of the small batch; x B_large / B_small when adapted
  config.small_batch = 128
  config.large_batch = 2048  # 5 steps an epoch: enough to warm BN's running averages
  config.epochs = 36  # of the small batch (and of the large, except adapted): every arm fits
  config.fits = 0.98  # training accuracy (eval mode) of an arm that fits its training set
  config.min_gap = 0.005  # the gap (test accuracy) regime adaptation is asked to close
  config.seeds = 5
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:1200', train_examples=1024, hidden=(32,) * 2, small_batch=16,
                large_batch=128, epochs=6, lr_decay_epochs=(4,), seeds=2, progress=False)


def paper(config):
  """The paper's MNIST F1 (their code's regime), for a GPU: 13 batches of 4096 of the 57k
  examples left after the validation split."""
  config.update(data='tfds:mnist', train_examples=53248, hidden=(512,) * 5, small_batch=128,
                large_batch=4096, epochs=50, lr_decay_epochs=(10, 20, 30))


def check(config, num_train):
  """Refuses designs that cannot test the claim; returns B_large / B_small."""
  small, large = config.small_batch, config.large_batch
  if large % small or large <= small:
    raise settings.ConfigError(f'large_batch={large} must be a multiple of small_batch='
                               f'{small} above it: ghost batches split it evenly.')
  if num_train % large:
    raise settings.ConfigError(f'train_examples={num_train} must be a multiple of large_batch='
                               f'{large}: a partial batch would change the arms\' step counts '
                               'and split into uneven ghost batches.')
  if not 0 < config.fits <= 1:
    raise settings.ConfigError(f'fits={config.fits} must be a training accuracy in (0, 1].')
  return large // small


def grid(config, num_train):
  """The five arms' overrides, by name (`num_train` training examples)."""
  ratio = check(config, num_train)
  small, large = config.small_batch, config.large_batch
  rate = config.learning_rate * math.sqrt(ratio)
  large_arm = {'norm': 'batch', 'batch_size': large, 'learning_rate': config.learning_rate}
  sqrt = {**large_arm, 'learning_rate': rate}
  ghost = {**sqrt, 'bn_stats': 'ghost', 'bn_group_size': small}
  adapted = {**ghost, 'epochs': config.epochs * ratio,
             'lr_decay_epochs': tuple(e * ratio for e in config.lr_decay_epochs)}
  return {'small': {'norm': 'batch', 'batch_size': small, 'learning_rate': config.learning_rate},
          'large': large_arm, 'sqrt': sqrt, 'ghost': ghost, 'adapted': adapted}


def effects(test):
  """The findings' per-seed effects from test accuracy per arm (arrays over seeds)."""
  gap = test['small'] - test['large']
  return {'gap': gap, 'ghost': test['ghost'] - test['sqrt'],
          'closed': (test['adapted'] - test['large']) - 0.5 * gap}


def fit_gates(config, runs, *names):
  """Each arm of `names` trained to `fits` (eval-mode training accuracy), did not diverge and
  evaluated with warmed running averages."""
  return [g for n in names for g in papers.arm_gates(n, runs[n], min_accuracy=config.fits)]


def plot(path, runs, train, test):
  """Left: training (eval mode) and test accuracy per arm; right: validation accuracy against
  update steps (log), mean over seeds."""
  fig, (left, right) = report.subplots(1, 2, figsize=(11, 4.2))
  x = np.arange(len(ARMS))
  for offset, (label, values) in zip((-0.2, 0.2), (('train (eval mode)', train),
                                                   ('test', test))):
    left.bar(x + offset, [np.nanmean(values[a]) for a in ARMS], 0.4, label=label,
             yerr=[np.nanstd(values[a], ddof=1) for a in ARMS], capsize=3)
  low = min(np.nanmean(test[a]) for a in ARMS)
  left.set(xticks=x, xticklabels=ARMS, ylabel='accuracy', ylim=(max(0.0, low - 0.05), 1.005))
  left.legend(fontsize=8)
  for arm in ARMS:
    records = [r for r in runs[arm] if r['status'] == 'ok']
    if records:
      points = min(len(r['curve']) for r in records)
      right.plot([p['step'] for p in records[0]['curve'][:points]],
                 np.mean([[p['val_accuracy'] for p in r['curve'][:points]] for r in records], 0),
                 label=arm)
  right.set(xscale='log', xlabel='update steps', ylabel='validation accuracy')
  right.legend(fontsize=8)
  for ax in (left, right):
    ax.grid(alpha=0.3)
  report.save_figure(fig, path)


def main(config, workdir):
  dataset = sweep.load_data(config)
  num_train = len(dataset.train_labels)
  overrides = grid(config, num_train)
  study = sweep.Study(config, dataset, workdir, experiment='hoffer2017')
  runs = dict(zip(ARMS, study.runs([overrides[a] for a in ARMS])))
  test = {a: sweep.final(rs, 'test_accuracy') for a, rs in runs.items()}
  train = {a: sweep.final(rs, 'train_eval_accuracy') for a, rs in runs.items()}
  steps = {a: rs[0]['steps'] for a, rs in runs.items()}
  plot(os.path.join(workdir, 'accuracy.png'), runs, train, test)
  rows = findings(config, runs, test, steps)
  papers.write_report(workdir, 'Hoffer, Hubara & Soudry 2017: the generalization gap, ghost BN '
                      'and regime adaptation', config.data, rows,
                      notes(config, num_train, overrides, steps), ['accuracy.png'],
                      details=arm_table(overrides, steps, train, test))


def findings(config, runs, test, steps):
  effect = effects(test)
  mean = lambda a: f'{np.nanmean(test[a]):.4f}'
  setting = (f"MLP {len(config.hidden)}x{config.hidden[0]}, batch {config.small_batch} "
             f"({steps['small']} steps) vs {config.large_batch} ({steps['large']} steps), "
             f'{config.epochs} epochs')
  gap = health.at_least('gap to close (small - large test accuracy, mean)',
                        np.nanmean(effect['gap']), config.min_gap)
  return [
      papers.finding('the large batch generalizes worse (same epochs)', setting, effect['gap'],
                     'accuracy', 'worse (Table 1, LB)', f"small {mean('small')}, large "
                     f"{mean('large')}", gates=fit_gates(config, runs, 'small', 'large'),
                     why_fair='both batches fit their training set with warm running averages, '
                     'so a lower test accuracy of the large batch is a generalization gap, not '
                     'an unfinished optimization.'),
      papers.finding('ghost BN narrows the gap at the same steps', f'{setting}; sqrt-scaled '
                     f'rate, ghost batches of {config.small_batch}', effect['ghost'], 'accuracy',
                     'better (Table 1, +GBN vs +LR)', f"ghost {mean('ghost')}, sqrt "
                     f"{mean('sqrt')}", gates=fit_gates(config, runs, 'sqrt', 'ghost'),
                     why_fair='the two arms differ only in the BN statistics batch (same batch, '
                     'rate and steps), and both fit their training set.'),
      papers.finding('regime adaptation with ghost BN closes most of the gap',
                     f"{setting}; adapted: ghost, {steps['adapted']} steps",
                     effect['closed'], 'accuracy beyond half the gap', 'closed (Table 1, +RA)',
                     f"adapted {mean('adapted')}, large {mean('large')}, small {mean('small')}",
                     gates=[*fit_gates(config, runs, 'small', 'large', 'adapted'), gap],
                     why_fair='the adapted arm makes as many updates as the small batch, so the '
                     'regime is matched as the paper prescribes, and every arm fits its '
                     'training set.'),
  ]


def arm_table(overrides, steps, train, test):
  """Markdown: per arm its batch, BN statistics, rate, steps and accuracies (mean ± std)."""
  fmt = lambda v: f'{np.nanmean(v):.4f} ± {np.nanstd(v, ddof=1) if len(v) > 1 else 0:.4f}'
  lines = ['| arm | batch | BN statistics | rate | steps | training accuracy (eval mode) | '
           'test accuracy |', '|---|---|---|---|---|---|---|']
  for a in ARMS:
    o = overrides[a]
    stats = f"ghost {o['bn_group_size']}" if o.get('bn_stats') == 'ghost' else 'whole batch'
    lines.append(f"| {a} | {o['batch_size']} | {stats} | {o['learning_rate']:.3g} | {steps[a]} "
                 f'| {fmt(train[a])} | {fmt(test[a])} |')
  return '\n'.join(lines)


def notes(config, num_train, overrides, steps):
  ratio = config.large_batch // config.small_batch
  return [
      'Paper (Table 1, MNIST F1; their code): 784 -> 5 x [512, BN, ReLU] -> 10, SGD 0.1 '
      'momentum 0.9, weight decay 1e-4, batch 128 vs 4096 (ghost batches of 128), 50 epochs, '
      'rate x 0.1 at epochs 10, 20, 30, x sqrt(4096/128) at the large batch, gradients clipped '
      'to norm 5, 60k MNIST examples; PyTorch BN (running averages move 0.1 per ghost batch).',
      f'Ours: MLP {len(config.hidden)} x {config.hidden[0]} with BN, {num_train} training '
      f'examples, batch {config.small_batch} vs {config.large_batch} (x{ratio}), '
      f'{config.epochs} epochs, rate {config.learning_rate:g} (sqrt-scaled '
      f"{overrides['sqrt']['learning_rate']:.3g}) x {config.lr_decay_factor:g} at epochs "
      f'{tuple(config.lr_decay_epochs)} (x{ratio} when adapted), SGD momentum '
      f'{config.momentum:g}, weight decay {config.weight_decay:g}'
      f"{'' if config.weight_decay_norms_and_biases else ' (not on biases and BN parameters)'}"
      f', BN momentum {config.bn_momentum:g} (running averages move once per step, towards the '
      f'mean of the ghost batches\' statistics), no gradient clipping; '
      f'{config.val_fraction:.0%} of the training split held out for the validation curves.',
      f"Steps: {', '.join(f'{a} {steps[a]}' for a in ARMS)}; running averages hold "
      f"{config.bn_momentum ** min(steps.values()):.1e} of their initial values after the "
      'fewest.',
      f'A fit: training accuracy (eval mode, all {num_train} training examples) >= '
      f'{config.fits:g} in every seed. Third finding: (adapted - large) - (small - large) / 2, '
      'above 0 when ghost BN with adaptation closes more than half of the gap.',
  ]


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick, 'scale=paper': paper},
          grid_keys=('norm', 'batch_size', 'learning_rate', 'bn_stats', 'bn_group_size'),
          workdir='runs/papers/hoffer2017')
