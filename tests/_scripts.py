"""The tests' access to the scripts: `load_script` (a script as a module) and `run_quick` (a
script of experiments/papers/ in quick mode, its report.md; the reproductions' end-to-end
tests). A second call that trains nothing is the sweep's behaviour, tested once in
test_sweep.py and test_claims.py."""

import importlib.util
import os
import subprocess
import sys

from _limits import HANG_SECONDS

from bn_jax import papers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as a user runs


def load_script(name, folder=os.path.join('experiments', 'papers')):
  """<folder>/<name>.py (default: a paper's script) as a module: its get_config, presets,
  findings, or its `main` to run in this process."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


VERDICTS = ('**reproduced**', '**not reproduced**', '**inconclusive**', '**invalid setup')


def run_quick(tmp_path, script, *flags):
  """`script`'s quick mode in tmp_path/run; returns (report text, verdict rows)."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'papers', f'{script}.py'),
         f'--workdir={workdir}', '--config.quick=true', '--config.compilation_cache=false',
         *flags]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_SECONDS, env=ENV,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  report = (workdir / 'report.md').read_text()
  assert 'Data: `synthetic:' in report and papers.RULE in report
  plots = [line[line.index('(') + 1:-1] for line in report.splitlines() if line.startswith('![')]
  assert plots
  for plot in plots:
    assert (workdir / plot).read_bytes()[:4] == b'\x89PNG'
  rows = [line for line in report.splitlines() if any(v in line for v in VERDICTS)]
  return report, rows
