"""Optimizers and learning-rate schedules from config numbers, all built with Optax.

`make_optimizer` wraps its optimizer in `optax.inject_hyperparams`, so the rate is a state entry
(`opt_state.hyperparams['learning_rate']`) that vmaps over seeds. That entry is the rate of the
LAST update: `schedule(0)` after init, `schedule(k - 1)` after k updates.

Weight decay skips every `bias` and the `scale` / `bias` of norm layers by default (only leaves
named `kernel` decay). For sgd / momentum / nesterov / adam it is L2 added to the gradient before
the optimizer (the ResNet papers' "SGD with weight decay"); adamw decays decoupled, same mask.
"""

import functools

import jax
import optax

OPTIMIZERS = ('adam', 'sgd', 'momentum', 'nesterov', 'adamw')
SCHEDULES = ('constant', 'cosine', 'step', 'warmup_cosine')


def decay_mask(params):
  """True for the leaves that weight decay shrinks: those named `kernel` (Conv, Dense)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(path) and getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(name='adam', *, learning_rate, momentum=0.9, weight_decay=0.0,
                   weight_decay_norms_and_biases=False):
  """An Optax optimizer whose current rate lives at `opt_state.hyperparams['learning_rate']`.

  Equal arguments with a constant (number) rate give the same object, so states built with it
  share their (static) optimizer and the programs traced for it (a sweep's configurations that
  differ only in batch size share one optimizer-state program).

  Args:
    name: one of OPTIMIZERS; sgd is plain SGD, momentum / nesterov are `optax.sgd` with
      `momentum` (heavy ball / Nesterov), adam and adamw use Optax's defaults (b1 0.9, b2 0.999).
    learning_rate: a float or an Optax schedule of the step count (see `lr_schedule`).
    momentum: the momentum of 'momentum' and 'nesterov' (ignored by the others).
    weight_decay: L2 coefficient (decoupled for adamw); 0 turns it off.
    weight_decay_norms_and_biases: also decay biases and norm scales / biases.

  Returns:
    An `optax.GradientTransformation` (hashable: it can be a static jit argument).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}: e.g. '
                     "--config.optimizer=momentum")
  if weight_decay < 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay}: e.g. '
                     '--config.weight_decay=1e-4')
  if name in ('momentum', 'nesterov') and not 0 <= momentum < 1:
    raise ValueError(f'momentum must be in [0, 1), got {momentum}: e.g. --config.momentum=0.9')
  if isinstance(learning_rate, (int, float)):
    return _constant_rate_optimizer(name, float(learning_rate), momentum, weight_decay,
                                    bool(weight_decay_norms_and_biases))
  return _build(name, learning_rate, momentum, weight_decay, weight_decay_norms_and_biases)


@functools.lru_cache(maxsize=None)
def _constant_rate_optimizer(name, learning_rate, momentum, weight_decay,
                             weight_decay_norms_and_biases):
  return _build(name, learning_rate, momentum, weight_decay, weight_decay_norms_and_biases)


def _build(name, learning_rate, momentum, weight_decay, weight_decay_norms_and_biases):
  mask = None if weight_decay_norms_and_biases else decay_mask

  def factory(learning_rate):
    if name == 'adamw':
      return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask)
    if name == 'adam':
      opt = optax.adam(learning_rate)
    else:
      opt = optax.sgd(learning_rate, momentum=None if name == 'sgd' else momentum,
                      nesterov=name == 'nesterov')
    if weight_decay == 0:
      return opt
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), opt)

  return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def _python_float(value, setting):
  try:
    return float(value)
  except TypeError as e:  # a tracer: ConcretizationTypeError is a TypeError
    raise ValueError(f'{setting} must be a Python number, got {value!r}: build the schedule '
                     'from the config outside jit / vmap and pass the optimizer in') from e


def lr_schedule(name='constant', *, base_lr, steps_per_epoch, total_steps, warmup_epochs=0,
                decay_epochs=(), decay_factor=0.1):
  """The learning rate as a function of the step count (the number of updates done so far).

  Args:
    name: one of SCHEDULES. 'constant'; 'cosine' from base_lr to 0 at total_steps; 'step'
      multiplies the rate by decay_factor from the first step of each epoch in decay_epochs;
      'warmup_cosine' rises linearly from 0 over warmup_epochs, then cosine to 0 at total_steps.
    base_lr: the peak rate (a Python number, not a traced value).
    steps_per_epoch: updates per epoch (epochs convert to steps with it).
    total_steps: the training budget in updates.
    warmup_epochs: linear warm-up from 0 in front of 'constant', 'step' or 'warmup_cosine'.
    decay_epochs: increasing positive epochs of 'step' (those past the budget never happen).
    decay_factor: the factor of each 'step' decay.

  Returns:
    The float base_lr for 'constant' without warm-up, else an Optax schedule.
  """
  if name not in SCHEDULES:
    raise ValueError(f'lr_schedule must be one of {SCHEDULES}, got {name!r}: e.g. '
                     '--config.lr_schedule=cosine')
  base_lr = _python_float(base_lr, 'the learning rate')
  if steps_per_epoch <= 0 or total_steps <= 0:
    raise ValueError(f'steps_per_epoch and total_steps must be positive, got '
                     f'{steps_per_epoch} and {total_steps}')
  warmup = round(_python_float(warmup_epochs, 'warmup_epochs') * steps_per_epoch)
  if warmup < 0 or warmup >= total_steps:
    raise ValueError(f'warmup_epochs must be >= 0 and shorter than the budget of '
                     f'{total_steps / steps_per_epoch:g} epochs, got {warmup_epochs}: e.g. '
                     '--config.warmup_epochs=5')
  if warmup and name == 'cosine':
    raise ValueError("warmup_epochs needs lr_schedule 'constant', 'step' or 'warmup_cosine', "
                     "got 'cosine': use --config.lr_schedule=warmup_cosine")
  if name == 'cosine':
    return optax.cosine_decay_schedule(base_lr, decay_steps=total_steps)
  if name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps=warmup,
                                              decay_steps=total_steps)
  if name == 'constant':
    after = optax.constant_schedule(base_lr)
  else:
    decay_epochs = (decay_epochs,) if isinstance(decay_epochs, (int, float)) else decay_epochs
    epochs = tuple(_python_float(e, 'lr_decay_epochs') for e in decay_epochs)
    if not epochs or any(e <= 0 for e in epochs) or any(
        a >= b for a, b in zip(epochs, epochs[1:])):
      raise ValueError(f'lr_decay_epochs must be increasing positive epochs, got '
                       f"{tuple(decay_epochs)}: e.g. --config.lr_decay_epochs='(30,60)'")
    if epochs[0] * steps_per_epoch <= warmup:
      raise ValueError(f'lr_decay_epochs must come after warmup_epochs={warmup_epochs}, got '
                       f'{tuple(decay_epochs)}')
    if not decay_factor > 0:
      raise ValueError(f'lr_decay_factor must be positive, got {decay_factor}: e.g. '
                       '--config.lr_decay_factor=0.1')
    # The part after warm-up sees step - warmup (optax.join_schedules): shift the boundaries.
    after = optax.piecewise_constant_schedule(
        base_lr, {round(e * steps_per_epoch) - warmup: float(decay_factor) for e in epochs})
  if not warmup:
    return base_lr if name == 'constant' else after
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), after], [warmup])
