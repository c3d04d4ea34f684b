"""Claims made for BN, measured: effects over seeds with 95% intervals, verdicts by a stated
rule, and the BN-specific measurements the claims need (gradient norms per layer, shifted
inputs, statistics re-estimated by a full pass, accuracy with batch statistics)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

RULE = ('effect = BN minus no BN (per seed, paired), signed so that the claim predicts > 0; '
        'supported if its 95% t-interval over seeds lies above 0, not supported if it lies '
        'below 0, inconclusive if it contains 0')


def effect(values, sign=1.0):
  """Mean and 95% t-interval over seeds of `sign * values` (paired differences)."""
  d = sign * np.asarray(values, float)
  d = d[np.isfinite(d)]
  if len(d) < 2:
    return (float(d.mean()) if len(d) else math.nan), (math.nan, math.nan)
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return float(d.mean()), (float(d.mean() - half), float(d.mean() + half))


def verdict(interval):
  """The rule: 'supported' / 'not supported' / 'inconclusive' from a 95% interval."""
  low, high = interval
  if low > 0:
    return 'supported'
  if high < 0:
    return 'not supported'
  return 'inconclusive'


def layer_grad_norms(apply_fn, variables, images, labels):
  """L2 norm of the loss gradient of each Dense kernel, input layer first (eval-free: BN in
  train mode, no dropout rng needed when dropout is 0)."""

  def loss(params):
    logits, _ = apply_fn({**variables, 'params': params}, images, train=True,
                         mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(variables['params'])
  names = sorted((k for k in grads if k.startswith('Dense_')), key=lambda k: int(k[6:]))
  return [float(jnp.linalg.norm(grads[k]['kernel'])) for k in names]


def shift(images, a, b):
  """Brightness/contrast shift x * a + b of images in [0, 1] (not clipped)."""
  return images * a + b


def full_pass_batch_stats(model, variables, images):
  """BN statistics of one pass over all `images` (momentum 0, dropout off): the running
  averages a model would have if they were exactly this data's statistics."""
  exact = model.clone(bn_momentum=0.0, dropout=0.0)
  _, updates = exact.apply(variables, images, train=True, mutable=['batch_stats'])
  return updates['batch_stats']


def accuracy(model, variables, images, labels, batch_statistics=0):
  """Accuracy in eval mode (running averages) or, with `batch_statistics=B`, normalizing each
  batch of B examples by its own statistics (train-mode BN, dropout off)."""
  if not batch_statistics:
    logits = model.apply(variables, images, train=False)
    return float((logits.argmax(-1) == labels).mean())
  n = len(labels) // batch_statistics * batch_statistics
  plain = model.clone(dropout=0.0)
  batches = images[:n].reshape((-1, batch_statistics) + images.shape[1:])
  logits = jax.lax.map(lambda x: plain.apply(variables, x, train=True,
                                             mutable=['batch_stats'])[0], batches)
  return float((logits.reshape(n, -1).argmax(-1) == labels[:n]).mean())
