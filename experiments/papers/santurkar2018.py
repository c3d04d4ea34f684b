r"""Santurkar, Tsipras, Ilyas & Madry 2018, "How does batch normalization help optimization?":
noisy BN trains about as well as BN, BN does not reduce internal covariate shift, and BN makes
the loss landscape smoother.

  python experiments/papers/santurkar2018.py --workdir=runs/papers/santurkar2018 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/santurkar2018.py --workdir=runs/papers/santurkar2018_quick \
      --config.quick=true
  python experiments/papers/santurkar2018.py --config.scale=paper \
      --config.data=cifar:/path/to/cifar-10-batches-py   # the paper's setting, a GPU's work

The paper: VGG on CIFAR-10, plain SGD at rate 0.1, batch 128, ~15k steps; Fig. 2 compares
the *training* accuracy of standard, BN and "noisy BN" networks; Figs. 4 and 5 measure the
landscape and ICS during training. Here: one plain CNN (3x3 conv blocks `features`, the first
two max-pooled; no residual connections, as VGG) with plain SGD, trained as BN, no BN and noisy
BN (BN, then per step and channel x * U(1, 1.25) + U(-0.5, 0.5) with a small per-activation
jitter, their Appendix A: `norms.ChannelNoise`, `bn_noise`; evaluation applies the noise's mean,
scale 1.125). Each run is measured at `curve_points` evenly spaced steps (`save_states_at`: one
run per network and seed gives the whole curve): training accuracy (train mode, the noise on,
averaged over the steps since the previous point), test accuracy; and at the points
`measure_at`, on `probe_batches` fixed training batches (`bn_jax.ics`), BN and no BN:
  ICS per layer: the gradient of the loss w.r.t. the layer's weights before and after the
    layers before it take the optimizer's actual step at that point (plain SGD: -lr g),
    cosine and l2 difference, averaged over the layers after the first;
  the landscape along the gradient: gradient changes at `step_sizes` times the rate; beta =
    the largest gradient change per unit of parameter change.
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed):
  noisy BN trains better than no BN: final training accuracy, noisy minus none;
  noisy BN trains about as well as BN: the same, noisy minus BN, within `margin` (TOST);
  BN does not reduce ICS: ICS cosine without BN minus with BN, plus `ics_margin`, averaged over
    the points (> 0: BN's cosine is not higher by more than the margin);
  BN makes the landscape smoother: log10 beta without BN minus with BN, averaged over the points.
Writes report.md, training_accuracy.png and ics_landscape.png to the workdir.
"""

import os

import numpy as np

from bn_jax import claims
from bn_jax import cli
from bn_jax import ics
from bn_jax import loop
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

NORMS = ('batch', 'none', 'noisy_batch')
MEASURED = ('batch', 'none')  # ICS and beta: BN against no BN (the paper's Figs. 4, 5)
LABELS = {'batch': 'BN', 'none': 'no BN', 'noisy_batch': 'noisy BN'}


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.scale = 'default'  # 'paper': the paper's setting on CIFAR-10, for a GPU (`paper`)
  config.data = 'tfds:mnist'
  config.model = 'cnn'
  config.features = (16, 16, 32, 32)  # plain (VGG-like) CNN a 2-core CPU trains 15 times over
  config.dropout = 0.0
  config.optimizer = 'sgd'  # the paper's plain SGD
  config.learning_rate = 0.1
  config.batch_size = 128
  config.bn_noise = 0.5  # the paper's: scale U(1, 1.25), shift U(-0.5, 0.5)
  config.epochs = 1  # 421 steps of the 54k Fashion-MNIST training images
  config.bn_ema_bias_correction = True  # eval-mode numbers without cold running averages
  config.seeds = 5
  config.curve_points = 9  # evenly spaced steps where each run is measured (its state kept)
  config.measure_at = (1, 3, 6, 9)  # which of those (1 = the first) get ICS and beta
  config.probe_batches = 4  # fixed training batches ICS and beta average over
  config.step_sizes = (0.5, 1.0, 2.0, 4.0)  # the landscape's steps, times the rate
  config.margin = 0.01  # training accuracy: "about as well" as BN
  config.ics_margin = 0.05  # ICS cosine: BN's not higher by more than this
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:600', features=(8, 8), batch_size=32, epochs=2, seeds=2,
                curve_points=3, measure_at=(1, 3), probe_batches=1, step_sizes=(1.0, 4.0),
                progress=False)


