"""Result records -> Markdown tables (mean ± std over seeds) and matplotlib plots."""

import collections
import io

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from bn_jax.experiment import atomic_write  # pylint: disable=wrong-import-position

FINAL_COLUMNS = (('train_accuracy', 'train acc'), ('val_accuracy', 'val acc'),
                 ('train_loss', 'train loss'), ('val_loss', 'val loss'),
                 ('test_accuracy', 'test acc'), ('train_eval_accuracy', 'train acc (eval mode)'))


def group(records, keys):
  """Records grouped by the values of `keys`, in first-seen order."""
  groups = collections.OrderedDict()
  for r in records:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return groups


def mean_std(values):
  """'mean ± std' (sample std over seeds; '—' when nothing is finite)."""
  values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
  if not len(values):
    return '—'
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return f'{values.mean():.4f} ± {std:.4f}'


def summary_table(records, keys=('model', 'norm'), columns=FINAL_COLUMNS):
  """Markdown table: one row per group of `keys`, final metrics as mean ± std over seeds."""
  header = list(keys) + ['seeds'] + [title for _, title in columns]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for values, runs in group(records, keys).items():
    ok = [r for r in runs if r['status'] == 'ok']
    cells = [str(v) for v in values] + [
        f'{len(ok)}' + (f' (+{len(runs) - len(ok)} diverged)' if len(ok) < len(runs) else '')]
    cells += [mean_std([r['final'][name] for r in ok]) for name, _ in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot_curves(records, path, keys=('model', 'norm')):
  """Train/val loss and accuracy per epoch, one line per group, band = min..max over seeds."""
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  panels = [('train_loss', 'train loss'), ('val_loss', 'validation loss'),
            ('train_accuracy', 'train accuracy'), ('val_accuracy', 'validation accuracy')]
  for (values, runs), color in zip(group(records, keys).items(), _colors()):
    label = '/'.join(str(v) for v in values) + f' ({len(runs)} seeds)'
    epochs = min(len(r['history']) for r in runs)
    x = np.arange(1, epochs + 1)
    for ax, (name, title) in zip(axes.flat, panels):
      y = np.array([[h[name] for h in r['history'][:epochs]] for r in runs])
      ax.plot(x, y.mean(0), color=color, marker='o', label=label)
      ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.2, linewidth=0)
      ax.set_title(title)
      ax.grid(alpha=0.3)
  for ax in axes[1]:
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  axes[0, 0].legend()
  fig.suptitle('mean over seeds; band: min..max over seeds')
  save_figure(fig, path)


def save_figure(fig, path):
  """Saves a figure atomically as PNG and closes it."""
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  atomic_write(path, buffer.getvalue())


def _colors():
  return plt.rcParams['axes.prop_cycle'].by_key()['color'] * 4
