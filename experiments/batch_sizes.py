r"""Batch-size study: BN vs no BN across batch sizes, over several seeds.

  python experiments/batch_sizes.py --workdir=runs/batch_sizes \
      --config.data=idx:/usr/share/datasets/fashion-mnist --config.target_val_accuracy=0.85

The original study trained once per batch size and read single numbers; here every batch size
runs over `seeds` seeds (trained together in one program), with optional learning-rate scaling,
a budget in epochs or steps, and ghost BN (`--config.bn_stats=ghost --config.bn_group_size=G`)
to separate the BN statistics batch from the optimization batch. Writes results.jsonl,
summary.md, accuracy_vs_batch_size.png and curves.png to the workdir.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bn_jax import experiment
from bn_jax import report
from bn_jax import results


def get_config():
  config = experiment.base_config()
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


FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_dict('config', get_config())
flags.DEFINE_string('workdir', 'runs/batch_sizes', 'Directory for results and plots.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # JAX's INFO lines (e.g. 'no TPU found') are noise here
  config = _CONFIG.value
  dataset = experiment.load_data(config)

  grid = [{'norm': norm, 'batch_size': size,
           'learning_rate': experiment.scaled_learning_rate(
               config.learning_rate, size, config.base_batch_size, config.lr_scaling)}
          for norm in config.norms for size in config.batch_sizes]
  records = experiment.sweep(config, dataset, grid, experiment='batch_sizes',
                             workdir=FLAGS.workdir)

  target = config.target_val_accuracy
  columns = (
      ('lr*', lambda rs: f"{rs[0]['learning_rate']:g}" if rs else '—'),
      ('val acc', report.final('val_accuracy')),
      ('test acc', report.final('test_accuracy')),
      # Generalization gap, both in eval mode: training set minus validation set accuracy.
      ('train−val gap', lambda r: r['final']['train_eval_accuracy'] - r['final']['val_accuracy']),
      (f'steps to {target:g} val acc*', lambda rs: _steps_to_target(rs)),
      ('wall s*', lambda rs: f"{rs[0]['wall_seconds']:.1f}" if rs else '—'),
  )
  records.sort(key=lambda r: (r['batch_size'], r['norm']))  # BN and no BN side by side
  table = report.summary_table(records, keys=('batch_size', 'norm'), columns=columns)
  results.atomic_write(os.path.join(FLAGS.workdir, 'summary.md'), (
      f'# Batch sizes: {config.model}, {config.data}, {config.epochs} epochs, {config.seeds} '
      f'seeds, lr scaling {config.lr_scaling}, bn_stats {config.bn_stats} (mean ± std over '
      f'seeds; wall s: per configuration, its seeds trained together)\n\n{table}'))
  report.plot_accuracy_vs_batch_size(records, os.path.join(FLAGS.workdir,
                                                           'accuracy_vs_batch_size.png'))
  report.plot_val_curves(records, os.path.join(FLAGS.workdir, 'curves.png'))
  if results.is_writer():
    print(table)
    print(f'wrote results.jsonl, summary.md, accuracy_vs_batch_size.png and curves.png '
          f'in {FLAGS.workdir}')


def _steps_to_target(runs):
  """'mean ± std (k/n reached)' of the steps to the target over the runs that reached it."""
  reached = [r['to_target']['step'] for r in runs if r['to_target']]
  return f'{report.mean_std(reached, digits=0)} ({len(reached)}/{len(runs)})'


if __name__ == '__main__':
  app.run(main)
