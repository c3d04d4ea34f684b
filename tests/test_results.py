"""Files on disk: atomic writes, whole-line records, the workdir's checks, run keys."""

import os
import subprocess
import sys

import pytest

from bn_jax import errors
from bn_jax import locks
from bn_jax import results


def test_atomic_write_and_records_round_trip(tmp_path):
  path = os.path.join(tmp_path, 'sub', 'summary.md')
  results.atomic_write(path, 'hello')
  results.atomic_write(path, 'world')
  assert open(path).read() == 'world'
  assert os.listdir(os.path.dirname(path)) == ['summary.md']  # no temporary left behind
  records_path = os.path.join(tmp_path, 'results.jsonl')
  results.append_records(records_path, [{'experiment': 'e', 'a': 1},
                                        {'experiment': 'e', 'a': float('nan')}])
  with open(records_path, 'a') as f:
    f.write('{"torn": ')  # a crash in the middle of a line
  records = results.read_records(records_path)
  assert records[0] == {'experiment': 'e', 'a': 1} and len(records) == 2


def _record(seed):
  return {'experiment': 'e', 'run_key': 'k', 'seed': seed, 'identity': {}}


def test_a_torn_last_line_is_set_aside_and_the_next_record_starts_a_fresh_line(tmp_path,
                                                                                capsys):
  path = tmp_path / 'results.jsonl'
  results.append_records(str(path), [_record(0), _record(1)])
  whole = path.read_bytes()
  path.write_bytes(whole[:-10])  # the second line cut short (a kill or a full disk)
  work = results.Workdir(str(tmp_path), 'e')
  assert list(work.finished) == [('k', 0)]
  assert path.read_bytes() == whole.split(b'\n')[0] + b'\n'  # whole lines only
  assert (tmp_path / results.REJECTED).read_bytes() == whole.split(b'\n')[1][:-9] + b'\n'
  err = capsys.readouterr().err
  assert f'{path} line 2 is torn (a write cut short)' in err and results.REJECTED in err
  results.append_records(str(path), [_record(1)])
  assert [r['seed'] for r in results.read_records(path)] == [0, 1]


def test_a_last_line_without_its_newline_is_kept_and_appends_start_a_new_line(tmp_path):
  path = tmp_path / 'results.jsonl'
  results.append_records(str(path), [_record(0)])
  path.write_bytes(path.read_bytes()[:-1])  # `truncate -s -1`: the record whole, no newline
  assert list(results.Workdir(str(tmp_path), 'e').finished) == [('k', 0)]
  results.append_records(str(path), [_record(1), _record(2)])
  assert [r['seed'] for r in results.read_records(path)] == [0, 1, 2]
  assert path.read_bytes().count(b'\n') == 3 and not (tmp_path / results.REJECTED).exists()


def test_a_garbage_line_in_the_middle_is_named_then_set_aside(tmp_path, capsys):
  path = tmp_path / 'results.jsonl'
  results.append_records(str(path), [_record(0)])
  with open(path, 'a') as f:
    f.write('garbage\n\n[1, 2]\n')  # not JSON, a blank line, JSON but not a record
  results.append_records(str(path), [_record(1)])
  with pytest.raises(ValueError, match=f'{path} line 2 is not JSON .*: run the experiment on '
                     f'this workdir once .*{results.REJECTED}.*, or delete that line'):
    results.read_records(path)
  assert sorted(results.Workdir(str(tmp_path), 'e').finished) == [('k', 0), ('k', 1)]
  err = capsys.readouterr().err
  assert 'line 2 is not JSON' in err and 'line 4 is not a result record' in err
  assert (tmp_path / results.REJECTED).read_text() == 'garbage\n[1, 2]\n'
  assert [r['seed'] for r in results.read_records(path)] == [0, 1]


def test_a_deleted_lock_stops_the_writer_before_it_records(tmp_path):
  results.Workdir(str(tmp_path), 'e')
  locks.check_lock(str(tmp_path))  # still ours
  os.remove(tmp_path / '.lock')
  with pytest.raises(locks.WorkdirInUse, match='.lock was deleted or replaced while this '
                     'process .* stop every process using it, then rerun'):
    locks.check_lock(str(tmp_path))


def test_run_key_is_a_stable_hash_of_the_identity():
  identity = {'batch_size': 32, 'hidden': [128], 'norm': 'batch'}
  key = results.run_key(identity)
  assert key == results.run_key(dict(reversed(list(identity.items()))))  # order-free
  assert key == results.run_key({**identity, 'hidden': (128,)})  # tuples are lists in JSON
  assert key != results.run_key({**identity, 'batch_size': 64})
  assert len(key) == 12


def test_workdir_that_is_a_file_or_unwritable_is_refused(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(errors.WorkdirError, match='is a file'):
    results.Workdir(str(path), 'e')
  with pytest.raises(OSError, match="workdir '/proc/bn_jax_test' cannot be created or written"):
    results.Workdir('/proc/bn_jax_test', 'e')  # not writable even for root


def test_workdir_refuses_results_of_another_experiment(tmp_path):
  results.append_records(str(tmp_path / 'results.jsonl'), [{'experiment': 'batch_sizes'}])
  with pytest.raises(errors.WorkdirError, match="holds results of experiment 'batch_sizes', not "
                                       "'bn_vs_no_bn': use another --workdir"):
    results.Workdir(str(tmp_path), 'bn_vs_no_bn')


def test_resume_false_refuses_to_overwrite_unless_asked(tmp_path):
  record = {'experiment': 'e', 'run_key': 'k', 'seed': 0, 'identity': {}}
  results.append_records(str(tmp_path / 'results.jsonl'), [record])
  os.makedirs(tmp_path / 'checkpoints' / 'k')
  assert results.Workdir(str(tmp_path), 'e').finished == {('k', 0): record}  # resume: kept
  with pytest.raises(errors.WorkdirError, match='pass --config.overwrite=true'):
    results.Workdir(str(tmp_path), 'e', resume=False)
  assert results.Workdir(str(tmp_path), 'e', resume=False, overwrite=True).finished == {}
  assert not (tmp_path / 'results.jsonl').exists() and not (tmp_path / 'checkpoints').exists()


_HOLD = '''
import sys, time
from bn_jax import errors
from bn_jax import results
results.Workdir(sys.argv[1], 'e')
print('locked', flush=True)
time.sleep(600)
'''


@pytest.mark.slow
def test_one_writer_per_workdir_and_a_killed_holder_frees_it(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(locks.WorkdirInUse, match=rf'workdir {tmp_path} is in use by pid '
                       rf'{holder.pid} on host .* use another --workdir'):
      results.Workdir(str(tmp_path), 'e')
  finally:
    holder.kill()  # SIGKILL: the OS releases the lock
    holder.wait()
  results.Workdir(str(tmp_path), 'e')  # now this process holds it ...
  results.Workdir(str(tmp_path), 'e')  # ... and may open it again