def paper(config):
  """The paper's setting on CIFAR-10, for a GPU: the deepest plain CNN here with VGG-11's
  widths (8 conv layers; VGG has no residual connections, so no ResNet), SGD 0.1, batch 128,
  40 epochs of the 45k training images (~14k steps)."""
  config.update(data='cifar:/path/to/cifar-10-batches-py', standardize=True,
                features=(64, 128, 256, 256, 512, 512, 512, 512), epochs=40, curve_points=20,
                measure_at=(1, 2, 5, 10, 15, 20), probe_batches=8, half_precision=True)


def check(config, total_steps):
  """Refuses designs that cannot test the claims; returns the measured steps (all points)."""
  if config.optimizer != 'sgd' or config.lr_schedule != 'constant':
    raise settings.ConfigError("optimizer must be 'sgd' with lr_schedule 'constant' (the "
                               'paper\'s plain SGD: its actual update, -lr g, is the step ICS '
                               f'measures), got {config.optimizer!r}, {config.lr_schedule!r}')
  if config.save_states_at:
    raise settings.ConfigError('save_states_at is set by curve_points here; leave it unset.')
  points = int(config.curve_points)
  if not 2 <= points <= total_steps:
    raise settings.ConfigError(f'curve_points={points} must be in 2..{total_steps} (the '
                               'training steps)')
  if not config.measure_at or not set(config.measure_at) <= set(range(1, points + 1)):
    raise settings.ConfigError(f'measure_at={tuple(config.measure_at)} must name points in '
                               f'1..curve_points={points}')
  if config.margin <= 0 or config.ics_margin < 0 or config.probe_batches < 1:
    raise settings.ConfigError('margin must be > 0, ics_margin >= 0, probe_batches >= 1')
  return [round(total_steps * k / points) for k in range(1, points + 1)]


def measure(study, config, norm, record, step, batches):
  """ICS (cosine and relative l2, mean over the layers after the first) and beta of one run at
  `step`, averaged over the probe batches; the earlier layers take plain SGD's step -lr g."""
  loss = ics.batch_loss(study.model(norm=norm))  # one compiled program for every call
  variables = study.variables(record, step=step)
  params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  update = ics.sgd_step(config.learning_rate)
  rates = [s * config.learning_rate for s in config.step_sizes]
  cosines, l2s, betas = [], [], []
  for images, labels in batches:
    data = (rest, images, labels)
    layers = ics.internal_covariate_shift(loss, params, update, data)[1:]
    cosines.append(np.mean([cos for _, _, cos in layers]))
    l2s.append(np.mean([l2 for _, l2, _ in layers]))
    betas.append(ics.landscape(loss, params, rates, data)['beta'])
  return {'cosine': np.mean(cosines), 'l2': np.mean(l2s), 'beta': np.mean(betas)}


def saved(records, key):
  """(seeds, points) array of a `saved` metric."""
  return np.array([[s[key] for s in r['saved']] for r in records], float)


def plot(workdir, steps, runs, measured, at):
  """training_accuracy.png (Fig. 2) and ics_landscape.png (Figs. 4, 5)."""
  curves = {LABELS[n]: (saved(runs[n], 'train_accuracy').mean(0),
                        saved(runs[n], 'train_accuracy').std(0)) for n in NORMS}
  report.plot_lines(os.path.join(workdir, 'training_accuracy.png'), steps, curves,
                    xlabel='training steps', ylabel='training accuracy (train mode)')
  fig, axes = report.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], 'cosine', 'ICS: gradient cosine (1 = no shift)'),
                         (axes[1], 'beta', 'log10 beta along the gradient')):
    for n in MEASURED:
      values = measured[n][key] if key == 'cosine' else np.log10(measured[n][key])
      ax.errorbar(at, values.mean(0), values.std(0), marker='o', capsize=3, label=LABELS[n])
    ax.set(xlabel='training steps', ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, os.path.join(workdir, 'ics_landscape.png'))


