"""Tables and plots from hand-made records."""

import numpy as np

from bn_jax import report


def _record(norm, seed, val_acc, status='ok'):
  history = [{'epoch': e, 'train_loss': 1.0 / e, 'train_accuracy': 0.5 + 0.1 * e,
              'val_loss': 1.2 / e, 'val_accuracy': val_acc - 0.1 * (2 - e), 'seconds': 1.0}
             for e in (1, 2)]
  final = {'train_loss': 0.5, 'train_accuracy': 0.7, 'val_loss': 0.6, 'val_accuracy': val_acc,
           'test_accuracy': val_acc - 0.01, 'train_eval_accuracy': 0.75}
  return {'model': 'mlp', 'norm': norm, 'seed': seed, 'history': history, 'final': final,
          'status': status}


def test_mean_std_by_hand():
  assert report.mean_std([0.8, 0.9]) == f'0.8500 ± {np.sqrt(0.005):.4f}'  # sample std
  assert report.mean_std([0.5]) == '0.5000'  # one seed: no spread to report
  assert report.mean_std([float('nan')]) == '—'


def test_summary_table_groups_and_leaves_out_diverged_runs():
  records = [_record('batch', 0, 0.8), _record('batch', 1, 0.9), _record('none', 0, 0.7),
             _record('none', 1, float('nan'), status='diverged')]
  table = report.summary_table(records).splitlines()
  assert table[0].startswith('| model | norm | seeds | train acc | val acc |')
  assert table[2].startswith('| mlp | batch | 2 | 0.7000 ± 0.0000 | 0.8500 ± 0.0707 |')
  assert table[3].startswith('| mlp | none | 1 (+1 diverged) | 0.7000 | 0.7000 |')
  assert len(table) == 4


def test_plot_curves_writes_a_png(tmp_path):
  path = tmp_path / 'curves.png'
  report.plot_curves([_record('batch', 0, 0.8), _record('none', 0, 0.7)], str(path))
  assert path.read_bytes()[:4] == b'\x89PNG'
  assert [p.name for p in tmp_path.iterdir()] == ['curves.png']
