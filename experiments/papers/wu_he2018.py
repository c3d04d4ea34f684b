r"""Wu & He 2018, Group Normalization, Table 2: BN's error grows as the per-device batch
shrinks, GroupNorm's does not.

  python experiments/papers/wu_he2018.py --workdir=runs/papers/wu_he2018 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/wu_he2018.py --workdir=runs/papers/wu_he2018_quick --config.quick=true
  python experiments/papers/wu_he2018.py --workdir=runs/papers/wu_he2018_paper \
      --config.scale=paper --config.data=cifar:/path/to/cifar-10-batches-py   # a GPU's work

Their setting: ResNet-50 on ImageNet, 8 GPUs, BN statistics per GPU, per-GPU batch n = 32, 16,
8, 4, 2, rate 0.1 x 8n / 256 (linear in the total batch), SGD momentum 0.9, weight decay 1e-4
(also on the norms' scale and shift), 100 epochs with the rate / 10 at 30, 60, 90.
Ours: the CIFAR ResNet (`resnet_depth`, 6n+2) on `train_examples` 28x28 images, `devices_simulated`
simulated devices as ghost groups of n examples (BN's statistics over each group of n, exactly
what per-device BN computes), total batch `devices_simulated` x n, rate `learning_rate` x
total / 256, the same epochs for every n and the paper's schedule scaled to them (the rate / 10
at `decay_fractions` of the budget). BN is evaluated with PreciseBN statistics
(`precise_bn_examples` training examples through the trained network in groups of n, as in
training), so the verdicts never rest on running averages that did not warm up.
Findings (verdicts by `bn_jax.papers.RULE`, paired by seed, test error in %):
  BN's error grows as the group shrinks: BN at the smallest n minus BN at the largest;
  GN's grows less than BN's: BN's growth minus GN's;
  GN beats BN at the smallest n: BN minus GN.
Writes report.md and error.png to the workdir.
"""

import os

import numpy as np

from bn_jax import cli
from bn_jax import papers
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep

NAMES = {'batch': 'BN', 'group': 'GN', 'layer': 'LN'}
PAPER = {'batch': (23.6, 23.7, 24.8, 27.3, 34.7), 'group': (24.1, 24.2, 24.0, 24.2, 24.1)}
PAPER_SIZES = (32, 16, 8, 4, 2)
WHY_FAIR = {
    'grows': 'BN is evaluated with PreciseBN statistics (not cold running averages), every arm '
             'trains the same epochs with the rate scaled linearly in the batch as in the paper, '
             'and its smallest groups pool only n x 7 x 7 values per channel in the last stage.',
    'less': 'GN and BN share the model, data, epochs and per-n rate, so the only difference '
            'between the two growths is where the normalization takes its statistics.',
    'beats': 'At the smallest n both arms train the same network the same number of steps at '
             'the same rate; BN uses PreciseBN statistics, so neither is handicapped at test.'}


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.scale = 'default'  # 'paper': the paper's own setting, for a GPU (`paper`)
  config.data = 'tfds:mnist'
  config.train_examples = 10000
  config.val_fraction = 0.05  # validation runs every epoch: a smaller split, a faster run
  # 3 pooled conv blocks (BN on 28x28, 14x14 and 7x7 maps) and BN on the hidden Dense layer,
  # where a group of n examples gives n values per unit (the CIFAR ResNet: --config.model=resnet)
  config.model = 'cnn'
  config.features = (16, 32, 64)
  config.cnn_pools = 3
  config.cnn_dense_norm = True
  config.dropout = 0.0
  config.resnet_depth = 8  # with --config.model=resnet: 6n+2, n = 1
  config.norm_groups = 8  # GroupNorm groups (the paper's 32 exceeds the 16-channel layer)
  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.weight_decay_norms_and_biases = True  # as the paper: also on gamma and beta
  config.learning_rate = 0.1  # at a total batch of 256, scaled linearly with it
  config.lr_schedule = 'step'
  config.decay_fractions = (0.3, 0.6, 0.9)  # rate / 10 here (the paper's 30, 60, 90 of 100)
  config.group_sizes = (32, 8, 2)  # per-device batch n (the paper's 5 with scale=paper)
  config.devices_simulated = 8  # ghost groups per batch: the paper's 8 GPUs
  config.norms = ('batch', 'group')
  config.epochs = 8
  config.precise_bn_examples = 4096  # BN evaluated with PreciseBN statistics
  config.seeds = 5
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:800', train_examples=0, features=(8, 8, 8), norm_groups=4,
                group_sizes=(8, 2), devices_simulated=4, epochs=2, precise_bn_examples=256,
                seeds=2, progress=False)


