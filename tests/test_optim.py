"""Optimizers, weight-decay masks and schedules against updates and rates worked out by hand."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import models
from bn_jax import norms
from bn_jax import optim
from bn_jax import train

LR, MU = 0.1, 0.9
P0 = np.array([1.0, -2.0], np.float32)
G1 = np.array([0.5, 1.0], np.float32)
G2 = np.array([-1.0, 2.0], np.float32)


def _steps(tx, params, grads):
  """Applies `tx` with each gradient in turn; returns (params, opt_state)."""
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _names(path):
  return tuple(k.key for k in path)


def test_sgd_momentum_nesterov_two_steps_by_hand():
  # sgd: p2 = p0 - lr g1 - lr g2.
  # momentum (heavy ball): v1 = g1, p1 = p0 - lr v1; v2 = mu v1 + g2, p2 = p1 - lr v2.
  # nesterov as optax.trace defines it: v_t = g_t + mu v_{t-1}, update -lr (g_t + mu v_t):
  #   v1 = g1, p1 = p0 - lr (g1 + mu v1); v2 = g2 + mu v1, p2 = p1 - lr (g2 + mu v2).
  v1 = G1
  v2 = MU * v1 + G2
  expected = {
      'sgd': P0 - LR * G1 - LR * G2,
      'momentum': P0 - LR * v1 - LR * v2,
      'nesterov': P0 - LR * (G1 + MU * v1) - LR * (G2 + MU * v2),
  }
  for name, want in expected.items():
    tx = optim.make_optimizer(name, learning_rate=LR, momentum=MU)
    params, _ = _steps(tx, {'w': jnp.asarray(P0)}, [{'w': G1}, {'w': G2}])
    np.testing.assert_allclose(params['w'], want, rtol=1e-6, err_msg=name)


def test_momentum_on_a_dense_layer_with_squared_loss():
  # f(x) = x W + b, loss = (f(x) - y)^2 / 2: dL/dW = x^T r, dL/db = r with r = f(x) - y.
  model = nn.Dense(1)
  x, y = np.array([[1.0, 2.0]], np.float32), np.array([[3.0]], np.float32)
  params = {'kernel': jnp.array([[0.5], [-1.0]]), 'bias': jnp.array([0.25])}
  tx = optim.make_optimizer('momentum', learning_rate=LR, momentum=MU)
  state = tx.init(params)
  loss = lambda p: 0.5 * jnp.sum((model.apply({'params': p}, x) - y) ** 2)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  w, b = np.array([[0.5], [-1.0]]), np.array([0.25])
  r1 = x @ w + b - y
  v1w, v1b = x.T @ r1, r1[0]
  w1, b1 = w - LR * v1w, b - LR * v1b
  r2 = x @ w1 + b1 - y
  v2w, v2b = MU * v1w + x.T @ r2, MU * v1b + r2[0]
  np.testing.assert_allclose(params['kernel'], w1 - LR * v2w, rtol=1e-6)
  np.testing.assert_allclose(params['bias'], b1 - LR * v2b, rtol=1e-6)


@pytest.mark.parametrize('norm', norms.NORMS)
def test_decay_mask_is_true_only_for_kernels(norm):
  kw = {'bn_group_size': 2} if norm == 'ghost' else {}
  model = models.create_model('mlp', norm=norm, hidden=(32,), **kw)
  params = model.init({'params': jax.random.key(0)}, jnp.zeros((2, 28, 28, 1)),
                      train=False)['params']
  leaves = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
  assert {_names(p)[-1] for p, _ in leaves} >= {'kernel', 'bias'}
  for path, decays in leaves:
    assert decays == (_names(path)[-1] == 'kernel'), _names(path)


def _shrink_factors(p, wd):
  """New / old value after one step with zero loss gradient and weight decay `wd`."""
  return {
      'sgd': 1 - LR * wd,  # p - lr (0 + wd p)
      'momentum': 1 - LR * wd,  # v1 = wd p
      'nesterov': 1 - LR * (1 + MU) * wd,  # -lr (g + mu v1) with g = v1 = wd p
      'adamw': 1 - LR * wd,  # Adam's part is 0 / (0 + eps) = 0; decoupled -lr wd p
      # Adam of the L2 gradient g = wd p: bias-corrected m = g, v = g^2: -lr g / (|g| + eps).
      'adam': 1 - LR * wd / (wd * np.abs(p) + 1e-8),
  }


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
@pytest.mark.parametrize('norms_and_biases', [False, True])
def test_weight_decay_mask_on_a_batchnorm_mlp(name, norms_and_biases):
  wd = 0.01
  model = models.create_model('mlp', norm='batch', hidden=(4,))
  params = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 28, 28, 1)),
                      train=False)['params']
  params = jax.tree.map(lambda x: x + 0.5, params)  # BN bias starts at 0: make shrinking show
  tx = optim.make_optimizer(name, learning_rate=LR, weight_decay=wd,
                            weight_decay_norms_and_biases=norms_and_biases)
  new, _ = _steps(tx, params, [jax.tree.map(jnp.zeros_like, params)])
  seen = set()
  for (path, old), (_, got) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0]
                                     for t in (params, new))):
    names = _names(path)
    seen.add(names)
    old = np.asarray(old)
    if names[-1] == 'kernel' or norms_and_biases:
      # atol: Adam's bias correction divides by 1 - 0.999, off by ~1e-5 in float32.
      np.testing.assert_allclose(got, old * _shrink_factors(old, wd)[name], rtol=1e-5,
                                 atol=1e-6, err_msg=str(names))
    else:
      np.testing.assert_array_equal(got, old, err_msg=str(names))
  assert {('BatchNorm_0', 'scale'), ('BatchNorm_0', 'bias'), ('Dense_1', 'bias'),
          ('Dense_0', 'kernel'), ('Dense_1', 'kernel')} <= seen


def test_schedules_by_hand():
  sched = functools.partial(optim.lr_schedule, base_lr=0.1, steps_per_epoch=10,
                            total_steps=100)
  assert sched('constant') == 0.1  # a float: nothing to schedule
  cases = {
      # linear warm-up over 2 epochs = 20 steps: 0.1 * t / 20, then flat.
      sched('constant', warmup_epochs=2): {0: 0.0, 10: 0.05, 19: 0.1 * 19 / 20, 20: 0.1,
                                          99: 0.1},
      # x0.1 from the first step of epochs 3 and 6 (steps 30 and 60).
      sched('step', decay_epochs=(3, 6)): {0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001,
                                           99: 0.001},
      # ... with a 1-epoch warm-up in front; the boundaries stay at steps 30 and 60.
      sched('step', warmup_epochs=1, decay_epochs=(3, 6), decay_factor=0.5):
          {0: 0.0, 5: 0.05, 10: 0.1, 29: 0.1, 30: 0.05, 59: 0.05, 60: 0.025},
      # 0.1 * (1 + cos(pi t / 100)) / 2.
      sched('cosine'): {0: 0.1, 25: 0.05 * (1 + math.cos(math.pi / 4)), 50: 0.05, 100: 0.0},
      # warm-up to step 20, then 0.1 * (1 + cos(pi (t - 20) / 80)) / 2.
      sched('warmup_cosine', warmup_epochs=2): {0: 0.0, 10: 0.05, 20: 0.1, 60: 0.05,
                                                100: 0.0},
  }
  for schedule, rates in cases.items():
    for step, want in rates.items():
      np.testing.assert_allclose(schedule(step), want, rtol=1e-6, atol=1e-9,
                                 err_msg=f'step {step}')


def test_stored_rate_is_the_rate_of_the_last_update():
  # Convention of optax.inject_hyperparams: the update with count c (0-based) uses
  # schedule(c) and stores it, so after k updates the state holds schedule(k - 1); after
  # init it holds schedule(0), the rate of the first update.
  schedule = optim.lr_schedule('step', base_lr=0.1, steps_per_epoch=2, total_steps=10,
                               decay_epochs=(1, 2))  # 0.1, 0.1, 0.01, 0.01, 0.001, ...
  tx = optim.make_optimizer('sgd', learning_rate=schedule)
  params = {'kernel': jnp.zeros(())}
  state = tx.init(params)
  np.testing.assert_allclose(state.hyperparams['learning_rate'], 0.1)
  for k in range(1, 7):
    updates, state = tx.update({'kernel': jnp.ones(())}, state, params)
    np.testing.assert_allclose(-updates['kernel'], schedule(k - 1), rtol=1e-6)
    np.testing.assert_allclose(state.hyperparams['learning_rate'], schedule(k - 1), rtol=1e-6)


def test_stored_rate_under_vmap_over_seeds_with_tx_static_in_jit():
  schedule = optim.lr_schedule('warmup_cosine', base_lr=0.1, steps_per_epoch=2,
                               total_steps=20, warmup_epochs=2)
  tx = optim.make_optimizer('nesterov', learning_rate=schedule, weight_decay=1e-4)
  hash(tx)  # a static jit argument must hash
  model = models.create_model('mlp', norm='batch', hidden=(4,))

  # How init_states can take a tx: static, closed over by the vmapped function.
  @functools.partial(jax.jit, static_argnums=(0, 3, 4))
  def init_states(model, rngs, learning_rate, input_shape, tx):
    return jax.vmap(lambda r: train.create_train_state(model, r, learning_rate, input_shape,
                                                       tx))(rngs)

  states = init_states(model, jax.random.split(jax.random.key(0), 3), 0.0, (1, 28, 28, 1), tx)
  assert states.tx is tx
  step = jax.jit(jax.vmap(lambda s: s.apply_gradients(
      grads=jax.tree.map(jnp.zeros_like, s.params))))
  for k in range(1, 7):
    states = step(states)
    rate = states.opt_state.hyperparams['learning_rate']
    assert rate.shape == (3,)
    np.testing.assert_allclose(rate, np.full(3, schedule(k - 1)), rtol=1e-6)


def test_equal_constant_rate_arguments_give_one_optimizer_object():
  """States built with it share their static optimizer, so configurations that differ only in
  batch size share one optimizer-state program; a schedule gives a new object every time."""
  adam = optim.make_optimizer('adam', learning_rate=1e-3)
  assert optim.make_optimizer('adam', learning_rate=0.001) is adam
  assert optim.make_optimizer('adam', learning_rate=2e-3) is not adam
  assert optim.make_optimizer('adamw', learning_rate=1e-3) is not adam
  momentum = optim.make_optimizer('momentum', learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
  assert optim.make_optimizer('momentum', learning_rate=0.1, momentum=0.9,
                              weight_decay=1e-4) is momentum
  assert optim.make_optimizer('momentum', learning_rate=0.1, momentum=0.5,
                              weight_decay=1e-4) is not momentum
  schedule = optax.constant_schedule(0.1)
  assert (optim.make_optimizer('sgd', learning_rate=schedule)
          is not optim.make_optimizer('sgd', learning_rate=schedule))


def test_create_train_state_default_is_adam():
  model = models.create_model('mlp', norm='batch', hidden=(4,))
  state = train.create_train_state(model, jax.random.key(0), 1e-3)
  np.testing.assert_allclose(state.opt_state.hyperparams['learning_rate'], 1e-3)
  assert set(state.opt_state.hyperparams) == {'learning_rate'}  # make_optimizer's Adam
  grads = jax.tree.map(lambda p: jnp.full_like(p, -0.5), state.params)
  moved = state.apply_gradients(grads=grads)  # Adam's first step: lr * g / |g| = -lr
  for old, new in zip(jax.tree.leaves(state.params), jax.tree.leaves(moved.params)):
    np.testing.assert_allclose(new - old, 1e-3, rtol=1e-4)


def test_adam_rounds_as_plain_optax_adam():
  """make_optimizer's Adam (only the rate injected) is bit for bit `optax.adam`: its 1 - b1 and
  1 - b2 come from Python floats. Injecting b1 and b2 too (bn_jax before commit b60661e) computes
  them in float32 (1 - 0.9f = 0.100000024), which moved every Adam run's numbers."""
  params = {'w': jnp.linspace(-1.0, 1.0, 1000)}
  grads = [{'w': jnp.sin(jnp.arange(1000.0) + k)} for k in range(3)]
  run = lambda tx: np.asarray(jax.jit(lambda p: _steps(tx, p, grads)[0])(params)['w'])
  ours = run(optim.make_optimizer('adam', learning_rate=0.01))
  np.testing.assert_array_equal(ours, run(optax.adam(0.01)))
  assert not np.array_equal(ours, run(optax.inject_hyperparams(optax.adam)(learning_rate=0.01)))


