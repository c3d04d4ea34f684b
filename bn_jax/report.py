"""Result records -> Markdown tables (mean ± std over seeds) and matplotlib plots (matplotlib
is imported when the first plot is made, never by `import bn_jax`)."""

import collections
import io
import sys

import numpy as np

from bn_jax.results import atomic_write

def _matplotlib():
  """matplotlib with its figure and ticker modules, imported on first use."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.figure  # pylint: disable=g-import-not-at-top,unused-import
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top,unused-import
  return matplotlib


def to_target(curve, target):
  """The first validation point of a record's `curve` at or above `target`:
  {'step', 'examples'}, or None if the run never reached it."""
  for point in curve:
    if point['val_accuracy'] >= target:
      return {'step': point['step'], 'examples': point['examples']}
  return None


def final(name):
  """Column function: a number from a record's `final` metrics."""
  return lambda r: r['final'][name]


FINAL_COLUMNS = (('train acc', final('train_accuracy')), ('val acc', final('val_accuracy')),
                 ('train loss', final('train_loss')), ('val loss', final('val_loss')),
                 ('test acc', final('test_accuracy')),
                 ('train acc (eval mode)', final('train_eval_accuracy')))


def group(records, keys):
  """Records grouped by the values of `keys` (any setting: a record's own field, else its
  config's, e.g. 'bn_momentum'), in first-seen order."""
  groups = collections.OrderedDict()
  for r in records:
    groups.setdefault(tuple(setting(r, k) for k in keys), []).append(r)
  return groups


def setting(record, key):
  """A record's value of `key`: its own field, else its config's (lists as tuples)."""
  if key in record:
    return record[key]
  if key not in record['config']:
    raise KeyError(f'{key!r} is neither a record field nor a setting (the config keys: '
                   f'{sorted(record["config"])})')
  value = record['config'][key]
  return tuple(value) if isinstance(value, list) else value


def mean_std(values, digits=4):
  """'mean ± std' (sample std over seeds); just the value for one seed; '—' for none."""
  values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
  if not len(values):
    return '—'
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}'


def summary_table(records, keys=('model', 'norm'), columns=FINAL_COLUMNS):
  """Markdown table: a row per group of `keys`; each column is `(title, record -> number)`
  as mean ± std over the group's seeds that did not diverge, or `(title, records -> text)`
  when the title ends in '*' (printed without the '*')."""
  header = list(keys) + ['seeds'] + [title.rstrip('*') for title, _ in columns]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for values, runs in group(records, keys).items():
    ok = [r for r in runs if r['status'] == 'ok']
    cells = [str(v) for v in values] + [
        f'{len(ok)}' + (f' (+{len(runs) - len(ok)} diverged)' if len(ok) < len(runs) else '')]
    for title, fn in columns:
      cells.append(fn(ok) if title.endswith('*') else mean_std([fn(r) for r in ok]))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot_curves(records, path, keys=('model', 'norm')):
  """Train/val loss and accuracy per epoch, one line per group, band = min..max over seeds."""
  fig, axes = subplots(2, 2, figsize=(11, 7.5), sharex=True)
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
    ax.xaxis.set_major_locator(_matplotlib().ticker.MaxNLocator(integer=True))
  axes[0, 0].legend()
  fig.suptitle('mean over seeds; band: min..max over seeds')
  save_figure(fig, path)


def subplots(nrows=1, ncols=1, *, figsize, **kwargs):
  """(figure, axes) as `pyplot.subplots` gives them, without pyplot: a `matplotlib.figure.Figure`
  belongs to no backend and no global figure list (plots leave a notebook's backend alone)."""
  fig = _matplotlib().figure.Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path):
  """Saves a figure atomically as PNG (a pyplot figure is closed too)."""
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format='png', dpi=110)
  if 'matplotlib.pyplot' in sys.modules:
    sys.modules['matplotlib.pyplot'].close(fig)
  atomic_write(path, buffer.getvalue())


