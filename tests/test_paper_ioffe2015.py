"""experiments/papers/ioffe2015.py: its budget points, steps to the target, the presets, and
the script end to end in quick mode."""


import ml_collections
import numpy as np
import pytest

from _scripts import load_script
from _scripts import run_quick

from bn_jax import cli
from bn_jax import settings


def _script():
  return load_script('ioffe2015')


def test_budgets_are_the_early_points_then_every_last_one_to_the_end():
  ioffe = _script()
  config = ml_collections.ConfigDict({'points': (100, 500, 2500), 'max_steps': 50000})
  steps = ioffe.budgets(config)
  assert steps[:4] == (100, 500, 2500, 5000) and steps[-1] == 50000 and len(steps) == 22
  config.update(points=(7, 10), max_steps=25)  # 25 is not a multiple of 10: still the end
  assert ioffe.budgets(config) == (7, 10, 20, 25)


def test_steps_to_the_target_is_the_first_point_at_or_above_it_or_the_budget():
  ioffe = _script()
  curve = lambda *accs: {'curve': [{'step': 100 * (i + 1), 'val_accuracy': a}
                                   for i, a in enumerate(accs)]}
  records = [curve(0.5, 0.8, 0.7, 0.9), curve(0.79, 0.81), curve(0.1, 0.2)]
  np.testing.assert_array_equal(ioffe.steps_to(records, 0.8, 50000), [200, 200, 50000])


def test_presets_and_checks():
  ioffe = _script()
  presets = {'quick': ioffe.quick, 'scale=paper': ioffe.paper}
  config = cli.resolve(ioffe.get_config(), {'scale': 'paper'}, presets)
  assert (config.data, config.batch_size, config.max_steps, tuple(config.hidden)) == (
      'tfds:mnist', 60, 50000, (100, 100, 100))
  ioffe.check(config)
  with pytest.raises(settings.ConfigError, match='accuracy_at=5001 must be one of'):
    ioffe.check(cli.resolve(ioffe.get_config(), {'accuracy_at': 5001}, presets))


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
  report, rows = run_quick(tmp_path, 'ioffe2015')
  assert len(rows) == 5
  assert 'Rate rule: SGD rates (0.3, 1.0) for 30 steps on seeds 2..3' in report
  # Each network trained once per tested seed, plus the rate grid on the other seeds.
  records = (tmp_path / 'run' / 'results.jsonl').read_text().splitlines()
  assert len(records) == 2 * 2 + 2 * 2 * 2
