r"""The claims made for Batch Normalization, each put to an experiment, with a verdict.

  python experiments/claims.py --workdir=runs/claims \
      --config.data=idx:/usr/share/datasets/fashion-mnist --config.target_val_accuracy=0.85
  python experiments/claims.py --workdir=runs/claims_quick --config.quick=true  # synthetic, small

`--config.claims=lr,init` runs a subset. Each claim compares BN with no BN over `seeds` seeds
(paired by seed) and reduces the comparison to one effect, signed so that the claim predicts a
positive number, with the gates its test needs; the verdicts of all the claims run come together
by the rule in `bn_jax.verdicts.RULE` (Holm-corrected across them).
Writes claims.md (the table) and claims/<claim>.png to the workdir.
"""

import os
import time

import jax
import numpy as np

from bn_jax import checks
from bn_jax import claims
from bn_jax import cli
from bn_jax import health
from bn_jax import host
from bn_jax import ics
from bn_jax import loop
from bn_jax import report
from bn_jax import results
from bn_jax import settings
from bn_jax import sweep
from bn_jax import timing
from bn_jax import verdicts

CLAIMS = ('lr', 'convergence', 'init', 'depth', 'regularization', 'shift', 'overhead',
          'batch_size', 'inference', 'ics')
NORMS = ('batch', 'none')


def get_config():
  config = settings.base_config()
  config.claims = ','.join(CLAIMS)
  config.quick = False  # preset: small everything on synthetic data (tests, smoke runs)
  config.seeds = 5
  config.epochs = 3
  config.evals_per_epoch = 4
  config.target_val_accuracy = 0.97  # MNIST; ~0.85 suits Fashion-MNIST
  config.lrs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  config.init_scales = (0.1, 0.3, 1.0, 3.0, 10.0)
  config.depths = (2, 5, 10, 20)
  config.depth_width = 64  # hidden units of the deep MLPs; channels of the deep CNNs
  config.activations = ('relu', 'sigmoid')
  config.shift_a = (0.5, 1.0, 1.5)  # contrast
  config.shift_b = (-0.2, 0.0, 0.2)  # brightness
  config.momenta = (0.9, 0.99, 0.999)
  # The workdir of a finished experiments/batch_sizes.py run, read for claim 8 (a directory
  # without its results.jsonl is an error); '' reports that claim as 'not run'.
  config.batch_sizes_workdir = ''
  return config


def quick(config):
  """The quick preset: everything small, on synthetic data. Applied before the command-line
  overrides, so `--config.quick=true --config.seeds=5` trains 5 seeds."""
  config.update(data='synthetic:800', seeds=2, epochs=1, evals_per_epoch=2,
                target_val_accuracy=0.5, lrs=(1e-3, 1e-1), init_scales=(0.3, 3.0),
                depths=(3,), depth_width=16, activations=('relu',), shift_a=(0.5, 1.0),
                shift_b=(0.0, 0.2), momenta=(0.9, 0.99), progress=False)


def row(claim, experiment_text, values, unit, details='', gates=()):
  """One claim's finding (`verdicts.finding`): its effect per seed and its gates."""
  return verdicts.finding(claim, values, gates=gates, unit=unit, experiment=experiment_text,
                          details=details)


def warm(runs, statistics='ema'):
  """Gates of trained networks compared in eval mode: BN's running averages warmed, and
  neither arm diverged (`runs`: norm -> records)."""
  return [health.warmed('BN', runs['batch'], statistics)] + [
      health.no_divergence(n, runs[n]) for n in NORMS]


