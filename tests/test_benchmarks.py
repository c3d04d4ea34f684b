"""The benchmark scripts run end to end (tiny settings; their timings are not asserted)."""

import json
import os
import re
import subprocess
import sys

import pytest

from _limits import HANG_SECONDS
from _scripts import load_script

from bn_jax import data
from bn_jax import loop
from bn_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_speed_benchmark_writes_every_section_but_resnet(tmp_path):
  # ResNet-20's section (skipped: XLA's CPU convolution step alone takes ~1 min) runs in
  # benchmarks/device_check.sh.
  out = tmp_path / 'speed.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'speed.py'),
                        '--data=synthetic:600', '--epochs=1', '--batch_sizes=256',
                        '--seed_counts=1,2', '--cnn_steps=3',
                        '--skip_torch', '--resnet_steps=0', f'--out={out}'], capture_output=True,
                       text=True, timeout=HANG_SECONDS, env=env, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert {'grid_cold', 'grid_warm', 'seeds', 'matmul_flops', 'throughput',
          'cnn_step_ms'} <= set(result)
  assert set(result['cnn_step_ms']) == {'patches', 'xla'}
  assert result['batch_sizes'] == [256]
  assert set(result['seeds']['train_seconds']) == {'1', '2'}
  assert set(result['throughput']) == {'32', '256'}
  assert 'grid cold' in run.stdout


@pytest.mark.slow
def test_conv_speed_times_every_resnet_stage():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'conv_speed.py'),
                        '--batch_size=2', '--reps=1'], capture_output=True, text=True,
                       timeout=HANG_SECONDS, env=env, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [line for line in run.stdout.splitlines() if 'x' in line.split(':')[0]]
  assert [row.split(':')[0] for row in rows] == ['32x32x16', '16x16x32', '8x8x64']
  for row in rows:
    assert 'forward_conv ' in row and ' xla ' in row


def _readme_numbers(tmp_path, *steps):
  """Runs benchmarks/readme_numbers.sh with a stand-in `python` that records its arguments;
  returns (the completed process, one argument string per python command)."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'python_calls.txt'
  bin_dir.mkdir()
  (bin_dir / 'python').write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
  (bin_dir / 'python').chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', OUT=str(tmp_path / 'out'))
  run = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'readme_numbers.sh'), *steps],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
  return run, log.read_text().splitlines() if log.exists() else []


def test_readme_numbers_runs_each_paper_with_the_readme_settings(tmp_path):
  run, calls = _readme_numbers(tmp_path, 'papers')
  assert run.returncode == 0, run.stderr
  papers = ['ioffe2015', 'hoffer2017', 'wu_he2018', 'wu_johnson2021', 'santurkar2018']
  assert [c.split()[0] for c in calls] == [f'experiments/papers/{p}.py' for p in papers]
  for paper, call in zip(papers, calls):
    assert f'--workdir={tmp_path}/out/papers/{paper}' in call.split()
    assert '--config.data=idx:/usr/share/datasets/fashion-mnist' in call.split()
    assert not any(a.startswith('--config.train_examples') for a in call.split())  # defaults
  timed = [line for line in run.stdout.splitlines() if line.startswith('== ')
           and line.endswith(' s') and ': python' not in line]
  assert len(timed) == len(papers)  # each step's wall time, printed after it
  float(timed[0].split()[-2])


def test_readme_numbers_refuses_an_unknown_step(tmp_path):
  run, calls = _readme_numbers(tmp_path, 'resnet20_precise', 'no_such_step')
  assert run.returncode == 2 and 'unknown step no_such_step' in run.stdout
  assert len(calls) == 1 and '--config.precise_bn_examples=6000' in calls[0].split()


def test_readme_numbers_runs_the_readme_cnn_claims_commands(tmp_path):
  with open(os.path.join(ROOT, 'docs', 'claims.md')) as f:  # the CNN claims' commands
    readme = [line.split() for line in f if line.startswith('python experiments/claims.py')
              and '--config.model=cnn' in line]
  assert len(readme) == 2  # claims 1-2, then the others
  run, calls = _readme_numbers(tmp_path, 'cnn_claims')
  assert run.returncode == 0, run.stderr
  assert len(calls) == len(readme)
  for command, call in zip(readme, calls):
    args = call.split()
    assert args[0] == command[1] == 'experiments/claims.py'
    workdir = next(a for a in command if a.startswith('--workdir='))
    assert f'--workdir={tmp_path}/out/{os.path.basename(workdir)}' in args
    # Every setting of the documented command, and no other claim or eval setting.
    assert set(command[2:]) - {workdir} <= set(args), call
    assert {a.split('=')[0] for a in args} - {a.split('=')[0] for a in command} <= {
        '--config.progress', '--config.compilation_cache_dir'}, call


def test_torch_grid_reports_what_the_bn_jax_grid_does():
  """speed.py's PyTorch grid does the bn_jax grid's work: for every configuration the metrics
  of a bn_jax record's `final` (train, val, test, train_eval), each over its whole split."""
  pytest.importorskip('torch')
  speed = load_script('speed', 'benchmarks')
  dataset = data.load('synthetic:600')
  out = speed.torch_grid(dataset, epochs=1)
  results, _ = loop.fit(models.create_model('mlp', norm='batch'), dataset, batch_size=256,
                        epochs=1, progress=False)
  assert set(out['final']) == {f'{n}/{b}' for n in ('batch', 'none') for b in speed.BATCH_SIZES}
  sizes = dataset.sizes()
  for final in out['final'].values():
    assert set(final) == set(results[0]['final'])
    for split in ('train', 'val', 'test', 'train_eval'):
      n = sizes['train' if split == 'train_eval' else split]
      correct = final[f'{split}_accuracy'] * n  # a whole number of the split's n examples
      assert abs(correct - round(correct)) < 1e-6 and 0 <= correct <= n
      assert 0 < final[f'{split}_loss'] < 10


def test_device_check_runs_existing_tests_and_speed_flags():
  with open(os.path.join(ROOT, 'benchmarks', 'device_check.sh')) as f:
    script = f.read()
  listed = re.findall(r'tests/test_\w+\.py', script)
  assert len(listed) == 7 and all(os.path.exists(os.path.join(ROOT, t)) for t in listed)
  flags = re.findall(r'--(\w+)', script.split('benchmarks/speed.py')[1].split('\n\n')[0])
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'speed.py'), '--help'],
                       capture_output=True, text=True, timeout=HANG_SECONDS, check=True)
  assert flags and all(f'--{flag}' in out.stdout for flag in flags), flags
  assert subprocess.run(['bash', '-n', os.path.join(ROOT, 'benchmarks', 'device_check.sh')],
                        check=False).returncode == 0
