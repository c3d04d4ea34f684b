r"""Batch-size study: BN vs no BN across batch sizes, over several seeds.

  python experiments/batch_sizes.py --workdir=runs/batch_sizes \
      --config.data=idx:/usr/share/datasets/fashion-mnist --config.target_val_accuracy=0.85

The original study trained once per batch size and read single numbers; here every batch size
runs over `seeds` seeds (trained together in one program), with optional learning-rate scaling,
a budget in epochs or steps, and ghost BN (`--config.bn_stats=ghost --config.bn_group_size=G`)
to separate the BN statistics batch from the optimization batch. Writes results.jsonl,
summary.md, accuracy_vs_batch_size.png and curves.png to the workdir. Runs already in the
workdir's results.jsonl are re-used: adding a batch size or seeds trains only the new runs.
"""

import os

from bn_jax import cli
from bn_jax import report
from bn_jax import results
from bn_jax import settings
from bn_jax import sweep


def get_config():
  config = settings.base_config()
  config.norms = ('batch', 'none')
  config.batch_sizes = (16, 32, 64, 128, 256)  # also try tiny 2, 4, 8 and large 512, 1024
  config.seeds = 5
  config.epochs = 5  # the budget; or set max_steps for a budget in steps
  config.learning_rate = 1e-3  # at base_batch_size
  config.lr_scaling = 'none'  # none (the original study) | linear | sqrt
  config.base_batch_size = 32
  config.evals_per_epoch = 4  # finer steps-to-target
  config.target_val_accuracy = 0.97  # MNIST; ~0.85 suits Fashion-MNIST
  return config


def main(config, workdir):
  dataset = sweep.load_data(config)

  grid = [{'norm': norm, 'batch_size': size,
           'learning_rate': settings.scaled_learning_rate(
               config.learning_rate, size, config.base_batch_size, config.lr_scaling)}
          for norm in config.norms for size in config.batch_sizes]
  records = sweep.sweep(config, dataset, grid, experiment='batch_sizes', workdir=workdir)

  target = config.target_val_accuracy
  columns = (
      ('lr*', lambda rs: f"{rs[0]['learning_rate']:g}" if rs else '—'),
      ('val acc', report.final('val_accuracy')),
      ('test acc', report.final('test_accuracy')),
      # Generalization gap, both in eval mode: training set minus validation set accuracy.
      ('train−val gap', lambda r: r['final']['train_eval_accuracy'] - r['final']['val_accuracy']),
      (f'steps to {target:g} val acc*', lambda rs: _steps_to_target(rs, target)),
      ('wall s*', lambda rs: f"{rs[0]['wall_seconds']:.1f}" if rs else '—'),
  )
  records.sort(key=lambda r: (r['batch_size'], r['norm']))  # BN and no BN side by side
  table = report.summary_table(records, keys=('batch_size', 'norm'), columns=columns)
  results.atomic_write(os.path.join(workdir, 'summary.md'), (
      f'# Batch sizes: {config.model}, {config.data}, {config.epochs} epochs, {config.seeds} '
      f'seeds, lr scaling {config.lr_scaling}, bn_stats {config.bn_stats} (mean ± std over '
      f'seeds; wall s: per configuration, its seeds trained together)\n\n{table}'))
  report.plot_accuracy_vs_batch_size(records, os.path.join(workdir,
                                                           'accuracy_vs_batch_size.png'))
  report.plot_val_curves(records, os.path.join(workdir, 'curves.png'))
  if results.is_writer():
    print(table)
    print(f'wrote results.jsonl, summary.md, accuracy_vs_batch_size.png and curves.png '
          f'in {workdir}')


def _steps_to_target(runs, target):
  """'mean ± std (k/n reached)' of the steps to the target over the runs that reached it."""
  points = [report.to_target(r['curve'], target) for r in runs]
  reached = [p['step'] for p in points if p]
  return f'{report.mean_std(reached, digits=0)} ({len(reached)}/{len(runs)})'


if __name__ == '__main__':
  cli.run(main, get_config, grid_keys=('norm', 'batch_size'), workdir='runs/batch_sizes')
