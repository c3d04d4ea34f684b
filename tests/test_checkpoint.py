"""Checkpoints: exact resumption after a fault, fallback from a corrupt checkpoint."""

import collections
import glob
import os
import shutil

import jax
import numpy as np
import pytest

from bn_jax import checkpoint
from bn_jax import host
from bn_jax import loop
from bn_jax import models
from bn_jax import programs as programs_lib
from bn_jax import train


class FailAfter(host.OneDevice):
  """Runs like one device, but raises (a stand-in for a crash) on chunk number `n + 1`."""

  def __init__(self, n):
    self.n, self.calls = n, 0

  def train_chunks(self, *args):  # pylint: disable=arguments-differ
    self.calls += 1
    if self.calls > self.n:
      raise RuntimeError('injected fault')
    return train.train_chunks(*args)


def _fit(dataset, directory, runner=host.ONE_DEVICE):
  # 300 examples, batch 32: 10 steps an epoch, evals after 5 and 10, so chunks of at most 3
  # end at 3, 5, 8, 10; 3 epochs = 30 steps.
  model = models.create_model('mlp', norm='batch', hidden=(16,), dropout=0.2)
  data = host.DeviceData.put(dataset)
  sched = loop.Schedule(300, 32, epochs=3, chunk_steps=3, evals_per_epoch=2)
  programs = programs_lib.compile_programs(model, data, sched, seeds=[0, 1], learning_rate=1e-3)
  return loop.fit(model, data, seeds=(0, 1), batch_size=32, epochs=3, chunk_steps=3,
                   evals_per_epoch=2, progress=False, programs=programs, runner=runner,
                   checkpointer=checkpoint.Checkpointer(directory, keep=3, every_steps=4))


def _without_seconds(results):
  return [{**r, 'history': [{k: v for k, v in h.items() if k != 'seconds'}
                            for h in r['history']], 'compile_seconds': None} for r in results]


def _assert_identical(a, b):
  (results_a, states_a), (results_b, states_b) = a, b
  jax.tree.map(np.testing.assert_array_equal, states_a, states_b)  # bit-identical on CPU
  assert _without_seconds(results_a) == _without_seconds(results_b)


@pytest.fixture(scope='module')
def uninterrupted(small_dataset, tmp_path_factory):
  return _fit(small_dataset, tmp_path_factory.mktemp('uninterrupted'))


@pytest.mark.slow
def test_resume_after_a_fault_gives_the_uninterrupted_result(small_dataset, tmp_path,
                                                              uninterrupted):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(9))  # dies in epoch 3
  steps = sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit())
  # Chunk ends at steps 3, 5, 8, 10 | 13, 15, 18, 20 | 23 (then the fault). Saved: every 4
  # steps at a chunk boundary (5, 15) and at epoch ends (10, 20); the last 3 are kept.
  assert steps == [10, 15, 20]
  counting = FailAfter(10**6)
  resumed = _fit(small_dataset, tmp_path, runner=counting)
  assert counting.calls == 4  # only epoch 3 ran again
  _assert_identical(resumed, uninterrupted)


def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(small_dataset, tmp_path,
                                                              uninterrupted, capsys):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(7))
  newest = max(int(p) for p in os.listdir(tmp_path) if p.isdigit())
  for root, _, files in os.walk(tmp_path / str(newest)):
    for name in files:  # truncate every file of the newest checkpoint
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(0, os.path.getsize(f.name) // 3))
  counting = FailAfter(10**6)
  result = _fit(small_dataset, tmp_path, runner=counting)
  assert f'checkpoint {newest} in {tmp_path} cannot be read' in capsys.readouterr().err
  assert 0 < counting.calls < 12  # resumed from an older checkpoint, not from scratch
  _assert_identical(result, uninterrupted)


def _flip_bytes(checkpoint_dir):
  """Inverts 8 bytes in the middle of the largest array file: a corruption that leaves
  every file readable (the arrays' file format has no checksum of its own)."""
  files = glob.glob(os.path.join(checkpoint_dir, 'arrays', '**', 'd', '*'), recursive=True)
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def test_flipped_bytes_are_caught_by_the_checksums_and_an_older_checkpoint_used(
    small_dataset, tmp_path, uninterrupted, capsys):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(7))  # checkpoints at steps 5, 10, 15
  _flip_bytes(tmp_path / '15')
  counting = FailAfter(10**6)
  result = _fit(small_dataset, tmp_path, runner=counting)
  err = capsys.readouterr().err
  assert f'checkpoint 15 in {tmp_path} is corrupt (checksum mismatch in' in err, err
  assert counting.calls == 8  # from step 10: chunks ending at 13, 15, 18, 20 | 23, ..., 30
  _assert_identical(result, uninterrupted)


def test_checksums_name_every_array_and_change_with_one_bit():
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': {'c': np.zeros(2, np.int32)}}
  sums = checkpoint.checksums(arrays)
  assert sorted(sums) == ["['a']", "['b']['c']"]
  flipped = arrays['a'].copy()
  flipped.view(np.uint32)[1, 2] ^= 1  # the lowest bit of one float
  assert checkpoint.checksums({**arrays, 'a': flipped})["['a']"] != sums["['a']"]
  assert checkpoint.checksums({**arrays, 'a': arrays['a'].reshape(3, 2)})["['a']"] != sums["['a']"]


def test_no_restorable_checkpoint_is_a_clear_error(small_dataset, tmp_path):
  with pytest.raises(RuntimeError, match='injected fault'):
    _fit(small_dataset, tmp_path, runner=FailAfter(4))
  for step in (p for p in os.listdir(tmp_path) if p.isdigit()):
    _flip_bytes(tmp_path / step)
  with pytest.raises(checkpoint.CorruptCheckpoints,
                     match=f'no checkpoint in {tmp_path} restores intact .*: delete that '
                     'directory to train the run from the start'):
    _fit(small_dataset, tmp_path)


def test_a_full_disk_while_saving_is_one_error_and_leaves_no_partial_checkpoint(tmp_path,
                                                                                monkeypatch):
  checkpointer = checkpoint.Checkpointer(tmp_path)
  arrays = {'x': np.zeros(3)}
  message = 'free some space .* and rerun; the run resumes from its last checkpoint'

  def full_disk(step, args):  # what Orbax does when the disk fills mid-write
    del args
    os.makedirs(tmp_path / f'{step}.orbax-checkpoint-tmp' / 'arrays')
    raise ValueError('RESOURCE_EXHAUSTED: Error writing ...: No space left on device')

  monkeypatch.setattr(checkpointer.manager, 'save', full_disk)
  with pytest.raises(OSError, match=f'cannot save checkpoint 7 in {tmp_path} \\(no space left '
                     f'on device\\): {message}'):
    checkpointer.save(7, arrays, {})
  assert not glob.glob(str(tmp_path / '*tmp*'))
  # Known before writing: the arrays (24 bytes) and 1 MiB of room for the metadata.
  Usage = collections.namedtuple('Usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: Usage(10**9, 10**9, 2**20 + 23))
  with pytest.raises(OSError, match=r'cannot save checkpoint 8 in .* \(it needs ~1.0 MiB, 1.0 '
                     f'MiB are free\\): {message}'):
    checkpointer.save(8, arrays, {})
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: Usage(10**9, 10**9, 2**20 + 24))
  with pytest.raises(OSError, match='no space left on device'):  # passed the check: Orbax's turn
    checkpointer.save(9, arrays, {})