def claim_lr(study, c, out):
  """1 (and 2): learning-rate tolerance; steps to target at the default and best rates."""
  grid = [{'norm': n, 'learning_rate': lr} for n in NORMS for lr in c.lrs]
  runs = dict(zip([(g['norm'], g['learning_rate']) for g in grid], study.runs(grid)))

  acc = {k: np.nan_to_num(sweep.final(rs, 'val_accuracy'), nan=0.0) for k, rs in runs.items()}
  steps = {}  # not reached: counted as one step past the budget
  for k, rs in runs.items():
    reached = [report.to_target(r['curve'], c.target_val_accuracy) for r in rs]
    steps[k] = np.array([t['step'] if t else r['steps'] + 1 for t, r in zip(reached, rs)])
  table = {n: np.stack([acc[n, lr] for lr in c.lrs]) for n in NORMS}  # (rates, seeds)
  logs = np.log10(np.array(c.lrs))[:, None]

  def width(n):  # per seed: decades of rates within 1 point of that seed's best
    good = table[n] >= table[n].max(0) - 0.01
    return np.where(good, logs, -np.inf).max(0) - np.where(good, logs, np.inf).min(0)

  best = {n: np.array(c.lrs)[table[n].argmax(0)] for n in NORMS}
  steps_best = {n: np.array([steps[n, lr][s] for s, lr in enumerate(best[n])]) for n in NORMS}
  default = c.learning_rate if c.learning_rate in c.lrs else c.lrs[0]

  report.plot_lines(os.path.join(out, 'lr.png'), c.lrs, {
      f'norm={n}': ([acc[n, lr].mean() for lr in c.lrs], [acc[n, lr].std() for lr in c.lrs])
      for n in NORMS}, xlabel='learning rate', ylabel='final val accuracy (diverged = 0)',
                    xlog=True)
  rates = ', '.join(f'{lr:g}: {acc["batch", lr].mean():.3f} vs {acc["none", lr].mean():.3f}'
                    for lr in c.lrs)
  return [
      row('BN allows higher learning rates', f'val acc at rates {tuple(c.lrs)}; width of '
          'the rate range within 1 point of the best', width('batch') - width('none'),
          'decades', f'mean val acc BN vs none: {rates}'),
      row(f'BN converges faster (lr {default:g})', f'steps to val acc {c.target_val_accuracy}',
          steps['none', default] - steps['batch', default], 'steps',
          f'BN {steps["batch", default].mean():.0f}, none {steps["none", default].mean():.0f}',
          gates=warm({n: runs[n, default] for n in NORMS})),
      row('BN converges faster (best lr each)', f'steps to val acc {c.target_val_accuracy}',
          steps_best['none'] - steps_best['batch'], 'steps',
          f'best rates BN {sorted({float(r) for r in best["batch"]})}, none '
          f'{sorted({float(r) for r in best["none"]})}',
          gates=warm({n: [runs[n, lr][s] for s, lr in enumerate(best[n])] for n in NORMS})),
  ]


def claim_init(study, c, out):
  """3: sensitivity to the scale of the initial weights."""
  grid = [{'norm': n, 'init_scale': s} for n in NORMS for s in c.init_scales]
  runs = dict(zip([(g['norm'], g['init_scale']) for g in grid], study.runs(grid)))

  acc = {k: sweep.final(rs, 'val_accuracy') for k, rs in runs.items()}
  spread = {n: np.nanmax([acc[n, s] for s in c.init_scales], 0) -
            np.nanmin([acc[n, s] for s in c.init_scales], 0) for n in NORMS}

  report.plot_lines(os.path.join(out, 'init.png'), c.init_scales, {
      f'norm={n}': ([np.nanmean(acc[n, s]) for s in c.init_scales], None) for n in NORMS},
                    xlabel='init scale', ylabel='final val acc', xlog=True)
  return [row('BN makes training less sensitive to initialization',
              f'spread (max-min) of final val acc over init scales {tuple(c.init_scales)}',
              spread['none'] - spread['batch'], 'accuracy',
              f'spread BN {spread["batch"].mean():.3f}, none {spread["none"].mean():.3f}')]


def claim_depth(study, c, out):
  """4: deep MLPs (or CNNs: 3x3 conv blocks, the first two max-pooling): gradient norms per
  layer at init and after training; final accuracy."""
  layers = 'hidden' if c.model == 'mlp' else 'features'
  deepest = max(c.depths)
  grid = [{'norm': n, 'activation': a, 'dropout': 0.0, layers: (c.depth_width,) * d}
          for a in c.activations for n in NORMS for d in c.depths]
  runs = dict(zip([(g['activation'], g['norm'], len(g[layers])) for g in grid],
                  study.runs(grid)))

  x, y = study.dataset.train_images[:256], study.dataset.train_labels[:256]
  acc, spread_init, panels = {}, {}, {}
  for a in c.activations:
    panels[f'{a}, depth {deepest}: gradient norm per layer'] = lines = {}
    for n in NORMS:
      for d in c.depths:
        acc[a, n, d] = sweep.final(runs[a, n, d], 'val_accuracy')
      model = study.model(norm=n, activation=a, dropout=0.0, **{layers: (c.depth_width,) *
                                                                deepest})
      inits = [claims.layer_grad_norms(model.apply, model.init(jax.random.key(s), x[:1],
                                                               train=False), x, y)
               for s in range(c.seeds)]
      trained = [claims.layer_grad_norms(model.apply, study.variables(r), x, y)
                 for r in runs[a, n, deepest]]
      # Vanishing/exploding: decades between the first and the last layer's gradient.
      spread_init[a, n] = np.abs(np.log10([g[0] / g[-1] for g in inits]))
      lines[f'{n}, init'] = (np.mean(inits, 0), '-')
      lines[f'{n}, trained'] = (np.mean(trained, 0), '--')

  report.plot_layer_norms(os.path.join(out, 'depth.png'), panels)
  rows = []
  for a in c.activations:
    rows.append(row(f'BN helps deep nets train ({a})',
                    f'final val acc at depth {deepest} ({c.model}, width {c.depth_width})',
                    acc[a, 'batch', deepest] - acc[a, 'none', deepest], 'accuracy',
                    'val acc by depth, BN / none: ' + ', '.join(
                        f'{d}: {np.nanmean(acc[a, "batch", d]):.3f}/'
                        f'{np.nanmean(acc[a, "none", d]):.3f}' for d in c.depths)))
    rows.append(row(f'BN reduces vanishing/exploding gradients ({a})',
                    f'|log10(grad norm first/last layer)| at init, depth {deepest}',
                    spread_init[a, 'none'] - spread_init[a, 'batch'], 'decades',
                    f'BN {spread_init[a, "batch"].mean():.2f}, none '
                    f'{spread_init[a, "none"].mean():.2f} decades'))
  return rows


