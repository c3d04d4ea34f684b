r"""The original study's comparison: the MLP with and without Batch Normalization.

  python experiments/bn_vs_no_bn.py --workdir=runs/bn_vs_no_bn \
      --config.data=idx:/usr/share/datasets/fashion-mnist --config.seeds=5

Writes results.jsonl (one record per run), summary.md and curves.png to the workdir and prints
the table. Any setting below (or in bn_jax/settings.py) can be overridden with
--config.NAME=VALUE; runs already in the workdir's results.jsonl are not trained again.
"""

import os

from bn_jax import cli
from bn_jax import report
from bn_jax import results
from bn_jax import settings
from bn_jax import sweep


def get_config():
  config = settings.base_config()
  config.norms = ('batch', 'none')  # BN and the control, otherwise identical
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.epochs = 5
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.seeds = 3
  return config


def main(config, workdir):
  dataset = sweep.load_data(config)
  records = sweep.sweep(config, dataset, [{'norm': norm} for norm in config.norms],
                        experiment='bn_vs_no_bn', workdir=workdir)

  table = report.summary_table(records)
  results.atomic_write(os.path.join(workdir, 'summary.md'), (
      f'# BN vs no BN: {config.model}, {config.data}, batch {config.batch_size}, '
      f'{config.epochs} epochs, {config.seeds} seeds (mean ± std over seeds)\n\n{table}'))
  report.plot_curves(records, os.path.join(workdir, 'curves.png'))
  if results.is_writer():
    print(table)
    print(f'wrote results.jsonl, summary.md and curves.png in {workdir}')


if __name__ == '__main__':
  cli.run(main, get_config, grid_keys=('norm',), workdir='runs/bn_vs_no_bn')
