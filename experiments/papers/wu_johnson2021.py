r"""Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3: PreciseBN against the EMA of
BN's statistics.

  python experiments/papers/wu_johnson2021.py --workdir=runs/papers/wu_johnson2021 \
      --config.data=idx:/usr/share/datasets/fashion-mnist
  python experiments/papers/wu_johnson2021.py --workdir=runs/papers/wu_johnson2021_quick \
      --config.quick=true
  python experiments/papers/wu_johnson2021.py --workdir=runs/papers/wu_johnson2021_paper \
      --config.scale=paper --config.data=cifar:/path/to/cifar-10-batches-py   # a GPU's work

Their setting: ResNet-50 on ImageNet, evaluated after every epoch with BN's EMA statistics and
with PreciseBN's (true averages over ~10^4 training examples in train-mode batches); at a large
batch with a linearly scaled rate the model moves fast, the EMA trails it, and its accuracy lies
below PreciseBN's and jumps from epoch to epoch (Fig. 3); 10^3-10^4 examples suffice (Fig. 4).
Ours: a BN-MLP trained once per BN momentum (`momenta`) and seed at a large batch with SGD and
the linearly scaled rate for >= 2,000 steps, its state kept after every epoch
(`save_states_at`); at each, test accuracy with the EMA, the bias-corrected EMA (its initial
0/1 removed: / (1 - m^t)) and PreciseBN from `precise_bn_examples` and from all examples.
Findings (`bn_jax.papers.RULE`, paired by seed), per momentum, over the epochs where the EMA
holds <= 1% of its initial values (m^t <= 0.01):
  more accurate: the mean over epochs of PreciseBN (all) minus EMA;
  more stable (detrended: same weights, so the training trend cancels): the mean over epochs
    of |EMA - PreciseBN (all)| minus that of PreciseBN (`precise_bn_examples`);
and at the end `precise_bn_examples` suffice: all minus the subset within +-0.005 (TOST).
Writes report.md, epochs.png and departure.png to the workdir.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import claims
from bn_jax import cli
from bn_jax import health
from bn_jax import papers
from bn_jax import placement
from bn_jax import precise_bn
from bn_jax import report
from bn_jax import schedule
from bn_jax import settings
from bn_jax import sweep

ARMS = ('ema', 'corrected', 'subset', 'precise')  # per epoch: test accuracy with each
SUFFICE_MARGIN = 0.005
WHY_FAIR = {
    'accurate': 'At every epoch both numbers come from the same weights on the same test set '
                'and differ only in BN\'s statistics; only epochs where the EMA holds <= 1% '
                'of its initial values count, so the difference is the EMA\'s lag, not its '
                'start.',
    'stable': 'Both estimators are measured against the same reference (PreciseBN from all '
              'training examples at the same weights), which removes the training trend they '
              'share; PreciseBN\'s subset is no larger than the EMA\'s effective sample '
              '(1 / (1 - m) batches).',
    'suffice': 'Both use the same final weights and the same batch size; only the number of '
               'training examples behind the statistics differs.'}


def get_config():
  config = settings.base_config()
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.scale = 'default'  # 'paper': the paper's own setting, for a GPU (`paper`)
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.hidden = (128, 128)  # two BN layers
  config.dropout = 0.0  # dropout feeding BN makes its training statistics differ from eval's
  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.batch_size = 1024  # large: 53 steps an epoch of Fashion-MNIST's 54k
  config.learning_rate = 0.4  # 0.1 x 1024 / 256, the linear scaling rule
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (30,)  # the rate / 10 for the last quarter
  config.epochs = 40  # 2,120 steps
  config.momenta = (0.9, 0.99)  # BN momentum (PyTorch's 0.1 and 0.01)
  config.seeds = 5
  config.precise_bn_examples = 10000  # PreciseBN's subset (the paper's 10^4)
  config.bn_ema_bias_correction = True  # final['corrected_*'] beside the EMA's
  config.save_every = 1  # epochs between kept states
  config.min_epochs = 5  # a per-epoch finding needs this many epochs with a warmed EMA
  return config


def quick(config):
  """Small everything, on synthetic data; applied before the command-line overrides."""
  config.update(data='synthetic:800', hidden=(16,), batch_size=64, learning_rate=0.1,
                epochs=8, lr_decay_epochs=(6,), momenta=(0.5, 0.9), seeds=2,
                precise_bn_examples=100, min_epochs=3, progress=False)


def paper(config):
  """The paper's setting on CIFAR-10 for a GPU: the CIFAR ResNet nearest ResNet-50's depth
  (56), a large batch (1024 = 8 x He et al.'s 128) at the linearly scaled rate 0.8 with 5
  warm-up epochs, He et al.'s 182 epochs with the rate / 10 at 91 and 136, crop + flip."""
  config.update(data='cifar:/path/to/cifar-10-batches-py', model='resnet', resnet_depth=56,
                standardize=True, augment='crop_flip', weight_decay=1e-4, batch_size=1024,
                learning_rate=0.8, warmup_epochs=5.0, lr_decay_epochs=(91, 136), epochs=182,
                save_every=2, half_precision=True)


def network(config):
  """The network in words, e.g. 'BN-MLP (128, 128)' or 'ResNet-56'."""
  if config.model == 'mlp':
    return f'BN-MLP {tuple(config.hidden)}'
  return f'ResNet-{config.resnet_depth}' if config.model == 'resnet' else f'BN-{config.model}'


def check(config):
  if not config.momenta or not all(0 < m < 1 for m in config.momenta):
    raise settings.ConfigError(f'momenta must be BN momenta in (0, 1), got '
                               f'{tuple(config.momenta)}')
  if config.precise_bn_examples <= 0 or not config.bn_ema_bias_correction:
    raise settings.ConfigError('the findings need precise_bn_examples > 0 and '
                               'bn_ema_bias_correction=true')
  if config.save_every < 1 or config.min_epochs < 2:
    raise settings.ConfigError(f'save_every must be >= 1 and min_epochs >= 2, got '
                               f'{config.save_every} and {config.min_epochs}')


def save_points(sched, every):
  """The steps whose states a run of schedule `sched` keeps: every `every`-th epoch's end and
  the last step."""
  ends = range(every, sched.num_epochs + 1, every)
  return tuple(sorted({min(e * sched.steps_per_epoch, sched.total_steps) for e in ends} |
                      {sched.total_steps}))


def warm(momentum, steps):
  """Per step: whether the EMA holds at most `health.WARM` of its initial values there."""
  return float(momentum) ** np.asarray(steps, float) <= health.WARM


def mean_over(values, mask):
  """Per seed: the mean of `values` (points, seeds) over the points where `mask` is true."""
  return np.asarray(values, float)[np.asarray(mask)].mean(0)


def departure(curve, reference, mask):
  """Detrended instability per seed: the mean over the `mask` points of |curve - reference|
  (both (points, seeds), at the same weights, so the trend they share cancels)."""
  return mean_over(np.abs(np.asarray(curve) - np.asarray(reference)), mask)


def _precise(model, variables, inputs, test, config, cache, key):
  """PreciseBN's test accuracy of one state per arm of `inputs`. It depends on the weights
  alone (train-mode statistics), so a state `key` = (seed, step) whose weights equal those
  measured before under that key (another momentum's run) reuses them: `cache['shared']`
  counts those."""
  params = jax.tree.leaves(variables['params'])
  if key in cache and all(np.array_equal(a, b) for a, b in zip(cache[key][0], params)):
    cache['shared'] += 1
    return cache[key][1]
  values = {arm: claims.accuracy(model, {**variables, 'batch_stats': precise_bn.population_stats(
      model, variables, x, config.batch_size)}, *test, chunk=config.eval_batch_size)
            for arm, x in inputs.items()}
  cache[key] = (params, values)
  return values


def measure(study, config, momentum, records, steps, cache):
  """Per arm of `ARMS`: test accuracy (points, seeds) at `steps` (NaN for a diverged seed);
  `cache` (a dict with 'shared': 0) is shared by the calls of one report."""
  model = study.model(bn_momentum=momentum)
  data = study.dataset
  test = (data.test_images, data.test_labels)
  out = {arm: np.full((len(steps), len(records)), np.nan) for arm in ARMS}
  n = len(data.train_labels)
  for s, r in enumerate(records):
    if r['status'] != 'ok':
      continue
    inputs = {arm: jnp.asarray(data.images('train', precise_bn.sample(n, count, r['seed'])))
              for arm, count in (('subset', config.precise_bn_examples), ('precise', n))}
    points = {p['step']: p for p in r['saved']}
    for i, step in enumerate(steps):
      v = study.variables(r, step=step)
      corrected = precise_bn.bias_corrected(v['batch_stats'], momentum, step)
      values = {'ema': points[step]['test_accuracy'],
                'corrected': claims.accuracy(model, {**v, 'batch_stats': corrected}, *test,
                                             chunk=config.eval_batch_size),
                **_precise(model, v, inputs, test, config, cache, (r['seed'], step))}
      for arm, value in values.items():
        out[arm][i, s] = value
  return out


def summary(curve, mask):
  """Per seed, over the `mask` epochs (NaN when there are none): the accuracies' means, the
  gap PreciseBN (all) minus EMA, and each arm's departure from PreciseBN (all)."""
  if not np.any(mask):
    nan = np.full(curve['ema'].shape[1], np.nan)
    return {**{arm: nan for arm in ARMS}, 'gap': nan,
            **{f'departure_{arm}': nan for arm in ARMS}}
  return {**{arm: mean_over(curve[arm], mask) for arm in ARMS},
          'gap': mean_over(curve['precise'] - curve['ema'], mask),
          **{f'departure_{arm}': departure(curve[arm], curve['precise'], mask) for arm in ARMS}}


def findings(config, runs, curves, steps):
  """The report's rows: per momentum, accuracy and stability; at the end, the subset."""
  rows, n = [], config.precise_bn_examples
  for m in config.momenta:
    mask = warm(m, steps)
    s = summary(curves[m], mask)
    setting = (f'{network(config)}, batch {config.batch_size}, BN momentum {m:g}, '
               f'{steps[-1]} steps; {int(mask.sum())} epochs with m^t <= 0.01')
    gates = [*papers.arm_gates('EMA', runs[m]), health.warmed('PreciseBN', runs[m], 'precise'),
             health.at_least('epochs with a warmed EMA', mask.sum(), config.min_epochs)]
    rows += [
        papers.finding(f'PreciseBN is more accurate than the EMA (momentum {m:g})', setting,
                       s['gap'], 'accuracy', 'yes (Fig. 3)',
                       f'mean over epochs: PreciseBN {np.nanmean(s["precise"]):.4f}, EMA '
                       f'{np.nanmean(s["ema"]):.4f}', gates=gates,
                       why_fair=WHY_FAIR['accurate']),
        papers.finding(f'PreciseBN is more stable than the EMA (momentum {m:g})', setting,
                       s['departure_ema'] - s['departure_subset'], 'accuracy', 'yes (Fig. 3)',
                       f'mean distance from PreciseBN (all): EMA '
                       f'{np.nanmean(s["departure_ema"]):.4f}, PreciseBN ({n}) '
                       f'{np.nanmean(s["departure_subset"]):.4f}', gates=gates,
                       why_fair=WHY_FAIR['stable'])]
  high = max(config.momenta)
  last = {arm: curves[high][arm][-1] for arm in ('precise', 'subset')}
  rows.append(papers.finding(
      f'{n} examples suffice', f'final weights (momentum {high:g} runs); within '
      f'{SUFFICE_MARGIN} of all examples', last['precise'] - last['subset'], 'accuracy',
      '10^3-10^4 suffice (Fig. 4)', f'{n}: {np.nanmean(last["subset"]):.4f}, all: '
      f'{np.nanmean(last["precise"]):.4f}', margin=SUFFICE_MARGIN,
      gates=papers.arm_gates('PreciseBN', runs[high], 'precise'),
      why_fair=WHY_FAIR['suffice']))
  return rows


def details(config, runs, curves, steps):
  """A markdown table per momentum: the final numbers (the runs' own `final`), and the
  per-epoch means over the warmed epochs and over all epochs (corrected EMA)."""
  final = lambda rs, name: np.nanmean(sweep.final(rs, name))
  lines = [f'Test accuracy, mean over {config.seeds} seeds. Final: the runs\' own numbers '
           f'(`final`) after {steps[-1]} steps. Per epoch: means over the epochs with a warmed '
           'EMA (m^t <= 0.01); "all epochs" uses the bias-corrected EMA, which has no initial '
           'values to warm up.', '',
           '| momentum | m^t at the end | final EMA / corrected / PreciseBN '
           f'{config.precise_bn_examples} | warmed epochs | PreciseBN (all) - EMA | '
           '\\|EMA - PreciseBN\\| | \\|PreciseBN '
           f'{config.precise_bn_examples} - PreciseBN\\| | all epochs: PreciseBN - corrected '
           'EMA |', '|---|---|---|---|---|---|---|---|']
  for m in config.momenta:
    rs, mask, c = runs[m], warm(m, steps), curves[m]
    s, every = summary(c, mask), summary(c, np.ones(len(steps), bool))
    lines.append(
        f'| {m:g} | {m ** steps[-1]:.2g} | {final(rs, "test_accuracy"):.4f} / '
        f'{final(rs, "corrected_test_accuracy"):.4f} / '
        f'{final(rs, "precise_test_accuracy"):.4f} | {int(mask.sum())} of {len(steps)} | '
        f'{np.nanmean(s["gap"]):.4f} | {np.nanmean(s["departure_ema"]):.4f} | '
        f'{np.nanmean(s["departure_subset"]):.4f} | '
        f'{np.nanmean(every["precise"] - every["corrected"]):.4f} |')
  return '\n'.join(lines)


def plot(workdir, config, curves, epochs):
  """epochs.png (test accuracy per epoch) and departure.png (|arm - PreciseBN (all)|)."""
  band = lambda x: (np.nanmean(x, 1), np.nanstd(x, 1))
  first = curves[config.momenta[0]]
  accuracy = {'PreciseBN (all)': band(first['precise'])}
  departures = {f'PreciseBN ({config.precise_bn_examples})':
                band(np.abs(first['subset'] - first['precise']))}
  for m in config.momenta:
    c = curves[m]
    accuracy.update({f'EMA, momentum {m:g}': band(c['ema']),
                     f'bias-corrected EMA, momentum {m:g}': band(c['corrected'])})
    departures[f'EMA, momentum {m:g}'] = band(np.abs(c['ema'] - c['precise']))
  title = f'Wu & Johnson 2021, §3: batch {config.batch_size}'
  report.plot_lines(os.path.join(workdir, 'epochs.png'), epochs, accuracy, xlabel='epoch',
                    ylabel='test accuracy', title=title)
  report.plot_lines(os.path.join(workdir, 'departure.png'), epochs, departures,
                    xlabel='epoch', ylabel='|accuracy - PreciseBN (all) accuracy|',
                    title=title)


def main(config, workdir):
  check(config)
  dataset = sweep.load_data(config)
  study = sweep.Study(config, dataset, workdir, experiment='wu_johnson2021')
  sched = schedule.Schedule(len(dataset.train_labels), config.batch_size, config.epochs,
                            config.max_steps, num_devices=placement.make_runner(config).num_devices)
  steps = save_points(sched, config.save_every)
  runs = dict(zip(config.momenta, study.runs([{'bn_momentum': m, 'save_states_at': steps}
                                              for m in config.momenta])))
  cache = {'shared': 0}
  curves = {m: measure(study, config, m, runs[m], steps, cache) for m in config.momenta}
  optimizers = {'momentum': f'SGD with momentum {config.momentum:g}',
                'nesterov': f'Nesterov SGD ({config.momentum:g})', 'sgd': 'plain SGD'}
  plot(workdir, config, curves, [s / sched.steps_per_epoch for s in steps])
  notes = [
      'Paper: ResNet-50 on ImageNet, EMA vs PreciseBN (10^4 examples) after every epoch at a '
      'normal and a large batch with the linearly scaled rate (Fig. 3); 10^3-10^4 examples '
      'suffice (Fig. 4).',
      f'Ours: {config.data}, {network(config)}, dropout {config.dropout:g}, '
      f'{optimizers.get(config.optimizer, config.optimizer)} at rate {config.learning_rate:g} '
      f'({config.learning_rate * 256 / config.batch_size:g} x batch / 256), batch '
      f'{config.batch_size}, {config.epochs} epochs ({steps[-1]} '
      f'steps), the rate / 10 at epochs {tuple(config.lr_decay_epochs)}; one run per BN '
      'momentum and seed, its state kept after every epoch.',
      'The plots show every epoch; the findings count only those with m^t <= 0.01 (' +
      ', '.join(f'momentum {m:g}: {int(warm(m, steps).sum())} of {len(steps)}'
                for m in config.momenta) + '); with a warmed EMA the bias-corrected curve '
      'lies on the EMA\'s.',
      'PreciseBN: a fixed random subset per seed (or all training examples), in batches of the '
      'training batch size, train-mode statistics' + (
          ' (not augmented, unlike the batches behind the EMA)' if config.augment != 'none'
          else '') + '; evaluated on the test set.',
      'BN\'s momentum does not enter training (train mode normalizes by the batch): the runs '
      f'of the {len(config.momenta)} momenta had the same weights at {cache["shared"]} of '
      f'{len(steps) * config.seeds * (len(config.momenta) - 1)} comparable saved states, whose '
      'PreciseBN numbers were therefore measured once.']
  papers.write_report(workdir, 'Wu & Johnson 2021: PreciseBN vs EMA', config.data,
                      findings(config, runs, curves, steps), notes,
                      ['epochs.png', 'departure.png'], details(config, runs, curves, steps))


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick, 'scale=paper': paper},
          grid_keys=('bn_momentum', 'save_states_at'), workdir='runs/papers/wu_johnson2021')
