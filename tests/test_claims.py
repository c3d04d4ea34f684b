"""The claims study's measurements on hand-made inputs, and the script end to end (its verdict
rule is tested in test_verdicts.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _limits import HANG_SECONDS
from _scripts import load_script

from bn_jax import claims
from bn_jax import cli
from bn_jax import loop
from bn_jax import models
from bn_jax import settings
from bn_jax import sweep


def _mlp(**kwargs):
  model = models.create_model('mlp', hidden=(6,), dropout=0.0, **kwargs)
  x = jax.random.uniform(jax.random.key(0), (40, 28, 28, 1))
  y = jax.random.randint(jax.random.key(1), (40,), 0, 10)
  return model, model.init(jax.random.key(2), x, train=False), x, y


@pytest.mark.slow
def test_shift_by_one_and_zero_reproduces_the_unshifted_accuracy():
  model, variables, x, y = _mlp(norm='batch')
  assert claims.accuracy(model, variables, claims.shift(x, 1.0, 0.0), y) == (
      claims.accuracy(model, variables, x, y))
  assert claims.accuracy(model, variables, x, y, batch_statistics=8) >= 0.0
  # In chunks (7 does not divide the 40 examples) it counts every example once.
  direct = np.mean(np.asarray(model.apply(variables, x, train=False)).argmax(-1) == np.asarray(y))
  assert claims.accuracy(model, variables, x, y, chunk=7) == pytest.approx(direct, abs=1e-12)


def test_reestimated_statistics_equal_a_full_pass_by_hand():
  model, variables, x, _ = _mlp(norm='batch')
  stats = claims.full_pass_batch_stats(model, variables, x)['BatchNorm_0']
  h = np.asarray(x).reshape(40, -1) @ np.asarray(variables['params']['Dense_0']['kernel'])
  np.testing.assert_allclose(stats['mean'], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], h.var(0), rtol=1e-4, atol=1e-6)


def test_layer_gradient_norms_match_a_hand_computation():
  model, variables, x, y = _mlp(norm='none')
  p = jax.tree.map(np.asarray, variables['params'])
  xf = np.asarray(x, np.float64).reshape(40, -1)
  z1 = xf @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  a = np.maximum(z1, 0)
  z2 = a @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  prob = np.exp(z2 - z2.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  dz2 = (prob - np.eye(10)[np.asarray(y)]) / 40  # mean cross-entropy
  dw2 = a.T @ dz2
  dw1 = xf.T @ ((dz2 @ p['Dense_1']['kernel'].T) * (z1 > 0))
  norms = claims.layer_grad_norms(model.apply, variables, x, y)
  np.testing.assert_allclose(norms, [np.linalg.norm(dw1), np.linalg.norm(dw2)], rtol=1e-4)


@pytest.mark.slow
def test_layer_gradient_norms_of_a_cnn_run_from_input_to_output():
  # 11 conv layers: Conv_10 must follow Conv_9 (numeric, not text order), then the Dense ones.
  model = models.create_model('cnn', norm='batch', features=(2,) * 11, dense=4, dropout=0.0)
  x = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
  y = jnp.arange(6) % 10
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = jax.grad(loss)(variables['params'])
  names = [f'Conv_{i}' for i in range(11)] + ['Dense_0', 'Dense_1']
  expected = [np.linalg.norm(grads[n]['kernel']) for n in names]
  np.testing.assert_allclose(claims.layer_grad_norms(model.apply, variables, x, y), expected,
                             rtol=1e-6)


@pytest.mark.slow
def test_study_trains_through_the_sweep_once_and_keeps_final_states(tmp_path, monkeypatch):
  config = settings.base_config()
  config.update(data='synthetic:200', seeds=2, epochs=1, progress=False, hidden=(8,),
                compilation_cache=False, devices=1)
  trained = []
  fit = loop.fit
  monkeypatch.setattr(loop, 'fit', lambda *a, **k: trained.append(k['seeds']) or fit(*a, **k))
  study = sweep.Study(config, sweep.load_data(config), str(tmp_path))
  first = study.runs([{'norm': 'none', 'learning_rate': 1e-3}, {'norm': 'batch'}])
  assert [[r['seed'] for r in rs] for rs in first] == [[0, 1], [0, 1]]
  again = sweep.Study(config, sweep.load_data(config), str(tmp_path)).runs([{'norm': 'none'}])
  assert again[0] == first[0] and trained == [[0, 1], [0, 1]]  # the default rate: same run
  variables = study.variables(first[1][1])
  model = study.model(norm='batch')
  x = study.dataset.val_images
  # The saved state is the run's: it reproduces its validation accuracy (1/20 per example).
  assert claims.accuracy(model, variables, x, study.dataset.val_labels) == pytest.approx(
      first[1][1]['final']['val_accuracy'], abs=1e-6)


@pytest.mark.slow
def test_claims_script_cnn_depth_quick(tmp_path):
  out = _run_script(tmp_path, '--config.model=cnn', '--config.claims=depth')
  assert out.returncode == 0, out.stderr[-3000:]
  table = (tmp_path / 'claims.md').read_text()
  assert 'final val acc at depth 3 (cnn, width 16)' in table
  assert (tmp_path / 'claims' / 'depth.png').read_bytes()[:4] == b'\x89PNG'


def _run_script(workdir, *flags):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, os.path.join(root, 'experiments', 'claims.py'),
                         f'--workdir={workdir}', '--config.quick=true',
                         '--config.compilation_cache=false', *flags], capture_output=True,
                        text=True, timeout=HANG_SECONDS, env=env, check=False)


@pytest.mark.slow
def test_claims_script_quick_mode_end_to_end(tmp_path):
  out = _run_script(tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  table = (tmp_path / 'claims.md').read_text()
  rows = [line for line in table.splitlines() if line.startswith('| ') and 'claim |' not in line]
  # lr + convergence (3), init (1), depth (2, one activation), regularization (1), shift (2),
  # overhead (1), batch size (1: not run here), inference (2), ics (1)
  assert len(rows) == 14
  for line in rows:
    assert any(v in line for v in ('| supported |', '| contradicted |', '| inconclusive |',
                                   '| invalid setup (', '| not run |'))
  assert 'Verdict rule:' in table
  for name in ('lr', 'init', 'depth', 'regularization', 'shift', 'overhead', 'inference',
               'ics'):
    assert (tmp_path / 'claims' / f'{name}.png').read_bytes()[:4] == b'\x89PNG'


def test_quick_preset_yields_to_command_line_flags():
  script = load_script('claims', 'experiments')
  config = cli.resolve(script.get_config(), {'quick': True, 'seeds': 5}, {'quick': script.quick})
  assert config.seeds == 5  # the flag wins over the preset's 2 ...
  assert config.data == 'synthetic:800' and config.epochs == 1  # ... the rest of the preset holds
  assert cli.resolve(script.get_config(), {'seeds': 5}, {'quick': script.quick}).data == (
      settings.base_config().data)  # no preset unless asked for