def findings(config, runs, measured, setting):
  """The four findings, each with its gates."""
  final = {n: saved(runs[n], 'train_accuracy')[:, -1] for n in NORMS}
  mean = lambda n: f'{final[n].mean():.4f}'
  # Training accuracy and ICS / beta are train-mode numbers (each batch's own statistics): the
  # running averages do not enter them.
  gates = lambda *norms: [g for n in norms for g in papers.arm_gates(n, runs[n], 'batch')]
  cos = {n: measured[n]['cosine'].mean(1) for n in MEASURED}
  beta = {n: np.log10(measured[n]['beta']).mean(1) for n in MEASURED}
  probe = (f"{len(config.measure_at)} points, {config.probe_batches} probe batches; step -lr g")
  return [
      papers.finding('noisy BN trains better than no BN', setting, final['noisy_batch'] -
                     final['none'], 'training accuracy', 'yes (Fig. 2)',
                     f"noisy {mean('noisy_batch')}, none {mean('none')}",
                     gates=gates('noisy_batch', 'none'),
                     why_fair='both networks train with the same data order, rate and budget, '
                     'and the noise is the paper\'s.'),
      papers.finding('noisy BN trains about as well as BN', setting,
                     final['noisy_batch'] - final['batch'], 'training accuracy', 'yes (Fig. 2)',
                     f"noisy {mean('noisy_batch')}, BN {mean('batch')}", margin=config.margin,
                     gates=gates('noisy_batch', 'batch'),
                     why_fair='BN and noisy BN differ only by the paper\'s noise, same seeds, '
                     'data order, rate and budget.'),
      papers.finding('BN does not reduce internal covariate shift',
                     f'cosine(no BN) - cosine(BN) + {config.ics_margin:g}, layers 2.., {probe}',
                     cos['none'] - cos['batch'] + config.ics_margin, 'cosine',
                     'BN: ICS not lower (Fig. 5)', f"cosine BN {cos['batch'].mean():.3f}, none "
                     f"{cos['none'].mean():.3f}", gates=gates('batch', 'none'),
                     why_fair='ICS is measured as defined in the paper, on the same batches, '
                     'during training, with the optimizer\'s actual step.'),
      papers.finding('BN makes the landscape smoother',
                     f'log10 beta(no BN) - log10 beta(BN), steps {tuple(config.step_sizes)} x '
                     f'lr, {probe}', beta['none'] - beta['batch'], 'log10 beta',
                     'smoother (Fig. 4)', f"beta BN {10 ** beta['batch'].mean():.3g}, none "
                     f"{10 ** beta['none'].mean():.3g}", gates=gates('batch', 'none'),
                     why_fair='beta is the paper\'s gradient change per unit step along the '
                     'gradient, on the same batches and step sizes for both networks.'),
  ]


