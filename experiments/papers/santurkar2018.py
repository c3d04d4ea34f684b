r"""Santurkar, Tsipras, Ilyas & Madry 2018, "How does batch normalization help optimization?":
noisy BN trains about as well as BN, BN does not reduce internal covariate shift, and BN makes
the loss landscape smoother.

  python experiments/papers/santurkar2018.py --workdir=runs/papers/santurkar2018 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/santurkar2018.py --workdir=runs/papers/santurkar2018_quick \
      --config.quick=true

Three networks, the same deep CNN (3x3 conv blocks `features`, the first two max-pooled; the
paper uses VGG on CIFAR-10) trained with SGD: standard BN, no BN, and "noisy BN" (BN followed,
per step and channel, by x * U(1, 1 + bn_noise) + U(-bn_noise, bn_noise): the activations'
mean and variance change every step, `norms.ChannelNoise`). On each trained network, on
`probe_batches` fixed training batches (`bn_jax.ics`):
  ICS per layer: the gradient of the loss w.r.t. the layer's weights before and after the
    layers before it take their step (cosine and l2 difference), averaged over the layers
    after the first;
  the landscape along the gradient: losses and gradient changes at `step_sizes` times the
    rate; beta = the largest gradient change per unit of parameter change.
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed):
  noisy BN trains better than no BN: test accuracy, noisy minus none;
  noisy BN trains about as well as BN: 1 point minus |noisy - BN| test accuracy;
  BN does not reduce ICS: cosine without BN minus with BN (> 0: BN's gradients move more);
  BN makes the landscape smoother: log10 beta without BN minus with BN.
The paper measures during training; we measure the networks at the end of training.
Writes report.md and landscape.png to the workdir.
"""

import os

import jax
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


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.data = 'tfds:mnist'
  config.model = 'cnn'
  config.features = (16, 16, 32, 32)  # the deepest CNN a 2-core CPU trains 5 seeds of in minutes
  config.dropout = 0.0
  config.optimizer = 'momentum'
  config.learning_rate = 0.01
  config.batch_size = 128
  config.bn_noise = 1.0
  config.epochs = 1
  config.seeds = 5
  config.probe_batches = 4  # fixed training batches the measures average over
  config.step_sizes = (0.5, 1.0, 2.0, 4.0, 8.0)  # times the learning rate
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:600', features=(8, 8, 8), batch_size=32, epochs=1, seeds=2,
                probe_batches=1, step_sizes=(1.0, 4.0), progress=False)


def measure(study, config, norm, record, batches):
  """ICS (mean cosine and l2 over the layers after the first) and landscape of one run,
  averaged over the probe batches."""
  c = settings.resolve(config, norm=norm)
  model = study.model(norm=norm)
  variables = study.variables(record)
  steps = loop.Schedule(len(study.dataset.train_labels), c.batch_size, c.epochs)
  update = ics.first_step(settings.make_optimizer(c, steps.steps_per_epoch, steps.total_steps))
  cosines, l2s, betas, ranges = [], [], [], []
  for images, labels in batches:
    loss = ics.train_loss(model, variables, images, labels, jax.random.key(0))
    layers = ics.internal_covariate_shift(loss, variables['params'], update)[1:]
    cosines.append(np.mean([cos for _, _, cos in layers]))
    l2s.append(np.mean([l2 for _, l2, _ in layers]))
    shape = ics.landscape(loss, variables['params'],
                          [s * config.learning_rate for s in config.step_sizes])
    betas.append(shape['beta'])
    ranges.append(shape['loss_range'])
  return {'cosine': np.mean(cosines), 'l2': np.mean(l2s), 'beta': np.mean(betas),
          'loss_range': np.mean(ranges)}


