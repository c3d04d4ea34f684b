"""Files on disk: atomic writes, whole-line records, the workdir's checks, run keys."""

import os
import subprocess
import sys

import pytest

from bn_jax import results


def test_atomic_write_and_records_round_trip(tmp_path):
  path = os.path.join(tmp_path, 'sub', 'summary.md')
  results.atomic_write(path, 'hello')
  results.atomic_write(path, 'world')
  assert open(path).read() == 'world'
  assert os.listdir(os.path.dirname(path)) == ['summary.md']  # no temporary left behind
  records_path = os.path.join(tmp_path, 'results.jsonl')
  results.append_records(records_path, [{'a': 1}, {'a': float('nan')}])
  with open(records_path, 'a') as f:
    f.write('{"torn": ')  # a crash in the middle of a line
  records = results.read_records(records_path)
  assert records[0] == {'a': 1} and len(records) == 2


def test_run_key_is_a_stable_hash_of_the_identity():
  identity = {'batch_size': 32, 'hidden': [128], 'norm': 'batch'}
  key = results.run_key(identity)
  assert key == results.run_key(dict(reversed(list(identity.items()))))  # order-free
  assert key == results.run_key({**identity, 'hidden': (128,)})  # tuples are lists in JSON
  assert key != results.run_key({**identity, 'batch_size': 64})
  assert len(key) == 12


def test_code_version_hashes_the_sources_and_the_script(tmp_path):
  script = tmp_path / 'script.py'
  script.write_text('print(1)\n')
  version = results.code_version(str(script))
  assert version['script'] == 'script.py' and len(version['sources']) == 16
  assert results.code_version(str(script)) == version
  script.write_text('print(2)\n')
  assert results.code_version(str(script)) == version  # read once: this process runs print(1)
  results._code_version.cache_clear()  # pylint: disable=protected-access  (a new process)
  assert results.code_version(str(script))['sources'] != version['sources']  # other code
  root = os.path.dirname(results.PACKAGE_DIR)
  if os.path.isdir(os.path.join(root, '.git')):  # a git checkout: the commit is recorded
    assert len(version['commit']) == 40 and isinstance(version['dirty'], bool)


def test_workdir_that_is_a_file_or_unwritable_is_refused(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(NotADirectoryError, match='is a file'):
    results.Workdir(str(path), 'e')
  with pytest.raises(OSError, match="workdir '/proc/bn_jax_test' cannot be created or written"):
    results.Workdir('/proc/bn_jax_test', 'e')  # not writable even for root


def test_workdir_refuses_results_of_another_experiment(tmp_path):
  results.append_records(str(tmp_path / 'results.jsonl'), [{'experiment': 'batch_sizes'}])
  with pytest.raises(ValueError, match="holds results of experiment 'batch_sizes', not "
                                       "'bn_vs_no_bn': use another --workdir"):
    results.Workdir(str(tmp_path), 'bn_vs_no_bn')


def test_resume_false_refuses_to_overwrite_unless_asked(tmp_path):
  record = {'experiment': 'e', 'run_key': 'k', 'seed': 0, 'identity': {}}
  results.append_records(str(tmp_path / 'results.jsonl'), [record])
  os.makedirs(tmp_path / 'checkpoints' / 'k')
  assert results.Workdir(str(tmp_path), 'e').finished == {('k', 0): record}  # resume: kept
  with pytest.raises(FileExistsError, match='pass --config.overwrite=true'):
    results.Workdir(str(tmp_path), 'e', resume=False)
  assert results.Workdir(str(tmp_path), 'e', resume=False, overwrite=True).finished == {}
  assert not (tmp_path / 'results.jsonl').exists() and not (tmp_path / 'checkpoints').exists()


_HOLD = '''
import sys, time
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
    with pytest.raises(results.WorkdirInUse, match=rf'workdir {tmp_path} is in use by pid '
                       rf'{holder.pid} on host .* use another --workdir'):
      results.Workdir(str(tmp_path), 'e')
  finally:
    holder.kill()  # SIGKILL: the OS releases the lock
    holder.wait()
  results.Workdir(str(tmp_path), 'e')  # now this process holds it ...
  results.Workdir(str(tmp_path), 'e')  # ... and may open it again
