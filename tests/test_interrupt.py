"""SIGTERM / SIGINT: the run stops after a chunk with a checkpoint and a message, and the same
command then ends with exactly the numbers of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _limits import HANG_SECONDS

from bn_jax import interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as a user runs
VOLATILE = ('wall_seconds', 'compile_seconds', 'finished')


def _command(workdir):
  return [sys.executable, os.path.join(ROOT, 'experiments', 'bn_vs_no_bn.py'),
          f'--workdir={workdir}', '--config.data=synthetic:600', '--config.seeds=2',
          '--config.epochs=20', '--config.chunk_steps=5', '--config.progress=false',
          # one cache for the test's runs, one after another: the later ones compile nothing
          f'--config.compilation_cache_dir={workdir.parent / "jax_cache"}']


def _records(workdir):
  records = [json.loads(line) for line in open(workdir / 'results.jsonl')]
  for r in records:
    for key in VOLATILE:
      r.pop(key)
    for h in r['history']:
      h.pop('seconds')
  return sorted(records, key=lambda r: (r['run_key'], r['seed']))  # file order: finish order


def _start_and_signal(workdir, *signals):
  proc = subprocess.Popen(_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=ENV)
  # Until the first run's checkpointer exists (it is compiling or training), however long the
  # start takes on a busy machine; a signal before it would find no run to stop.
  deadline = time.monotonic() + HANG_SECONDS
  while (not (workdir / 'checkpoints').exists() and proc.poll() is None
         and time.monotonic() < deadline):
    time.sleep(0.05)
  for s in signals:
    proc.send_signal(s)
  out, err = proc.communicate(timeout=HANG_SECONDS)
  return proc.returncode, out, err


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_bit_identically(tmp_path):
  clean = subprocess.run(_command(tmp_path / 'clean'), capture_output=True, text=True,
                         timeout=HANG_SECONDS, env=ENV, check=False)
  assert clean.returncode == 0, clean.stderr[-3000:]
  code, _, err = _start_and_signal(tmp_path / 'run', signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith('interrupted at step ') and last.endswith(
      '; run the same command to resume'), err[-3000:]
  step = int(last.split()[3].rstrip(';'))
  assert not (tmp_path / 'run' / 'results.jsonl').exists() or len(
      _records(tmp_path / 'run')) < 4  # the interrupted run did not finish the sweep
  assert os.listdir(tmp_path / 'run' / 'checkpoints')  # ... and saved where it stopped
  assert step > 0
  resumed = subprocess.run(_command(tmp_path / 'run'), capture_output=True, text=True,
                           timeout=HANG_SECONDS, env=ENV, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _records(tmp_path / 'run') == _records(tmp_path / 'clean')  # bit-identical on CPU


def test_the_first_signal_asks_to_stop_and_a_second_exits_at_once(monkeypatch):
  exits = []
  monkeypatch.setattr(interrupt.os, '_exit', exits.append)
  monkeypatch.setattr(interrupt, '_received', [])
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    interrupt.handle_signals()
    assert not interrupt.requested()
    os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes: it did not kill pytest
    assert interrupt.requested() and interrupt.signum() == signal.SIGTERM and exits == []
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]  # the second one: os._exit at once
  finally:
    for s, handler in before.items():
      signal.signal(s, handler)


def test_interrupted_says_where_and_how_to_resume():
  assert str(interrupt.Interrupted(37)) == (
      'interrupted at step 37; run the same command to resume')
  assert 'between runs' in str(interrupt.Interrupted(None))