def claim_regularization(study, c, out):
  """5: train-val gap (eval mode on both) and test accuracy, dropout 0 vs 0.2."""
  keys = [(n, d) for n in NORMS for d in (0.0, 0.2)]
  runs = dict(zip(keys, study.runs([{'norm': n, 'dropout': d} for n, d in keys])))

  gap = {k: sweep.final(rs, 'train_eval_accuracy') - sweep.final(rs, 'val_accuracy')
         for k, rs in runs.items()}
  test = {k: sweep.final(rs, 'test_accuracy') for k, rs in runs.items()}

  report.plot_bars(os.path.join(out, 'regularization.png'),
                   [f'{n}, dropout {d}' for n, d in keys], [np.nanmean(gap[k]) for k in keys],
                   [np.nanstd(gap[k]) for k in keys], ylabel='train - val accuracy')
  return [row('BN regularizes (dropout 0)', 'train-val accuracy gap, both in eval mode',
              gap['none', 0.0] - gap['batch', 0.0], 'accuracy',
              'test acc: ' + ', '.join(f'{n}/dropout {d}: {np.nanmean(test[n, d]):.3f}'
                                       for n, d in keys),
              gates=warm({n: runs[n, 0.0] for n in NORMS}))]


def claim_shift(study, c, out):
  """6: test accuracy under x*a + b: no BN, BN with running averages, BN re-estimated."""
  runs = dict(zip(NORMS, study.runs([{'norm': n} for n in NORMS])))

  x, y = study.dataset.test_images, study.dataset.test_labels
  shifts = [(a, b) for a in c.shift_a for b in c.shift_b if (a, b) != (1.0, 0.0)]
  models = {n: study.model(norm=n) for n in NORMS}
  drops = {k: [] for k in ('none', 'running', 're-estimated')}
  for s in range(c.seeds):
    variables = {n: study.variables(runs[n][s]) for n in NORMS}
    acc = {}
    for a, b in [(1.0, 0.0)] + shifts:
      xs = claims.shift(x, a, b)
      acc['none', a, b] = claims.accuracy(models['none'], variables['none'], xs, y)
      acc['running', a, b] = claims.accuracy(models['batch'], variables['batch'], xs, y)
      reestimated = {**variables['batch'], 'batch_stats': claims.full_pass_batch_stats(
          models['batch'], variables['batch'], xs)}
      acc['re-estimated', a, b] = claims.accuracy(models['batch'], reestimated, xs, y)
    for k in drops:  # mean accuracy lost to the shifts
      drops[k].append(np.mean([acc[k, 1.0, 0.0] - acc[k, a, b] for a, b in shifts]))
  drops = {k: np.array(v) for k, v in drops.items()}

  report.plot_bars(os.path.join(out, 'shift.png'),
                   ['no BN', 'BN, running avgs', 'BN, re-estimated on shifted'],
                   [drops[k].mean() for k in drops], [drops[k].std() for k in drops],
                   ylabel=f'mean accuracy drop over {len(shifts)} shifts')
  return [
      row('BN makes the net robust to input shifts', f'mean test-accuracy drop under x*a+b, '
          f'a in {tuple(c.shift_a)}, b in {tuple(c.shift_b)} (no BN minus BN with running '
          'averages)', drops['none'] - drops['running'], 'accuracy',
          f'drop: none {drops["none"].mean():.3f}, BN {drops["running"].mean():.3f}',
          gates=warm(runs)),
      row('Re-estimating BN statistics on shifted data is a remedy', 'same drop, BN with '
          'running averages minus BN with statistics re-estimated on the shifted test set '
          '(uses test inputs, not labels)', drops['running'] - drops['re-estimated'],
          'accuracy', f'drop re-estimated {drops["re-estimated"].mean():.3f}',
          gates=warm(runs)),
  ]