def main(config, workdir):
  dataset = sweep.load_data(config)
  study = claims.Study(config, dataset, workdir, experiment='santurkar2018')
  runs = dict(zip(NORMS, study.runs([{'norm': n} for n in NORMS])))
  order = np.random.default_rng(0).permutation(len(dataset.train_labels))
  batches = [(dataset.images('train', rows), dataset.train_labels[rows]) for rows in
             np.split(order[:config.probe_batches * config.batch_size], config.probe_batches)]
  measured = {n: [measure(study, config, n, r, batches) for r in runs[n]] for n in NORMS}
  get = lambda n, key: np.array([m[key] for m in measured[n]])
  test = {n: claims.final(runs[n], 'test_accuracy') for n in NORMS}

  report.plot_bars(os.path.join(workdir, 'landscape.png'), list(NORMS),
                   [np.log10(get(n, 'beta')).mean() for n in NORMS],
                   [np.log10(get(n, 'beta')).std() for n in NORMS],
                   ylabel='log10 beta-smoothness along the gradient')
  mean = lambda n: f'{np.nanmean(test[n]):.4f}'
  setting = (f'CNN {tuple(config.features)}, SGD momentum {config.momentum} lr '
             f'{config.learning_rate:g}, batch {config.batch_size}, {config.epochs} epochs')
  # Accuracy is eval mode (running averages); ICS and beta are measured in train mode, with
  # each batch's own statistics, so their gates need no warmed averages.
  gates = lambda *norms, statistics='ema': [g for n in norms for g in papers.arm_gates(
      n, runs[n], statistics)]
  rows = [
      papers.finding('noisy BN trains better than no BN', setting,
                     test['noisy_batch'] - test['none'], 'accuracy', 'yes (Fig. 2)',
                     f"noisy {mean('noisy_batch')}, none {mean('none')}",
                     gates=gates('noisy_batch', 'none')),
      papers.finding('noisy BN trains about as well as BN (within 1 point)', setting,
                     test['noisy_batch'] - test['batch'], 'accuracy', 'yes (Fig. 2)',
                     f"noisy {mean('noisy_batch')}, BN {mean('batch')}", margin=0.01,
                     gates=gates('noisy_batch', 'batch')),
      papers.finding('BN does not reduce internal covariate shift', 'gradient cosine before '
                     'and after the earlier layers step, mean over layers 2..',
                     get('none', 'cosine') - get('batch', 'cosine'), 'cosine',
                     'BN: ICS not lower (Fig. 5)',
                     f"cosine BN {get('batch', 'cosine').mean():.3f}, none "
                     f"{get('none', 'cosine').mean():.3f}",
                     gates=gates('batch', 'none', statistics='batch')),
      papers.finding('BN makes the landscape smoother', 'beta along the gradient, steps '
                     f'{tuple(config.step_sizes)} x lr', np.log10(get('none', 'beta')) -
                     np.log10(get('batch', 'beta')), 'log10 beta', 'smoother (Fig. 4)',
                     f"beta BN {get('batch', 'beta').mean():.3g}, none "
                     f"{get('none', 'beta').mean():.3g}",
                     gates=gates('batch', 'none', statistics='batch')),
  ]
  details = '\n'.join(['| norm | test accuracy | ICS cosine | ICS l2 | beta | loss range |',
                       '|---|---|---|---|---|---|'] + [
      f"| {n} | {mean(n)} | {get(n, 'cosine').mean():.3f} | {get(n, 'l2').mean():.3g} | "
      f"{get(n, 'beta').mean():.3g} | {get(n, 'loss_range').mean():.3g} |" for n in NORMS])
  notes = [f'Noisy BN: per step and channel x * U(1, {1 + config.bn_noise:g}) + '
           f'U(-{config.bn_noise:g}, {config.bn_noise:g}) after BN, in training only.',
           f'Measured on the final networks over {config.probe_batches} fixed training batches '
           f'of {config.batch_size}; the earlier layers step by the optimizer\'s first step '
           '(momentum SGD: -lr g). The paper: VGG on CIFAR-10, measured during training.']
  papers.write_report(workdir, 'Santurkar et al. 2018: how does BN help optimization?',
                      config.data, rows, notes, ['landscape.png'], details)


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick}, grid_keys=('norm',),
          workdir='runs/papers/santurkar2018')