@pytest.mark.parametrize('call, message', [
    (lambda: optim.make_optimizer('lamb', learning_rate=0.1), 'optimizer must be one of'),
    (lambda: optim.make_optimizer('sgd', learning_rate=0.1, weight_decay=-1.0),
     'weight_decay must be >= 0'),
    (lambda: optim.make_optimizer('momentum', learning_rate=0.1, momentum=1.0),
     'momentum must be in [0, 1)'),
    (lambda: optim.lr_schedule('linear', base_lr=0.1, steps_per_epoch=10, total_steps=100),
     'lr_schedule must be one of'),
    (lambda: optim.lr_schedule('step', base_lr=0.1, steps_per_epoch=10, total_steps=100,
                               decay_epochs=(60, 30)),
     "lr_decay_epochs must be increasing positive epochs, got (60, 30): e.g. "
     "--config.lr_decay_epochs='(30,60)'"),
    (lambda: optim.lr_schedule('step', base_lr=0.1, steps_per_epoch=10, total_steps=100,
                               decay_epochs=(0, 5)), 'lr_decay_epochs must be increasing'),
    (lambda: optim.lr_schedule('step', base_lr=0.1, steps_per_epoch=10, total_steps=100,
                               warmup_epochs=3, decay_epochs=(2, 5)),
     'lr_decay_epochs must come after warmup_epochs=3'),
    (lambda: optim.lr_schedule('step', base_lr=0.1, steps_per_epoch=10, total_steps=100,
                               decay_epochs=(3,), decay_factor=0.0), 'lr_decay_factor must'),
    (lambda: optim.lr_schedule('warmup_cosine', base_lr=0.1, steps_per_epoch=10,
                               total_steps=100, warmup_epochs=10),
     'warmup_epochs must be >= 0 and shorter than the budget of 10 epochs'),
    (lambda: optim.lr_schedule('cosine', base_lr=0.1, steps_per_epoch=10, total_steps=100,
                               warmup_epochs=1), '--config.lr_schedule=warmup_cosine'),
    (lambda: jax.jit(lambda lr: optim.lr_schedule(
        'cosine', base_lr=lr, steps_per_epoch=10, total_steps=100)(0))(0.1),
     'must be a Python number'),
])
def test_errors_name_the_setting(call, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    call()
