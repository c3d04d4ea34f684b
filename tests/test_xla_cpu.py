"""XLA's CPU compiler at -O1 on CPU-only installs: when the flag is set, and the same numbers."""

import hashlib
import os
import subprocess
import sys

import pytest

from _limits import HANG_SECONDS

from bn_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean(monkeypatch, xla_flags=None):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  if xla_flags is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', xla_flags)


def test_the_flag_joins_the_users_flags(monkeypatch):
  _clean(monkeypatch, '--xla_force_host_platform_device_count=8')
  assert xla_cpu.prefer_fast_compiles()
  assert os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=8 '
                                     '--xla_backend_optimization_level=1')
  assert not xla_cpu.prefer_fast_compiles()  # once only
  _clean(monkeypatch)
  assert xla_cpu.prefer_fast_compiles()
  assert os.environ['XLA_FLAGS'] == '--xla_backend_optimization_level=1'


def test_a_level_the_user_set_is_kept(monkeypatch):
  _clean(monkeypatch, '--xla_backend_optimization_level=3')
  assert not xla_cpu.prefer_fast_compiles()
  assert os.environ['XLA_FLAGS'] == '--xla_backend_optimization_level=3'


def test_an_installed_accelerator_plugin_keeps_xlas_default(monkeypatch):
  _clean(monkeypatch)
  plugins = lambda group: ['jax_cuda12_plugin'] if group == 'jax_plugins' else []
  monkeypatch.setattr(xla_cpu.importlib.metadata, 'entry_points', plugins)
  assert not xla_cpu.cpu_only()
  assert not xla_cpu.prefer_fast_compiles() and 'XLA_FLAGS' not in os.environ
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # the user picked the CPU: it applies again
  assert xla_cpu.cpu_only() and xla_cpu.prefer_fast_compiles()


TRAIN = r'''
import hashlib, os, sys
import jax, numpy as np
import bn_jax
from bn_jax import data, loop, models
print(os.environ.get('XLA_FLAGS', ''))
dataset = data.load('synthetic:300:16x16x3', val_fraction=0.2)
digest = hashlib.sha256()
for name, norm in (('mlp', 'batch'), ('cnn', 'batch'), ('cnn', 'group')):
  model = models.create_model(name, norm=norm, **({'norm_groups': 4} if norm == 'group' else {}))
  _, states = loop.fit(model, dataset, seeds=(0, 1), batch_size=32, epochs=1, progress=False)
  for leaf in jax.tree.leaves((states.params, states.batch_stats, states.opt_state)):
    digest.update(np.asarray(leaf).tobytes())
print(digest.hexdigest())
'''


@pytest.mark.slow
def test_o1_trains_bit_identical_parameters_to_xlas_default():
  """Two processes train an MLP and two CNNs: `import bn_jax` sets -O1 in one, the user's
  XLA_FLAGS keeps XLA's default -O3 in the other; every parameter and optimizer state bit
  agrees."""
  outputs = {}
  for level in ('', '--xla_backend_optimization_level=3'):
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
    env.update(XLA_FLAGS=level, JAX_ENABLE_COMPILATION_CACHE='false')
    done = subprocess.run([sys.executable, '-c', TRAIN], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=HANG_SECONDS, check=True)
    flags, digest = done.stdout.split('\n')[-3:-1]
    outputs[level] = (flags, digest)
  assert outputs[''][0] == '--xla_backend_optimization_level=1'
  assert outputs['--xla_backend_optimization_level=3'][0] == '--xla_backend_optimization_level=3'
  assert outputs[''][1] == outputs['--xla_backend_optimization_level=3'][1]
  assert len(outputs[''][1]) == len(hashlib.sha256().hexdigest())
