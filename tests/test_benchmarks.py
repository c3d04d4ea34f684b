"""The benchmark scripts run end to end (tiny settings; their timings are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

from _limits import HANG_SECONDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_speed_benchmark_writes_every_section(tmp_path):
  out = tmp_path / 'speed.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'speed.py'),
                        '--data=synthetic:600', '--epochs=1', '--seed_counts=1,2',
                        '--skip_torch', f'--out={out}'], capture_output=True, text=True,
                       timeout=HANG_SECONDS, env=env, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert {'grid_cold', 'grid_warm', 'seeds', 'matmul_flops', 'throughput',
          'cnn_step_ms'} <= set(result)
  assert set(result['cnn_step_ms']) == {'patches', 'xla'}
  assert set(result['seeds']['train_seconds']) == {'1', '2'}
  assert set(result['throughput']) == {'32', '256'}
  assert 'grid cold' in run.stdout


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