def plot_accuracy_vs_batch_size(records, path):
  """Final validation and test accuracy against batch size (log x), error bars = std."""
  fig, axes = subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for (norm, runs), color in zip(group(records, ('norm',)).items(), _colors()):
    by_size = group([r for r in runs if r['status'] == 'ok'], ('batch_size',))
    sizes = [size for (size,) in by_size]
    for ax, name in zip(axes, ('val_accuracy', 'test_accuracy')):
      values = [[r['final'][name] for r in rs] for rs in by_size.values()]
      ax.errorbar(sizes, [np.mean(v) for v in values],
                  yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values],
                  color=color, marker='o', capsize=3, label=f'norm={norm[0]}')
      ax.set_xscale('log', base=2)
      ax.set_xticks(sizes, [str(s) for s in sizes])
      ax.set_xlabel('batch size')
      ax.set_title(name.replace('_', ' '))
      ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle('mean ± std over seeds')
  save_figure(fig, path)


def plot_val_curves(records, path):
  """Validation accuracy vs epoch and vs examples seen: a row per norm, a line per batch size."""
  by_norm = group(records, ('norm',))
  fig, axes = subplots(len(by_norm), 2, figsize=(11, 3.8 * len(by_norm)), squeeze=False,
                           sharey=True)
  for row, ((norm,), runs) in zip(axes, by_norm.items()):
    for ((size,), rs), color in zip(group(runs, ('batch_size',)).items(), _colors()):
      rs = [r for r in rs if r['status'] == 'ok']
      if not rs:
        continue
      n_points = min(len(r['curve']) for r in rs)
      acc = np.mean([[p['val_accuracy'] for p in r['curve'][:n_points]] for r in rs], 0)
      examples = np.array([p['examples'] for p in rs[0]['curve'][:n_points]])
      epochs = np.array([h['epoch'] for h in rs[0]['history']])
      epoch_acc = np.mean([[h['val_accuracy'] for h in r['history']] for r in rs], 0)
      row[0].plot(epochs, epoch_acc, color=color, marker='o', label=f'batch {size}')
      row[1].plot(examples, acc, color=color, label=f'batch {size}')
    row[0].set_title(f'norm={norm}: validation accuracy per epoch')
    row[1].set_title(f'norm={norm}: validation accuracy vs examples seen')
    row[0].set_xlabel('epoch')
    row[1].set_xlabel('training examples seen')
    row[0].xaxis.set_major_locator(_matplotlib().ticker.MaxNLocator(integer=True))
    for ax in row:
      ax.grid(alpha=0.3)
    row[0].legend(fontsize=8)
  fig.suptitle('mean over seeds')
  save_figure(fig, path)


def _colors():
  return _matplotlib().rcParams['axes.prop_cycle'].by_key()['color'] * 4


def plot_lines(path, x, series, *, xlabel, ylabel, xlog=False, title=''):
  """One line per `series` entry, label -> (y means, y error bars or None) over `x`."""
  fig, ax = subplots(figsize=(6.5, 4))
  for label, (y, err) in series.items():
    ax.errorbar(x, y, err, marker='o', capsize=3, label=label)
  if xlog:
    ax.set_xscale('log')
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save_figure(fig, path)


def plot_bars(path, labels, means, errors=None, *, ylabel):
  """One bar per label with optional error bars (e.g. std over seeds)."""
  fig, ax = subplots(figsize=(6.5, 4))
  ax.bar(range(len(labels)), means, yerr=errors, capsize=3)
  ax.set_xticks(range(len(labels)), labels, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, axis='y')
  save_figure(fig, path)


def plot_layer_norms(path, panels):
  """Per panel title, lines label -> (values per layer, line style), log y: e.g. gradient norm
  per layer at init and after training."""
  fig, axes = subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, (title, lines) in zip(axes[0], panels.items()):
    for label, (values, style) in lines.items():
      ax.semilogy(values, style, marker='o', label=label)
    ax.set(title=title, xlabel='layer (input first)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  save_figure(fig, path)
