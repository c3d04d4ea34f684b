"""Claims made for BN, measured (their verdicts: `bn_jax.verdicts`; their runs:
`sweep.Study`): the BN-specific measurements the claims need (gradient norms per layer, shifted
inputs, statistics re-estimated by a full pass, accuracy with batch statistics)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_jax import precise_bn


def layer_grad_norms(apply_fn, variables, images, labels):
  """L2 norm of the loss gradient of each Conv / Dense kernel, input layer first (BN in train
  mode; no dropout rng is needed when dropout is 0)."""

  def loss(params):
    logits, _ = apply_fn({**variables, 'params': params}, images, train=True,
                         mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(variables['params'])
  layers = [re.fullmatch(r'(Conv|Dense)_(\d+)', name) for name in grads]
  order = sorted((m[1] == 'Dense', int(m[2]), m[0]) for m in layers if m)  # convs come first
  return [float(jnp.linalg.norm(grads[name]['kernel'])) for _, _, name in order]


def shift(images, a, b):
  """Brightness/contrast shift x * a + b of images in [0, 1] (not clipped)."""
  return images * a + b


def full_pass_batch_stats(model, variables, images):
  """BN statistics of one pass over all `images` (PreciseBN with a single batch): the running
  averages a model would have if they were exactly this data's statistics."""
  return precise_bn.population_stats(model, variables, images, batch_size=len(images))


def accuracy(model, variables, images, labels, batch_statistics=0, chunk=500):
  """Accuracy in eval mode (running averages, `chunk` examples at a time) or, with
  `batch_statistics=B`, normalizing each batch of B examples by its own statistics (train-mode
  BN, dropout off)."""
  if not batch_statistics:
    predicted = np.concatenate([_predict(model, variables, images[i:i + chunk])
                                for i in range(0, len(labels), chunk)])
    return float((predicted == np.asarray(labels)).mean())
  n = len(labels) // batch_statistics * batch_statistics
  plain = precise_bn.without_dropout(model)
  batches = images[:n].reshape((-1, batch_statistics) + images.shape[1:])
  logits = jax.lax.map(lambda x: plain.apply(variables, x, train=True,
                                             mutable=['batch_stats'])[0], batches)
  return float((logits.reshape(n, -1).argmax(-1) == labels[:n]).mean())


@functools.partial(jax.jit, static_argnums=0)  # Flax modules hash by their settings
def _predict(model, variables, images):
  return model.apply(variables, images, train=False).argmax(-1)
