"""TensorBoard event files, read back with TensorBoard's own reader."""

import glob
import os

import numpy as np
import pytest

from bn_jax import data
from bn_jax import report
from bn_jax import settings
from bn_jax import sweep


@pytest.mark.slow
def test_event_files_hold_every_eval_point_epoch_and_the_hparams(tmp_path):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  plugin_data_pb2 = pytest.importorskip('tensorboard.plugins.hparams.plugin_data_pb2')
  config = settings.base_config()
  config.update(data='synthetic:400', val_fraction=0.25, seeds=2, epochs=2, evals_per_epoch=3,
                hidden=(8,), progress=False, compilation_cache=False, devices=1)
  records = sweep.sweep(config, data.load(config.data, val_fraction=0.25), [{}],
                        experiment='t', workdir=str(tmp_path))
  (run,) = glob.glob(str(tmp_path / 'tensorboard' / '*'))
  assert os.path.basename(run) == f'mlp_batch_bs32_lr0.001_{records[0]["run_key"]}'
  for r in records:
    events = event_accumulator.EventAccumulator(os.path.join(run, f'seed_{r["seed"]}'))
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    assert set(events.Tags()['scalars']) == {'val/loss', 'val/accuracy', 'learning_rate',
                                             'train/loss', 'train/accuracy', 'test/loss',
                                             'test/accuracy'}
    # One point per eval point (3 an epoch, at the record's curve steps), one per epoch.
    assert [s for s, _ in scalars('val/accuracy')] == [p['step'] for p in r['curve']]
    assert len(r['curve']) == 6
    np.testing.assert_allclose([v for _, v in scalars('val/accuracy')],
                               [p['val_accuracy'] for p in r['curve']], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars('learning_rate')], [1e-3] * 6, rtol=1e-6)
    assert [s for s, _ in scalars('train/loss')] == [10, 20]  # 300 examples / 32: 10 steps
    np.testing.assert_allclose([v for _, v in scalars('train/loss')],
                               [h['train_loss'] for h in r['history']], rtol=1e-6)
    assert scalars('test/accuracy') == [(20, pytest.approx(r['final']['test_accuracy']))]
    content = events.PluginTagToContent('hparams')['_hparams_/session_start_info']
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams['batch_size'].number_value == 32
    assert start.hparams['hidden'].string_value == '[8]'
    assert start.hparams['norm'].string_value == 'batch'


def test_tensorboard_can_be_turned_off(tmp_path):
  config = settings.base_config()
  config.update(data='synthetic:200', seeds=1, epochs=1, hidden=(8,), progress=False,
                compilation_cache=False, devices=1, tensorboard=False)
  sweep.sweep(config, data.load(config.data), [{}], experiment='t', workdir=str(tmp_path))
  assert not (tmp_path / 'tensorboard').exists()


@pytest.mark.slow
def test_runs_are_named_and_grouped_by_the_settings_the_grid_varies(tmp_path):
  config = settings.base_config()
  config.update(data='synthetic:200', seeds=2, epochs=1, hidden=(8,), progress=False,
                compilation_cache=False, devices=1)
  grid = [{'bn_momentum': m} for m in (0.9, 0.999)] + [{'norm': 'none'}]
  records = sweep.sweep(config, data.load(config.data), grid, experiment='t',
                        workdir=str(tmp_path))
  names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / 'tensorboard' / '*')))
  key = lambda i: records[2 * i]['run_key']
  # bn_momentum varies among the BN runs; the no-BN run has none (its identity lacks it).
  assert names == sorted([f'mlp_batch_bs32_lr0.001_bn_momentum=0.9_{key(0)}',
                          f'mlp_batch_bs32_lr0.001_bn_momentum=0.999_{key(1)}',
                          f'mlp_none_bs32_lr0.001_{key(2)}'])
  table = report.summary_table(records, keys=('norm', 'bn_momentum'))
  assert '| batch | 0.9 | 2 |' in table and '| batch | 0.999 | 2 |' in table
  assert '| none | 0.99 | 2 |' in table  # the config's value, read though it does not matter
  with pytest.raises(KeyError, match="'bn_momentun' is neither a record field nor a setting"):
    report.group(records, ('bn_momentun',))
