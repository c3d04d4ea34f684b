"""Santurkar et al. 2018's measurements of a network at one point of training: internal
covariate shift (ICS) by their definition, and the loss landscape along the gradient.

Both take `loss(params) -> scalar` on one fixed batch (`train_loss` builds it for a bn_jax
model: train-mode BN statistics, the running-average updates discarded), or `loss(params,
*data)` with `data` passed along (`batch_loss`): then its compiled gradient is kept, and
measuring many networks and batches of one model compiles once. Weight layers are
the entries of `params` that hold a 'kernel', in the order the model created them (Flax keeps
creation order), and "the layers before layer i" are all entries created before it (norm
parameters included).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def train_loss(model, variables, images, labels, rng=None):
  """`loss(params)`: mean cross-entropy of `model` on (images, labels) in train mode with the
  given batch_stats (BN over this batch; dropout / BN noise from `rng`, none without)."""
  rngs = {'dropout': rng} if rng is not None else {}

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                            mutable=['batch_stats'], rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


@functools.lru_cache(maxsize=None)
def batch_loss(model):
  """`loss(params, variables, images, labels)`: `train_loss`'s loss without rng (no dropout;
  noisy BN applies its noise's mean), the data as arguments; the same function for the same
  model, for `internal_covariate_shift` and `landscape` with `data=(variables, images,
  labels)`."""

  def loss(params, variables, images, labels):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


@functools.lru_cache(maxsize=None)
def _compiled(loss, transform):
  """jit(transform(loss)), kept per (loss, transform): for losses that take their data as
  arguments."""
  return jax.jit(transform(loss))


def _jitted(loss, transform, data):
  """`f(params)`: the jitted `transform(loss)` at `data` (compiled once per loss when data is
  given, else afresh for this closure)."""
  if not data:
    return jax.jit(transform(loss))
  compiled = _compiled(loss, transform)
  return lambda params: compiled(params, *data)


def sgd_step(learning_rate):
  """`update(params, grads)`: one plain SGD step (Santurkar et al. train with SGD)."""
  return lambda params, grads: jax.tree.map(lambda w, g: w - learning_rate * g, params, grads)


def first_step(tx):
  """`update(params, grads)`: the first step of the Optax optimizer `tx` from a fresh state
  (plain SGD and momentum: -lr g; Adam: about -lr sign(g)), the step the layers before a layer
  take in `internal_covariate_shift` when a run's own optimizer state is not at hand."""

  def update(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  return update


def internal_covariate_shift(loss, params, update, data=()):
  """ICS of every weight layer i (Santurkar et al. 2018, Definition 2.1):
  G = grad of the loss w.r.t. W_i at the current weights, G' = the same gradient after the
  layers before i take their step `update(params, grads)` (layer i and those after it
  unchanged); returns [(layer name, ||G - G'||_2, cos(G, G'))], input layer first. The first
  layer has nothing before it: 0 and 1. With `data`, the loss is `loss(params, *data)`."""
  grad = _jitted(loss, jax.grad, data)
  grads = grad(params)
  stepped = update(params, grads)
  names = list(params)
  out = []
  for i, name in enumerate(names):
    if 'kernel' not in params[name]:
      continue
    moved = {n: stepped[n] if j < i else params[n] for j, n in enumerate(names)}
    before = np.asarray(grads[name]['kernel'], np.float64).ravel()
    after = np.asarray(grad(moved)[name]['kernel'], np.float64).ravel()
    cosine = before @ after / max(np.linalg.norm(before) * np.linalg.norm(after), 1e-30)
    out.append((name, float(np.linalg.norm(before - after)), float(cosine)))
  return out


def landscape(loss, params, step_sizes, data=()):
  """The loss landscape along the gradient g at `params` (Santurkar et al. 2018, §3.1): for each
  step size s, the loss at params - s g and the gradient change ||grad(params - s g) - g||.

  Returns:
    {'losses': [...], 'grad_changes': [...], 'loss_range': max - min of the losses,
     'beta': the largest gradient change per unit of parameter change, max over s of
     ||grad(params - s g) - g|| / ||s g|| (their "effective beta-smoothness")}.
  With `data`, the loss is `loss(params, *data)`.
  """
  value_and_grad = _jitted(loss, jax.value_and_grad, data)
  _, g = value_and_grad(params)
  flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  g_flat = flat(g)
  g_norm = float(jnp.linalg.norm(g_flat))
  losses, changes, betas = [], [], []
  for s in step_sizes:
    value, g_s = value_and_grad(jax.tree.map(lambda w, d: w - s * d, params, g))
    change = float(jnp.linalg.norm(flat(g_s) - g_flat))
    losses.append(float(value))
    changes.append(change)
    betas.append(change / max(s * g_norm, 1e-30))
  return {'losses': losses, 'grad_changes': changes,
          'loss_range': float(np.nanmax(losses) - np.nanmin(losses)),
          'beta': float(np.nanmax(betas))}
