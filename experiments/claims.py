r"""The claims made for Batch Normalization, each put to an experiment, with a verdict.

  python experiments/claims.py --workdir=runs/claims \
      --config.data=idx:/usr/share/datasets/fashion-mnist --config.target_val_accuracy=0.85
  python experiments/claims.py --workdir=runs/claims_quick --config.quick=true  # synthetic, small

`--config.claims=lr,init` runs a subset. Each claim compares BN with no BN over `seeds` seeds
(paired by seed) and reduces the comparison to one effect, signed so that the claim predicts a
positive number; the verdict comes from its 95% interval by the rule in `bn_jax.claims.RULE`.
Writes claims.md (the table) and claims/<claim>.png to the workdir.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import matplotlib.pyplot as plt
from ml_collections import config_flags
import numpy as np

from bn_jax import claims
from bn_jax import experiment
from bn_jax import report
from bn_jax import results
from bn_jax import train

CLAIMS = ('lr', 'convergence', 'init', 'depth', 'regularization', 'shift', 'overhead',
          'batch_size', 'inference')


def get_config():
  config = experiment.base_config()
  config.claims = ','.join(CLAIMS)
  config.quick = False  # small everything on synthetic data, for tests and smoke runs
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
  config.batch_sizes_workdir = ''  # results of experiments/batch_sizes.py, for claim 8
  return config


FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_dict('config', get_config())
flags.DEFINE_string('workdir', 'runs/claims', 'Directory for claims.md and plots.')


def quick(config):
  """Everything small, on synthetic data (tests, smoke runs)."""
  config.update(data='synthetic:800', seeds=2, epochs=1, evals_per_epoch=2,
                target_val_accuracy=0.5, lrs=(1e-3, 1e-1), init_scales=(0.3, 3.0),
                depths=(2, 3), depth_width=16, activations=('relu',), shift_a=(0.5, 1.0),
                shift_b=(0.0, 0.2), momenta=(0.9, 0.99), progress=False)


def row(claim, experiment_text, values, unit, details=''):
  mean, interval = claims.effect(values)
  return {'claim': claim, 'experiment': experiment_text, 'mean': mean, 'interval': interval,
          'unit': unit, 'verdict': claims.verdict(interval), 'details': details}


def plot(path, draw):
  fig, ax = plt.subplots(figsize=(6.5, 4))
  draw(ax)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  report.save_figure(fig, path)


def claim_lr(study, c, out):
  """1 (and 2): learning-rate tolerance; steps to target at the default and best rates."""
  acc, steps = {}, {}
  for norm in ('batch', 'none'):
    for lr in c.lrs:
      _, runs, _ = study.fit(norm=norm, learning_rate=lr)
      acc[norm, lr] = np.array([r['final']['val_accuracy'] if r['status'] == 'ok' else 0.0
                                for r in runs])
      budget = runs[0]['steps'] + 1  # not reached: counted as one step past the budget
      reached = [experiment.to_target(r['curve'], c.target_val_accuracy) for r in runs]
      steps[norm, lr] = np.array([t['step'] if t else budget for t in reached])

  def width(norm):  # per seed: decades of rates within 1 point of that seed's best
    table = np.stack([acc[norm, lr] for lr in c.lrs])  # (rates, seeds)
    good = table >= table.max(0) - 0.01
    logs = np.log10(np.array(c.lrs))[:, None]
    return np.where(good, logs, np.inf).min(0) * -1 + np.where(good, logs, -np.inf).max(0)

  plot(os.path.join(out, 'lr.png'), lambda ax: [ax.errorbar(
      c.lrs, [acc[n, lr].mean() for lr in c.lrs], [acc[n, lr].std() for lr in c.lrs],
      marker='o', capsize=3, label=f'norm={n}') for n in ('batch', 'none')] and (
          ax.set_xscale('log'), ax.set_xlabel('learning rate'),
          ax.set_ylabel('final val accuracy (diverged = 0)')))
  best = {n: np.array(c.lrs)[np.stack([acc[n, lr] for lr in c.lrs]).argmax(0)]
          for n in ('batch', 'none')}
  steps_best = {n: np.array([steps[n, lr][s] for s, lr in enumerate(best[n])])
                for n in ('batch', 'none')}
  default = c.learning_rate if c.learning_rate in c.lrs else c.lrs[0]
  rates = ', '.join(f'{lr:g}: {acc["batch", lr].mean():.3f} vs {acc["none", lr].mean():.3f}'
                    for lr in c.lrs)
  return [
      row('BN allows higher learning rates', f'val acc at rates {tuple(c.lrs)}; width of '
          'the rate range within 1 point of the best', width('batch') - width('none'),
          'decades', f'mean val acc BN vs none: {rates}'),
      row(f'BN converges faster (lr {default:g})', f'steps to val acc {c.target_val_accuracy}',
          steps['none', default] - steps['batch', default], 'steps',
          f'BN {steps["batch", default].mean():.0f}, none {steps["none", default].mean():.0f}'),
      row('BN converges faster (best lr each)', f'steps to val acc {c.target_val_accuracy}',
          steps_best['none'] - steps_best['batch'], 'steps',
          f'best rates BN {sorted({float(r) for r in best["batch"]})}, none '
          f'{sorted({float(r) for r in best["none"]})}'),
  ]


def claim_init(study, c, out):
  """3: sensitivity to the scale of the initial weights."""
  acc = {(n, s): study.final('val_accuracy', norm=n, init_scale=s)
         for n in ('batch', 'none') for s in c.init_scales}
  spread = {n: np.nanmax([acc[n, s] for s in c.init_scales], 0) -
            np.nanmin([acc[n, s] for s in c.init_scales], 0) for n in ('batch', 'none')}
  plot(os.path.join(out, 'init.png'), lambda ax: [ax.plot(
      c.init_scales, [np.nanmean(acc[n, s]) for s in c.init_scales], marker='o',
      label=f'norm={n}') for n in ('batch', 'none')] and (
          ax.set_xscale('log'), ax.set_xlabel('init scale'), ax.set_ylabel('final val acc')))
  return [row('BN makes training less sensitive to initialization',
              f'spread (max-min) of final val acc over init scales {tuple(c.init_scales)}',
              spread['none'] - spread['batch'], 'accuracy',
              f'spread BN {spread["batch"].mean():.3f}, none {spread["none"].mean():.3f}')]


def claim_depth(study, c, out):
  """4: deep MLPs (or CNNs: 3x3 conv blocks, the first two max-pooling): gradient norms per
  layer at init and after training; final accuracy."""
  rows, deepest = [], max(c.depths)
  batch = (study.dataset.train_images[:256], study.dataset.train_labels[:256])
  fig, axes = plt.subplots(1, len(c.activations), figsize=(6 * len(c.activations), 4),
                           squeeze=False)
  for ax, act in zip(axes[0], c.activations):
    acc, spread_init = {}, {}
    for norm in ('batch', 'none'):
      for depth in c.depths:
        layers = {'hidden' if c.model == 'mlp' else 'features': (c.depth_width,) * depth}
        model, runs, states = study.fit(norm=norm, activation=act, dropout=0.0, **layers)
        acc[norm, depth] = np.array([r['final']['val_accuracy'] for r in runs])
        if depth == deepest:
          inits = [claims.layer_grad_norms(model.apply, model.init(
              jax.random.key(s), batch[0][:1], train=False), *batch) for s in range(c.seeds)]
          trained = [claims.layer_grad_norms(model.apply, claims.seed_variables(states, s), *batch)
                     for s in range(c.seeds)]
          # Vanishing/exploding: decades between the first and the last layer's gradient.
          spread_init[norm] = np.abs(np.log10([g[0] / g[-1] for g in inits]))
          ax.semilogy(np.mean(inits, 0), marker='o', label=f'{norm}, init')
          ax.semilogy(np.mean(trained, 0), ls='--', label=f'{norm}, trained')
    ax.set_title(f'{act}, depth {deepest}: gradient norm per layer')
    ax.set_xlabel('layer (input first)')
    ax.legend(fontsize=8)
    rows.append(row(f'BN helps deep nets train ({act})',
                    f'final val acc at depth {deepest} ({c.model}, width {c.depth_width})',
                    acc['batch', deepest] - acc['none', deepest], 'accuracy',
                    'val acc by depth, BN / none: ' + ', '.join(
                        f'{d}: {acc["batch", d].mean():.3f}/{acc["none", d].mean():.3f}'
                        for d in c.depths)))
    rows.append(row(f'BN reduces vanishing/exploding gradients ({act})',
                    f'|log10(grad norm first/last layer)| at init, depth {deepest}',
                    spread_init['none'] - spread_init['batch'], 'decades',
                    f'BN {spread_init["batch"].mean():.2f}, none '
                    f'{spread_init["none"].mean():.2f} decades'))
  report.save_figure(fig, os.path.join(out, 'depth.png'))
  return rows


def claim_regularization(study, c, out):
  """5: train-val gap (eval mode on both) and test accuracy, dropout 0 vs 0.2."""
  gap, test = {}, {}
  for norm in ('batch', 'none'):
    for dropout in (0.0, 0.2):
      _, runs, _ = study.fit(norm=norm, dropout=dropout)
      gap[norm, dropout] = np.array([r['final']['train_eval_accuracy'] -
                                     r['final']['val_accuracy'] for r in runs])
      test[norm, dropout] = np.array([r['final']['test_accuracy'] for r in runs])
  keys = list(gap)
  plot(os.path.join(out, 'regularization.png'), lambda ax: (
      ax.bar(range(4), [gap[k].mean() for k in keys], yerr=[gap[k].std() for k in keys],
             label='train - val accuracy'),
      ax.set_xticks(range(4), [f'{n}, dropout {d}' for n, d in keys])))
  return [row('BN regularizes (dropout 0)', 'train-val accuracy gap, both in eval mode',
              gap['none', 0.0] - gap['batch', 0.0], 'accuracy',
              'test acc: ' + ', '.join(f'{n}/dropout {d}: {test[n, d].mean():.3f}'
                                       for n, d in keys))]


def claim_shift(study, c, out):
  """6: test accuracy under x*a + b: no BN, BN with running averages, BN re-estimated."""
  x, y = study.dataset.test_images, study.dataset.test_labels
  trained = {n: study.fit(norm=n) for n in ('batch', 'none')}
  drops = {k: [] for k in ('none', 'running', 're-estimated')}
  shifts = [(a, b) for a in c.shift_a for b in c.shift_b if (a, b) != (1.0, 0.0)]
  for s in range(c.seeds):
    acc = {}
    for (a, b) in [(1.0, 0.0)] + shifts:
      xs = claims.shift(x, a, b)
      for name, norm in (('none', 'none'), ('running', 'batch')):
        model, _, states = trained[norm]
        acc[name, a, b] = claims.accuracy(model, claims.seed_variables(states, s), xs, y)
      model, _, states = trained['batch']
      variables = claims.seed_variables(states, s)
      variables['batch_stats'] = claims.full_pass_batch_stats(model, variables, xs)
      acc['re-estimated', a, b] = claims.accuracy(model, variables, xs, y)
    for k in drops:  # mean accuracy lost to the shifts
      drops[k].append(np.mean([acc[k, 1.0, 0.0] - acc[k, a, b] for a, b in shifts]))
  drops = {k: np.array(v) for k, v in drops.items()}
  plot(os.path.join(out, 'shift.png'), lambda ax: (
      ax.bar(range(3), [drops[k].mean() for k in drops], yerr=[drops[k].std() for k in drops],
             label=f'mean accuracy drop over {len(shifts)} shifts'),
      ax.set_xticks(range(3), ['no BN', 'BN, running avgs', 'BN, re-estimated on shifted'])))
  return [
      row('BN makes the net robust to input shifts', f'mean test-accuracy drop under x*a+b, '
          f'a in {tuple(c.shift_a)}, b in {tuple(c.shift_b)} (no BN minus BN with running '
          'averages)', drops['none'] - drops['running'], 'accuracy',
          f'drop: none {drops["none"].mean():.3f}, BN {drops["running"].mean():.3f}'),
      row('Re-estimating BN statistics on shifted data is a remedy', 'same drop, BN with '
          'running averages minus BN with statistics re-estimated on the shifted test set '
          '(uses test inputs, not labels)', drops['running'] - drops['re-estimated'],
          'accuracy', f'drop re-estimated {drops["re-estimated"].mean():.3f}'),
  ]


def claim_overhead(study, c, out, repeats=5, steps=200):
  """7: time per train step and per eval step, and memory of params + state, in one run."""
  times = {}
  for norm in ('batch', 'none'):
    model = experiment.make_model(c, norm=norm)
    states = train.init_states(model, jax.random.split(jax.random.key(0), 1), 1e-3,
                               (1,) + study.data.image_shape)
    order = np.stack([train.epoch_order(0, 0, num_examples=study.data.size('train'),
                                        batch_size=c.batch_size, num_rows=steps)])
    rngs = jax.random.split(jax.random.key(1), 1)
    rows = np.arange(steps * c.batch_size).reshape(steps, c.batch_size) % study.data.size(
        'train')
    train_fn = lambda st: train.train_chunks(st, study.data.arrays, order, rngs, 0, steps,
                                             steps)
    eval_fn = lambda st: train.evaluate_seeds(st, study.data.arrays, rows)
    states, _ = train_fn(states)
    jax.block_until_ready(eval_fn(states))
    memory = sum(x.nbytes for x in jax.tree.leaves((states.params, states.batch_stats,
                                                    states.opt_state)))
    times[norm] = {'train': [], 'eval': [], 'memory': memory}
    for _ in range(repeats):
      t0 = time.perf_counter()
      states, sums = train_fn(states)
      jax.block_until_ready(sums)
      times[norm]['train'].append((time.perf_counter() - t0) / steps)
      t0 = time.perf_counter()
      jax.block_until_ready(eval_fn(states))
      times[norm]['eval'].append((time.perf_counter() - t0) / steps)
  ratio = np.array(times['batch']['train']) / np.array(times['none']['train'])
  eval_ratio = np.array(times['batch']['eval']) / np.array(times['none']['eval'])
  plot(os.path.join(out, 'overhead.png'), lambda ax: (
      ax.bar(range(4), [np.mean(times[n][k]) * 1e6 for k in ('train', 'eval')
                        for n in ('batch', 'none')], label='µs per step'),
      ax.set_xticks(range(4), ['train BN', 'train none', 'eval BN', 'eval none'])))
  return [row('BN costs only a small overhead (< 25% per train step)',
              f'train-step time ratio BN / no BN at batch {c.batch_size} ({repeats} repeats '
              f'of {steps} steps; effect = 1.25 - ratio)', 1.25 - ratio, 'ratio',
              f'train ratio {ratio.mean():.2f}, eval ratio {eval_ratio.mean():.2f}; memory '
              f'params+state BN {times["batch"]["memory"] / 1e6:.2f} MB, none '
              f'{times["none"]["memory"] / 1e6:.2f} MB')]


def claim_batch_size(study, c, out):
  """8: read from the batch-size study (not redone)."""
  del study, out
  path = os.path.join(c.batch_sizes_workdir, 'results.jsonl')
  if not c.batch_sizes_workdir or not os.path.exists(path):
    return [{'claim': 'BN depends on batch size', 'experiment': 'experiments/batch_sizes.py '
             '(pass --config.batch_sizes_workdir)', 'mean': np.nan, 'interval': (np.nan,) * 2,
             'unit': '', 'verdict': 'not run', 'details': ''}]
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
  x, y = study.dataset.val_images, study.dataset.val_labels
  steps = -(-len(study.dataset.train_labels) // c.batch_size)
  curves, rows = {}, []
  for m in c.momenta:
    for epochs in range(1, c.epochs + 1):  # the same run, stopped after each epoch
      model, _, states = study.fit(norm='batch', bn_momentum=m, max_steps=epochs * steps)
      per_seed = []
      for s in range(c.seeds):
        v = claims.seed_variables(states, s)
        recomputed = np.nan  # after the last epoch only
        if epochs == c.epochs:
          recomputed = claims.accuracy(model, {**v, 'batch_stats': claims.full_pass_batch_stats(
              model, v, study.dataset.train_images)}, x, y)
        per_seed.append((claims.accuracy(model, v, x, y),
                         claims.accuracy(model, v, x, y, batch_statistics=c.batch_size),
                         recomputed))
      curves[m, epochs] = np.array(per_seed)  # (seeds, [running, batch stats, recomputed])
  worst = max(c.momenta)
  plot(os.path.join(out, 'inference.png'), lambda ax: [ax.plot(
      range(1, c.epochs + 1), [curves[m, e][:, i].mean() for e in range(1, c.epochs + 1)],
      marker='o', ls=ls, label=f'momentum {m}, {name}') for m in c.momenta
      for i, name, ls in ((0, 'running averages', '-'), (1, 'batch statistics', ':'))] and (
          ax.set_xlabel('epoch'), ax.set_ylabel('val accuracy')))
  first, last = curves[worst, 1], curves[worst, c.epochs]
  rows.append(row(f'BN needs care at inference (momentum {worst}, epoch 1)',
                  'val acc with batch statistics minus with running averages',
                  first[:, 1] - first[:, 0], 'accuracy', ', '.join(
                      f'm={m}: {curves[m, 1][:, 0].mean():.3f} running vs '
                      f'{curves[m, 1][:, 1].mean():.3f} batch' for m in c.momenta)))
  rows.append(row(f'Recomputing the averages after training helps (momentum {worst})',
                  f'val acc after {c.epochs} epochs, averages recomputed over the training '
                  'set minus running averages', last[:, 2] - last[:, 0], 'accuracy'))
  return rows


RUNNERS = {'lr': claim_lr, 'init': claim_init, 'depth': claim_depth,
           'regularization': claim_regularization, 'shift': claim_shift,
           'overhead': claim_overhead, 'batch_size': claim_batch_size,
           'inference': claim_inference}


def markdown(rows, config, seconds):
  lines = [f'# Claims for BN: {config.model} on {config.data}, {config.seeds} seeds, '
           f'{config.epochs} epochs, batch {config.batch_size}, lr {config.learning_rate:g}',
           '', f'Verdict rule: {claims.RULE}.', '',
           '| claim | experiment | effect (mean [95% CI]) | verdict | details |',
           '|---|---|---|---|---|']
  for r in rows:
    low, high = r['interval']
    lines.append(f'| {r["claim"]} | {r["experiment"]} | {r["mean"]:.4g} [{low:.4g}, '
                 f'{high:.4g}] {r["unit"]} | {r["verdict"]} | {r["details"]} |')
  shape = ({'mlp': f'The MLP has hidden layers {tuple(config.hidden)}: one layer is a weak '
            'test of claims about depth and optimization, which is why claim 4 uses deeper '
            'MLPs.', 'cnn': f'The CNN has 3x3 conv blocks of {tuple(config.features)} channels; '
            'claim 4 stacks more of them.'}[config.model])
  if config.train_examples:
    shape += f' Trained on a subset of {config.train_examples} training examples.'
  lines += ['', f'{shape} Wall time: {seconds:.0f} s.', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config.quick:
    quick(config)
  selected = [name.strip() for name in config.claims.split(',') if name.strip()]
  unknown = set(selected) - set(CLAIMS)
  if unknown or not selected:
    raise app.UsageError(f'unknown claims {sorted(unknown)}: choose from {CLAIMS}.' if unknown
                         else f'no claims selected: --config.claims=NAME,... from {CLAIMS}.')
  t0 = time.perf_counter()
  study = claims.Study(config, experiment.load_data(config))
  out = os.path.join(FLAGS.workdir, 'claims')
  os.makedirs(out, exist_ok=True)
  rows = []
  for name in dict.fromkeys('lr' if n == 'convergence' else n for n in selected):
    new = RUNNERS[name](study, config, out)  # 'lr' also measures claim 2, convergence
    rows += new
    print(f'{name}: ' + '; '.join(r['verdict'] for r in new), flush=True)
    text = markdown(rows, config, time.perf_counter() - t0)  # rewritten after every claim
    results.atomic_write(os.path.join(FLAGS.workdir, 'claims.md'), text)
  print(text)


if __name__ == '__main__':
  app.run(main)