def paper(config):
  """The paper's setting on CIFAR-10, for a GPU: ResNet-56 (the CIFAR ResNet closest to
  ResNet-50's depth), the 45k / 5k split with crop + flip, per-device batches 32 -> 2 on 8
  devices, the paper's 100 epochs with the rate / 10 at 30, 60 and 90."""
  config.update(data='cifar:/path/to/cifar-10-batches-py', train_examples=0, val_fraction=0.1,
                model='resnet', resnet_depth=56, augment='crop_flip', standardize=True,
                epochs=100, precise_bn_examples=10000, half_precision=True,
                group_sizes=(32, 16, 8, 4, 2))


def network(config):
  """The model in words, e.g. 'ResNet-56 (width 16)'."""
  if config.model == 'resnet':
    return f'ResNet-{config.resnet_depth} (width {config.resnet_width})'
  dense = ', BN/GN on the dense layer' if config.cnn_dense_norm else ''
  return f'CNN {tuple(config.features)}, {config.cnn_pools} pooled{dense}'


def statistics(config):
  """Which statistics BN's numbers use: 'precise', 'corrected' or 'ema' (`papers.arm_gates`)."""
  if config.precise_bn_examples:
    return 'precise'
  return 'corrected' if config.bn_ema_bias_correction else 'ema'


def run_overrides(config, norm, n):
  """One run: `norm` with statistics over groups of n, total batch devices x n."""
  total = config.devices_simulated * n
  run = {'norm': norm, 'batch_size': total, 'learning_rate': config.learning_rate * total / 256,
         'lr_decay_epochs': tuple(
             round(f * config.epochs, 6) for f in config.decay_fractions)}
  if norm == 'batch':
    run.update(bn_stats='ghost', bn_group_size=n)
  return run


def check(config):
  for norm in ('batch', 'group'):
    if norm not in config.norms:
      raise settings.ConfigError(f"norms must include 'batch' and 'group' (the findings "
                                 f'compare them), got {tuple(config.norms)}')
  if config.model not in ('resnet', 'cnn'):
    raise settings.ConfigError(f"model must be 'resnet' or 'cnn' (BN over feature maps), got "
                               f'{config.model!r}')
  unknown = set(config.norms) - {'batch', 'group', 'layer', 'none'}
  if unknown:
    raise settings.ConfigError(f'norms {sorted(unknown)} cannot be compared here: choose from '
                               "batch, group, layer, none (Batch Renorm needs real devices).")
  if len(config.group_sizes) < 2 or min(config.group_sizes) < 2:
    raise settings.ConfigError('group_sizes needs at least two per-device batches of >= 2 '
                               f"examples, e.g. --config.group_sizes='(32,2)', got "
                               f'{tuple(config.group_sizes)}')
  fractions = tuple(config.decay_fractions)
  bounds = (0,) + fractions + (1,)
  if config.lr_schedule != 'step' or not all(a < b for a, b in zip(bounds, bounds[1:])):
    raise settings.ConfigError("lr_schedule must be 'step' with increasing decay_fractions in "
                               f"(0, 1), e.g. '(0.3,0.6,0.9)', got {config.lr_schedule!r}, "
                               f'{fractions}')


def errors(config, runs):
  """Test error (%) per seed of every (norm, n): BN with its `statistics(config)`."""
  key = {'precise': 'precise_test_accuracy', 'corrected': 'corrected_test_accuracy',
         'ema': 'test_accuracy'}[statistics(config)]
  return {(norm, n): 100 * (1 - sweep.final(rs, key if norm == 'batch' else 'test_accuracy'))
          for (norm, n), rs in runs.items()}