def claim_ics(study, c, out, examples=256):
  """10: BN reduces internal covariate shift, the explanation the original study gave, by
  Santurkar et al. 2018's measure (`bn_jax.ics`): on a fixed training batch, the cosine
  between a layer's weight gradient before and after the layers before it take their step
  (the optimizer's first step), mean over the layers after the first, on the final weights."""
  runs = dict(zip(NORMS, study.runs([{'norm': n} for n in NORMS])))
  images = study.dataset.images('train', np.arange(examples))
  labels = study.dataset.train_labels[:examples]
  cosine = {}
  for n in NORMS:
    cfg = settings.resolve(c, norm=n)
    sched = loop.Schedule(len(study.dataset.train_labels), cfg.batch_size, cfg.epochs)
    update = ics.first_step(settings.make_optimizer(cfg, sched.steps_per_epoch,
                                                    sched.total_steps))
    model = study.model(norm=n)
    cosine[n] = np.array([np.mean([cos for _, _, cos in ics.internal_covariate_shift(
        ics.train_loss(model, study.variables(r), images, labels, jax.random.key(0)),
        study.variables(r)['params'], update)[1:]]) for r in runs[n]])

  report.plot_bars(os.path.join(out, 'ics.png'), list(NORMS),
                   [cosine[n].mean() for n in NORMS], [cosine[n].std() for n in NORMS],
                   ylabel='gradient cosine before / after earlier layers step')
  return [row('BN reduces internal covariate shift', 'cosine of each layer\'s gradient before '
              'and after the layers before it step (Santurkar et al. 2018), final weights',
              cosine['batch'] - cosine['none'], 'cosine',
              f'BN {cosine["batch"].mean():.4f}, none {cosine["none"].mean():.4f}',
              gates=[health.no_divergence(n, runs[n]) for n in NORMS])]


def claim_overhead(study, c, out, repeats=5, steps=200):
  """7: time per train step and per eval step, and memory of params + state (measured anew
  on every call: a timing, not a training run)."""
  data = host.DeviceData.put(study.dataset)
  # BN and no BN timed in turn within each repeat: each ratio compares times seconds apart.
  times = timing.step_times({n: study.model(norm=n) for n in NORMS}, data, c.batch_size, steps,
                            repeats)

  ratio = np.array(times['batch']['train']) / np.array(times['none']['train'])
  eval_ratio = np.array(times['batch']['eval']) / np.array(times['none']['eval'])

  report.plot_bars(os.path.join(out, 'overhead.png'),
                   ['train BN', 'train none', 'eval BN', 'eval none'],
                   [np.mean(times[n][k]) * 1e6 for k in ('train', 'eval') for n in NORMS],
                   ylabel='µs per step')
  return [row('BN costs only a small overhead (< 25% per train step)',
              f'train-step time ratio BN / no BN at batch {c.batch_size} ({repeats} repeats '
              f'of {steps} steps; effect = 1.25 - ratio)', 1.25 - ratio, 'ratio',
              f'train ratio {ratio.mean():.2f}, eval ratio {eval_ratio.mean():.2f}; memory '
              f'params+state BN {times["batch"]["state_bytes"] / 1e6:.2f} MB, none '
              f'{times["none"]["state_bytes"] / 1e6:.2f} MB')]


def claim_batch_size(study, c, out):
  """8: read from the batch-size study (not redone)."""
  del study, out
  path = os.path.join(c.batch_sizes_workdir, 'results.jsonl')
  if not c.batch_sizes_workdir or not os.path.exists(path):
    return [{**row('BN suffers at small batch sizes', 'experiments/batch_sizes.py (pass '
                   '--config.batch_sizes_workdir)', [], ''), 'not_run': True}]
  records = [r for r in results.read_records(path) if r['status'] == 'ok']
  sizes = sorted({r['batch_size'] for r in records})
  acc = {(r['norm'], r['batch_size'], r['seed']): r['final']['test_accuracy'] for r in records}
  seeds = sorted({r['seed'] for r in records})
  # BN's deficit at the smallest batch minus its deficit at the largest, per seed.
  deficit = lambda b: np.array([acc['none', b, s] - acc['batch', b, s] for s in seeds])
  return [row('BN suffers at small batch sizes', f'{c.batch_sizes_workdir}: (none - BN) test '
              f'acc at batch {sizes[0]} minus at batch {sizes[-1]}',
              deficit(sizes[0]) - deficit(sizes[-1]), 'accuracy',
              f'sizes {sizes}; see the batch-size study (and bn_stats=ghost there)')]


