"""experiments/papers/santurkar2018.py: its presets, its checks, and end to end in quick mode."""


import pytest

from _scripts import load_script
from _scripts import run_quick

from bn_jax import cli
from bn_jax import settings


def _script():
  return load_script('santurkar2018')


S = _script()
PRESETS = {'quick': S.quick, 'scale=paper': S.paper}


def test_the_default_is_the_papers_optimizer_and_noise():
  config = cli.resolve(S.get_config(), {}, PRESETS)
  assert (config.optimizer, config.learning_rate, config.batch_size) == ('sgd', 0.1, 128)
  assert config.lr_schedule == 'constant' and config.bn_noise == 0.5
  # Fashion-MNIST: 54,000 training examples, 422 steps an epoch (the last one partial).
  steps = S.check(config, 3 * 422)
  assert steps == [round(1266 * k / 9) for k in range(1, 10)] and steps[-1] == 1266
  assert [steps[k - 1] for k in config.measure_at] == [141, 422, 844, 1266]


def test_scale_paper_is_the_papers_setting_and_passes_the_check():
  config = cli.resolve(S.get_config(), {'scale': 'paper'}, PRESETS)
  assert config.data.startswith('cifar:') and config.model == 'cnn'
  assert len(config.features) == 8  # VGG-11's 8 conv layers, its widths
  assert (config.optimizer, config.learning_rate, config.batch_size) == ('sgd', 0.1, 128)
  steps_per_epoch = -(-45000 // 128)  # 45k CIFAR-10 training images after the 5k split
  total = config.epochs * steps_per_epoch
  assert 13000 <= total <= 16000  # the paper's ~15k steps
  steps = S.check(config, total)
  assert len(steps) == config.curve_points and steps[-1] == total


@pytest.mark.parametrize('overrides, message', [
    ({'optimizer': 'momentum'}, "optimizer must be 'sgd'"),
    ({'lr_schedule': 'cosine'}, "optimizer must be 'sgd'"),
    ({'save_states_at': (10,)}, 'save_states_at is set by curve_points'),
    ({'curve_points': 1}, 'curve_points=1 must be in 2..'),
    ({'measure_at': (0, 3)}, 'measure_at=(0, 3) must name points'),
    ({'measure_at': (10,)}, 'measure_at=(10,) must name points'),
    ({'margin': 0.0}, 'margin must be > 0'),
])
def test_check_refuses_designs_that_cannot_test_the_claims(overrides, message):
  config = settings.resolve(S.get_config(), **overrides)
  with pytest.raises(settings.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    S.check(config, 1266)


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
  report, rows = run_quick(tmp_path, 'santurkar2018')
  assert len(rows) == 4
  assert 'U(1, 1.25) + U(-0.5, 0.5)' in report and 'scale 1.125' in report
  assert report.count('training_accuracy.png') == 1 and 'ics_landscape.png' in report