def details(runs, measured, steps, at, dropped):
  """Markdown: each network's final numbers, then the curves point by point."""
  final = lambda n, key: np.array([r['final'][key] for r in runs[n]])
  lines = ['| network | training accuracy, train mode (last points) | training accuracy, eval '
           'mode | test accuracy |', '|---|---|---|---|']
  for n in NORMS:
    lines.append(f"| {LABELS[n]} | {saved(runs[n], 'train_accuracy')[:, -1].mean():.4f} | "
                 f"{final(n, 'train_eval_accuracy').mean():.4f} | "
                 f"{final(n, 'test_accuracy').mean():.4f} |")
  lines += ['', f'Noisy BN evaluated with the noise dropped instead of its mean: test accuracy '
            f'{dropped.mean():.4f}.', '',
            '| step | training accuracy BN / none / noisy | ICS cosine BN / none | ICS l2 BN / '
            'none | beta BN / none |', '|---|---|---|---|---|']
  train = {n: saved(runs[n], 'train_accuracy').mean(0) for n in NORMS}
  for i, step in enumerate(steps):
    row = f"| {step} | {' / '.join(f'{train[n][i]:.4f}' for n in NORMS)} |"
    if step in at:
      j = at.index(step)
      row += ''.join(' ' + ' / '.join(f'{measured[n][k][:, j].mean():{f}}' for n in MEASURED) +
                     ' |' for k, f in (('cosine', '.4f'), ('l2', '.3g'), ('beta', '.3g')))
    else:
      row += ' | | |'
    lines.append(row)
  return '\n'.join(lines)


def main(config, workdir):
  dataset = sweep.load_data(config)
  schedule = loop.Schedule(len(dataset.train_labels), config.batch_size, config.epochs,
                           config.max_steps)
  steps = check(config, schedule.total_steps)
  at = [steps[k - 1] for k in sorted(config.measure_at)]
  config = settings.resolve(config, save_states_at=tuple(steps))
  study = sweep.Study(config, dataset, workdir, experiment='santurkar2018')
  runs = dict(zip(NORMS, study.runs([{'norm': n} for n in NORMS])))
  order = np.random.default_rng(0).permutation(len(dataset.train_labels))
  batches = [(dataset.images('train', rows), dataset.train_labels[rows]) for rows in
             np.split(order[:config.probe_batches * config.batch_size], config.probe_batches)]
  measured = {}
  for n in MEASURED:
    values = [[measure(study, config, n, r, s, batches) for s in at] for r in runs[n]]
    measured[n] = {k: np.array([[v[k] for v in seed] for seed in values]) for k in
                   ('cosine', 'l2', 'beta')}
  plain = study.model(norm='batch')  # the noisy networks' variables, the noise dropped
  test_images = dataset.images('test')
  dropped = np.array([claims.accuracy(plain, study.variables(r), test_images,
                                      dataset.test_labels) for r in runs['noisy_batch']])
  plot(workdir, steps, runs, measured, at)
  setting = (f'CNN {tuple(config.features)}, plain SGD lr {config.learning_rate:g}, batch '
             f'{config.batch_size}, {steps[-1]} steps; training accuracy in train mode over '
             f'steps {steps[-2]}..{steps[-1]}')
  notes = [
      'The paper: VGG on CIFAR-10, plain SGD 0.1, batch 128, ~15k steps; training accuracy '
      'curves (Fig. 2); ICS and the landscape measured during training (Figs. 4, 5).',
      f'Ours: {setting}; {config.seeds} seeds, the same data order for the three networks.',
      f'Noisy BN (Appendix A): after BN, per step and channel x * U(1, {1 + config.bn_noise / 2:g})'
      f' + U(-{config.bn_noise:g}, {config.bn_noise:g}), each with per-activation jitter '
      f'U(-{config.bn_noise / 10:g}, {config.bn_noise / 10:g}); evaluated with the noise\'s mean '
      f'(scale {1 + config.bn_noise / 4:g}, shift 0).',
      f'ICS and beta at steps {tuple(at)} on {config.probe_batches} fixed training batches of '
      f'{config.batch_size} in train mode; the earlier layers step by plain SGD\'s actual '
      f'update -{config.learning_rate:g} g.']
  papers.write_report(workdir, 'Santurkar et al. 2018: how does BN help optimization?',
                      config.data, findings(config, runs, measured, setting), notes,
                      ['training_accuracy.png', 'ics_landscape.png'],
                      details(runs, measured, steps, at, dropped))


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick, 'scale=paper': paper},
          grid_keys=('norm',), workdir='runs/papers/santurkar2018')