def claim_inference(study, c, out):
  """9: eval mode (running averages) vs batch statistics in the first epochs, per momentum;
  and the running averages recomputed over the training set after training."""
  steps = study.steps_per_epoch(norm='batch')
  ends = tuple(e * steps for e in range(1, c.epochs + 1))  # each run keeps every epoch's end
  by_momentum = dict(zip(c.momenta, study.runs([
      {'norm': 'batch', 'bn_momentum': m, 'save_states_at': ends} for m in c.momenta])))
  keys = [(m, e) for m in c.momenta for e in range(1, c.epochs + 1)]

  x, y, train_x = study.dataset.val_images, study.dataset.val_labels, study.dataset.train_images
  curves = {}  # (momentum, epoch) -> (seeds, [running, batch statistics, recomputed])
  for m, e in keys:
    model, per_seed = study.model(norm='batch', bn_momentum=m), []
    for r in by_momentum[m]:
      v = study.variables(r, step=e * steps)
      recomputed = np.nan  # after the last epoch only
      if e == c.epochs:
        recomputed = claims.accuracy(model, {**v, 'batch_stats': claims.full_pass_batch_stats(
            model, v, train_x)}, x, y)
      per_seed.append((claims.accuracy(model, v, x, y),
                       claims.accuracy(model, v, x, y, batch_statistics=c.batch_size),
                       recomputed))
    curves[m, e] = np.array(per_seed)
  worst = max(c.momenta)
  first, last = curves[worst, 1], curves[worst, c.epochs]

  epochs = range(1, c.epochs + 1)
  report.plot_lines(os.path.join(out, 'inference.png'), list(epochs), {
      f'momentum {m}, {name}': ([curves[m, e][:, i].mean() for e in epochs], None)
      for m in c.momenta for i, name in ((0, 'running averages'), (1, 'batch statistics'))},
                    xlabel='epoch', ylabel='val accuracy')
  return [
      row(f'BN needs care at inference (momentum {worst}, epoch 1)',
          'val acc with batch statistics minus with running averages',
          first[:, 1] - first[:, 0], 'accuracy', ', '.join(
              f'm={m}: {curves[m, 1][:, 0].mean():.3f} running vs '
              f'{curves[m, 1][:, 1].mean():.3f} batch' for m in c.momenta),
          gates=[health.no_divergence('BN', by_momentum[worst])]),
      row(f'Recomputing the averages after training helps (momentum {worst})',
          f'val acc after {c.epochs} epochs, averages recomputed over the training '
          'set minus running averages', last[:, 2] - last[:, 0], 'accuracy',
          gates=[health.no_divergence('BN', by_momentum[worst])]),
  ]


RUNNERS = {'lr': claim_lr, 'init': claim_init, 'depth': claim_depth,
           'regularization': claim_regularization, 'shift': claim_shift,
           'overhead': claim_overhead, 'batch_size': claim_batch_size,
           'inference': claim_inference, 'ics': claim_ics}


def main(config, workdir):
  checks.check_workdir(workdir)  # claims 7 and 8 write without a sweep
  selected = [name.strip() for name in config.claims.split(',') if name.strip()]
  unknown = set(selected) - set(CLAIMS)
  if unknown or not selected:
    raise settings.ConfigError(
        f'unknown claims {sorted(unknown)}: choose from {CLAIMS}.' if unknown else
        f'no claims selected: --config.claims=NAME,... from {CLAIMS}.')
  t0 = time.perf_counter()
  study = sweep.Study(config, sweep.load_data(config), workdir)
  out = os.path.join(workdir, 'claims')
  rows = []
  for name in dict.fromkeys('lr' if n == 'convergence' else n for n in selected):
    new = RUNNERS[name](study, config, out)  # 'lr' also measures claim 2, convergence
    rows += new
    print(f'{name}: ' + '; '.join(f"{r['finding']}: {r['mean']:.4g} {r['unit']}" for r in new),
          flush=True)  # verdicts come once every claim is in (one family)
    text = claims.table(rows, config, time.perf_counter() - t0)  # rewritten after every claim
    results.atomic_write(os.path.join(workdir, 'claims.md'), text)
  print(text)


if __name__ == '__main__':
  cli.run(main, get_config, presets={'quick': quick}, grid_keys=('norm',),  # BN vs none
          workdir='runs/claims')
