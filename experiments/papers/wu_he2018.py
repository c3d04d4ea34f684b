r"""Wu & He 2018, Group Normalization, Table 2: BN's error grows as the per-device batch
shrinks, GroupNorm's does not.

  python experiments/papers/wu_he2018.py --workdir=runs/papers/wu_he2018 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/wu_he2018.py --workdir=runs/papers/wu_he2018_quick --config.quick=true

Their setting: ResNet-50 on ImageNet, 8 GPUs, BN statistics per GPU, per-GPU batch n = 32, 16,
8, 4, 2, learning rate 0.1 x 8n / 256 (linear in the total batch), the same epochs. Ours: the
CNN on 28x28 images with `devices` simulated devices as ghost groups of n examples (BN's
statistics over each group of n, exactly what per-device BN computes), total batch
`devices` x n, rate `learning_rate` x total / 256, SGD with momentum, the same epochs for every
n. BN, GroupNorm and LayerNorm for every n (Batch Renorm has no ghost groups here: it needs
real devices, `bn_stats=local`).
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed, test error in %):
  BN's error grows as the batch shrinks: BN at the smallest n minus BN at the largest;
  GN's does not (grows less than BN's): BN's growth minus GN's;
  GN beats BN at the smallest n: BN minus GN.
Writes report.md and error.png to the workdir.
"""

import os

import numpy as np

from bn_jax import claims
from bn_jax import cli
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

NAMES = {'batch': 'BN', 'group': 'GN'}
PAPER = {'batch': (23.6, 23.7, 24.8, 27.3, 34.7), 'group': (24.1, 24.2, 24.0, 24.2, 24.1)}
PAPER_SIZES = (32, 16, 8, 4, 2)


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.data = 'tfds:mnist'
  config.model = 'cnn'
  config.features = (16, 32)  # 15 configurations x 5 seeds in ~15 minutes on a 2-core CPU
  config.norm_groups = 8  # GroupNorm groups (the paper's 32 is more than our 16-channel layer)
  config.dropout = 0.0
  config.optimizer = 'momentum'
  config.learning_rate = 0.1  # at a total batch of 256, scaled linearly with it
  config.group_sizes = (32, 16, 8, 4, 2)  # per-device batch n
  config.devices_simulated = 8  # ghost groups per batch: the paper's 8 GPUs
  config.norms = ('batch', 'group', 'layer')
  config.epochs = 1
  config.seeds = 5
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:800', features=(8, 8), norm_groups=4, group_sizes=(8, 2),
                devices_simulated=4, norms=('batch', 'group'), seeds=2, progress=False)


def run_overrides(config, norm, n):
  """One run: `norm` with statistics over groups of n, total batch devices x n."""
  total = config.devices_simulated * n
  run = {'norm': norm, 'batch_size': total, 'learning_rate': config.learning_rate * total / 256}
  if norm == 'batch':
    run.update(bn_stats='ghost', bn_group_size=n)
  return run


def check(config):
  for norm in ('batch', 'group'):
    if norm not in config.norms:
      raise settings.ConfigError(f"norms must include 'batch' and 'group' (the findings "
                                 f'compare them), got {tuple(config.norms)}')
  unknown = set(config.norms) - {'batch', 'group', 'layer', 'none'}
  if unknown:
    raise settings.ConfigError(f'norms {sorted(unknown)} cannot be compared here: choose from '
                               "batch, group, layer, none (Batch Renorm needs real devices).")
  if len(config.group_sizes) < 2:
    raise settings.ConfigError('group_sizes needs at least two per-device batches, e.g. '
                               "--config.group_sizes='(32,2)'")


def main(config, workdir):
  check(config)
  dataset = sweep.load_data(config)
  study = claims.Study(config, dataset, workdir, experiment='wu_he2018')
  sizes = sorted(config.group_sizes, reverse=True)
  keys = [(norm, n) for norm in config.norms for n in sizes]
  runs = dict(zip(keys, study.runs([run_overrides(config, *k) for k in keys])))
  error = {k: 100 * (1 - claims.final(rs, 'test_accuracy')) for k, rs in runs.items()}

  report.plot_lines(os.path.join(workdir, 'error.png'), sizes, {
      f'norm={norm}': ([np.nanmean(error[norm, n]) for n in sizes],
                       [np.nanstd(error[norm, n]) for n in sizes]) for norm in config.norms},
                    xlabel='examples per (simulated) device', ylabel='test error (%)',
                    xlog=True, title='Wu & He 2018, Table 2 / Figure 1')
  big, small = sizes[0], sizes[-1]
  growth = {norm: error[norm, small] - error[norm, big] for norm in ('batch', 'group')}
  paper = lambda norm, n: (f'{PAPER[norm][PAPER_SIZES.index(n)]}%' if n in PAPER_SIZES
                           else '')
  mean = lambda norm, n: f'{np.nanmean(error[norm, n]):.2f}%'
  setting = (f'CNN {tuple(config.features)}, {config.devices_simulated} simulated devices, '
             f'{config.epochs} epoch(s)')
  gates = lambda *arms: [g for norm, n in arms for g in papers.arm_gates(
      f'{NAMES.get(norm, norm)} at {n} per device', runs[norm, n])]
  rows = [
      papers.finding(f"BN's error grows as the batch shrinks ({big} -> {small} per device)",
                     setting, growth['batch'], 'points of error',
                     f"{paper('batch', big)} -> {paper('batch', small)}",
                     f"{mean('batch', big)} -> {mean('batch', small)}",
                     gates=gates(('batch', big), ('batch', small))),
      papers.finding("GN's error does not (grows less than BN's)", setting,
                     growth['batch'] - growth['group'], 'points of error',
                     f"GN {paper('group', big)} -> {paper('group', small)}",
                     f"GN {mean('group', big)} -> {mean('group', small)}",
                     gates=gates(('batch', big), ('batch', small), ('group', big),
                                 ('group', small))),
      papers.finding(f'GN beats BN at {small} per device', setting,
                     error['batch', small] - error['group', small], 'points of error',
                     f"BN {paper('batch', small)} vs GN {paper('group', small)}",
                     f"BN {mean('batch', small)} vs GN {mean('group', small)}",
                     gates=gates(('batch', small), ('group', small))),
  ]
  table = ['| norm | ' + ' | '.join(f'{n} per device' for n in sizes) + ' |',
           '|---|' + '---|' * len(sizes)]
  table += [f'| {norm} | ' + ' | '.join(f'{np.nanmean(error[norm, n]):.2f} ± '
                                         f'{np.nanstd(error[norm, n]):.2f}' for n in sizes) + ' |'
            for norm in config.norms]
  details = '\n'.join([f'Test error (%) over {config.seeds} seeds (mean ± std):', '', *table])
  notes = [f'Rates: {config.learning_rate:g} x total batch / 256, SGD momentum '
           f'{config.momentum}; GroupNorm with {config.norm_groups} groups. '
           'The paper: ResNet-50, ImageNet, 100 epochs.']
  papers.write_report(workdir, 'Wu & He 2018: BN vs GroupNorm as the batch shrinks',
                      config.data, rows, notes, ['error.png'], details)


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick},
          grid_keys=('norm', 'batch_size', 'learning_rate', 'bn_stats', 'bn_group_size'),
          workdir='runs/papers/wu_he2018')
