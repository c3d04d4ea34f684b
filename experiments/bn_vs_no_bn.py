r"""The original study's comparison: the MLP with and without Batch Normalization.

  python experiments/bn_vs_no_bn.py --workdir=runs/bn_vs_no_bn \
      --config.data=idx:/usr/share/datasets/fashion-mnist --config.seeds=5

Writes results.jsonl (one record per run), summary.md and curves.png to the workdir and prints
the table. Any setting below can be overridden with --config.NAME=VALUE.
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
  config.norms = ('batch', 'none')  # BN and the control, otherwise identical
  config.data = 'tfds:mnist'
  config.model = 'mlp'
  config.epochs = 5
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.seeds = 3
  return config


FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_dict('config', get_config())
flags.DEFINE_string('workdir', 'runs/bn_vs_no_bn', 'Directory for results and plots.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # JAX's INFO lines (e.g. 'no TPU found') are noise here
  config = _CONFIG.value
  dataset = experiment.load_data(config)

  records = experiment.sweep(config, dataset, [{'norm': norm} for norm in config.norms],
                             experiment='bn_vs_no_bn', workdir=FLAGS.workdir)

  table = report.summary_table(records)
  results.atomic_write(os.path.join(FLAGS.workdir, 'summary.md'), (
      f'# BN vs no BN: {config.model}, {config.data}, batch {config.batch_size}, '
      f'{config.epochs} epochs, {config.seeds} seeds (mean ± std over seeds)\n\n{table}'))
  report.plot_curves(records, os.path.join(FLAGS.workdir, 'curves.png'))
  if results.is_writer():
    print(table)
    print(f'wrote results.jsonl, summary.md and curves.png in {FLAGS.workdir}')


if __name__ == '__main__':
  app.run(main)
