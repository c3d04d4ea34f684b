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
from bn_jax import verdicts


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


def table(rows, config, seconds):
  """The claims study's claims.md: its findings decided together (`verdicts.decide`), their gates and the
  rule."""
  tested = verdicts.decide([r for r in rows if not r.get('not_run')])
  decided = iter(tested)
  rows = [{**r, 'verdict': 'not run'} if r.get('not_run') else next(decided) for r in rows]
  lines = [f'# Claims for BN: {config.model} on {config.data}, {config.seeds} seeds, '
           f'{config.epochs} epochs, batch {config.batch_size}, lr {config.learning_rate:g}',
           '', f'Verdict rule: {verdicts.RULE}.', '',
           '| claim | experiment | effect, 95% interval [adjusted] | gates | verdict | details |',
           '|---|---|---|---|---|---|']
  for r in rows:
    gates = f"{len(r['gates']) - len(r['failed'])} of {len(r['gates'])} passed"
    lines.append(f'| {r["finding"]} | {r["experiment"]} | {verdicts.effect_text(r)} '
                 f'{r["unit"]} | {gates} | {r["verdict"]} | {r["details"]} |')
  lines += ['', 'Gates:'] + [f"- {r['finding']}: {'; '.join(r['gates'])}." for r in rows]
  shape = ({'mlp': f'The MLP has hidden layers {tuple(config.hidden)}: one layer is a weak '
            'test of claims about depth and optimization, which is why claim 4 uses deeper '
            'MLPs.', 'cnn': f'The CNN has 3x3 conv blocks of {tuple(config.features)} channels; '
            'claim 4 stacks more of them.'}[config.model])
  if config.train_examples:
    shape += f' Trained on a subset of {config.train_examples} training examples.'
  lines += ['', f'{shape} Wall time: {seconds:.0f} s.', '']
  return '\n'.join(lines)
