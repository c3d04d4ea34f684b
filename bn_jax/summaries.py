"""TensorBoard event files, live while a run trains: `WORKDIR/tensorboard/<run>/seed_<s>/`,
<run> naming the model, norm, batch size and rate, the other settings the sweep varies
(`bn_momentum=0.999`), then the run key.

Written with tensorboardX, which needs no TensorFlow (view them with `pip install tensorboard`
and `tensorboard --logdir WORKDIR/tensorboard`). Per seed: `train/loss` and `train/accuracy`
per epoch (train mode, averaged over the epoch's batches), `val/loss`, `val/accuracy` and
`learning_rate` at every eval point, `test/loss` and `test/accuracy` at the end, all against
the training step; and the run's identity as hparams. A resumed run purges the events after
its checkpoint's step, so its curves have no doubled stretch.
"""

import os

import numpy as np

from bn_jax import results


def root(workdir):
  """The directory of a workdir's event files: `WORKDIR/tensorboard`."""
  return os.path.join(os.path.abspath(workdir), 'tensorboard')


def _short(value):
  """A setting's value as a directory name part: numbers as %g, sequences joined by '-'."""
  if isinstance(value, (list, tuple)):
    return '-'.join(_short(v) for v in value)
  return f'{value:g}' if isinstance(value, float) else str(value)


class RunSummaries:
  """The event files of one configuration's seeds; the `logger` of `loop.fit`."""

  def __init__(self, workdir, key, seeds, hparams, varied=()):
    extra = ''.join(f'_{k}={_short(hparams[k])}' for k in sorted(varied) if k in hparams and
                    k not in ('model', 'norm', 'batch_size', 'learning_rate'))
    name = (f"{hparams['model']}_{hparams['norm']}_bs{hparams['batch_size']}_"
            f"lr{hparams['learning_rate']:g}{extra}_{key}")
    self.directory = os.path.join(root(workdir), name)
    self.seeds, self.writers = list(seeds), None
    # TensorBoard's hparams take numbers, strings and booleans: lists become strings.
    self.hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in hparams.items()}

  def start(self, step):
    """Opens the writers; from a checkpoint at `step` > 0, later events are purged."""
    if not results.is_writer():
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self.writers = [tensorboardX.SummaryWriter(
        os.path.join(self.directory, f'seed_{s}'), purge_step=step or None, flush_secs=10)
                    for s in self.seeds]

  def scalars(self, step, values):
    """Writes `values` (name -> one number per seed) at `step`."""
    for i, writer in enumerate(self.writers or ()):
      for name, per_seed in values.items():
        writer.add_scalar(name, float(np.asarray(per_seed)[i]), step)

  def close(self, final=None):
    """Writes the hparams with the final metrics (name -> one number per seed), closes."""
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
    for i, writer in enumerate(self.writers or ()):
      metrics = {name: float(np.asarray(v)[i]) for name, v in (final or {}).items()}
      for summary in hparams(self.hparams, metrics):
        writer.file_writer.add_summary(summary)
      writer.close()
    self.writers = None