def findings(config, runs, error):
  """The three findings, with every arm's gates."""
  sizes = sorted(config.group_sizes, reverse=True)
  big, small = sizes[0], sizes[-1]
  growth = {norm: error[norm, small] - error[norm, big] for norm in ('batch', 'group')}
  paper = lambda norm, n: (f'{PAPER[norm][PAPER_SIZES.index(n)]}%' if n in PAPER_SIZES
                           else '')
  mean = lambda norm, n: f'{np.nanmean(error[norm, n]):.2f}%'
  setting = (f'{network(config)}, {config.devices_simulated} simulated devices, '
             f'{config.epochs} epochs')
  gates = lambda *arms: [g for norm, n in arms for g in papers.arm_gates(
      f'{NAMES.get(norm, norm)} at {n} per device', runs[norm, n],
      statistics(config) if norm == 'batch' else 'ema')]
  bn_gates = gates(('batch', big), ('batch', small))
  return [
      papers.finding(f"BN's error grows as the group shrinks ({big} -> {small} per device)",
                     setting, growth['batch'], 'points of error',
                     f"{paper('batch', big)} -> {paper('batch', small)}",
                     f"{mean('batch', big)} -> {mean('batch', small)}", gates=bn_gates,
                     why_fair=WHY_FAIR['grows']),
      papers.finding("GN's error grows less than BN's", setting,
                     growth['batch'] - growth['group'], 'points of error',
                     f"GN {paper('group', big)} -> {paper('group', small)}",
                     f"GN {mean('group', big)} -> {mean('group', small)}",
                     gates=bn_gates + gates(('group', big), ('group', small)),
                     why_fair=WHY_FAIR['less']),
      papers.finding(f'GN beats BN at {small} per device', setting,
                     error['batch', small] - error['group', small], 'points of error',
                     f"BN {paper('batch', small)} vs GN {paper('group', small)}",
                     f"BN {mean('batch', small)} vs GN {mean('group', small)}",
                     gates=gates(('batch', small), ('group', small)), why_fair=WHY_FAIR['beats']),
  ]


def details(config, runs, error):
  """Markdown: test error per norm and n (BN also with its running averages), steps, rates."""
  sizes = sorted(config.group_sizes, reverse=True)
  cell = lambda e: f'{np.nanmean(e):.2f} ± {np.nanstd(e):.2f}'
  ema = {n: 100 * (1 - sweep.final(runs['batch', n], 'test_accuracy')) for n in sizes}
  table = ['| norm | ' + ' | '.join(f'{n} per device' for n in sizes) + ' |',
           '|---|' + '---|' * len(sizes)]
  table += [f'| {NAMES.get(norm, norm)} ({statistics(config) if norm == "batch" else "-"}) | '
            + ' | '.join(cell(error[norm, n]) for n in sizes) + ' |' for norm in config.norms]
  table.append('| BN (running averages) | ' + ' | '.join(cell(ema[n]) for n in sizes) + ' |')
  table.append('| steps | ' + ' | '.join(str(runs['batch', n][0]['steps']) for n in sizes)
               + ' |')
  table.append('| rate | ' + ' | '.join(f'{config.learning_rate * config.devices_simulated * n / 256:.4g}'
                                        for n in sizes) + ' |')
  return '\n'.join([f'Test error (%) over {config.seeds} seeds (mean ± std):', '', *table])


def main(config, workdir):
  check(config)
  dataset = sweep.load_data(config)
  study = sweep.Study(config, dataset, workdir, experiment='wu_he2018')
  sizes = sorted(config.group_sizes, reverse=True)
  keys = [(norm, n) for norm in config.norms for n in sizes]
  runs = dict(zip(keys, study.runs([run_overrides(config, *k) for k in keys])))
  error = errors(config, runs)
  report.plot_lines(os.path.join(workdir, 'error.png'), sizes, {
      NAMES.get(norm, norm): ([np.nanmean(error[norm, n]) for n in sizes],
                              [np.nanstd(error[norm, n]) for n in sizes])
      for norm in config.norms}, xlabel='examples per (simulated) device',
                    ylabel='test error (%)', xlog=True, title='Wu & He 2018, Table 2 / Figure 1')
  notes = [
      'The paper: ResNet-50 on ImageNet, 8 GPUs, per-GPU batch 32 -> 2, rate 0.1 x total / 256, '
      'SGD momentum 0.9, weight decay 1e-4, 100 epochs, rate / 10 at 30, 60, 90; GroupNorm with '
      '32 groups.',
      f'Ours: {network(config)}, '
      f'{config.train_examples or "all"} training examples, {config.devices_simulated} '
      f'simulated devices as ghost groups of n, rate {config.learning_rate:g} x total / 256, SGD '
      f'momentum {config.momentum}, weight decay {config.weight_decay:g} (also on the norms), '
      f'{config.epochs} epochs, rate / 10 at {tuple(config.decay_fractions)} of them; GroupNorm '
      f'with {config.norm_groups} groups; BN evaluated with {statistics(config)} statistics '
      f'({config.precise_bn_examples} examples in groups of n for PreciseBN).']
  papers.write_report(workdir, 'Wu & He 2018: BN vs GroupNorm as the per-device batch shrinks',
                      config.data, findings(config, runs, error), notes, ['error.png'],
                      details(config, runs, error))


PRESETS = {'quick': quick, 'scale=paper': paper}

if __name__ == '__main__':
  cli.run(main, get_config, presets=PRESETS,
          grid_keys=('norm', 'batch_size', 'learning_rate', 'bn_stats', 'bn_group_size',
                     'lr_decay_epochs'),
          workdir='runs/papers/wu_he2018')
