"""What a run knows about its own validity: the warnings every record carries, and the gates a
finding checks on its runs (`verdicts.finding(..., gates=...)`).

Warnings, from facts of the run alone:
  cold running averages: BN's running mean/variance start at 0/1 and move by (1 - momentum) a
    step, so after t steps the initial values still weigh momentum^t; above `WARM` (1%) the
    eval-mode numbers partly measure the initial values (PreciseBN or bias correction fix it);
  diverged: a seed's loss went non-finite or above `loop.DIVERGENCE_LOSS`;
  at chance: training accuracy (eval mode) within `CHANCE_MARGIN` of 1 / classes.
"""

import dataclasses
import math

from bn_jax import settings

WARM = 0.01  # the largest weight of the initial values a warmed running average may hold
CHANCE_MARGIN = 0.05
NUM_CLASSES = 10


def initial_weight(config, steps):
  """momentum^steps: the weight BN's running averages still give their initial 0/1 after
  `steps` updates; 0 for norms without running averages."""
  if config['norm'] not in settings.RUNNING_STATS:
    return 0.0
  return float(config['bn_momentum']) ** steps


def warnings(config, result):
  """The warnings of one run (a list of one-line strings, empty when none), from its config
  and `loop.fit`'s result for its seed."""
  out = []
  weight = initial_weight(config, result['steps'])
  if weight > WARM:
    controls = [name for name, on in (('precise_*', config.get('precise_bn_examples')),
                                      ('corrected_*', config.get('bn_ema_bias_correction')))
                if on]
    fix = (f'the {" and ".join(controls)} numbers do not' if controls else
           'use PreciseBN (precise_bn_examples) or bn_ema_bias_correction, or train longer')
    out.append(f'cold running averages: after {result["steps"]} steps at momentum '
               f'{config["bn_momentum"]:g} they still hold {weight:.0%} of their initial values '
               f'(> {WARM:.0%}); eval-mode val_*/test_* numbers partly measure those ({fix})')
  if result['status'] == 'diverged':
    at = result['diverged_at']
    out.append(f'diverged at epoch {at["epoch"]}, step {at["step"]}')
  accuracy = result['final'].get('train_eval_accuracy', math.nan)
  if not accuracy > 1 / NUM_CLASSES + CHANCE_MARGIN:
    out.append(f'at chance: training accuracy (eval mode) {accuracy:.3f}, chance '
               f'{1 / NUM_CLASSES:.2f}')
  return out


@dataclasses.dataclass(frozen=True)
class Gate:
  """One precondition of a fair test, measured: `value` must be >= (`at_least`) or <=
  (`at_most`) `threshold`; a NaN value fails."""
  name: str
  value: float
  threshold: float
  at_least: bool = True

  @property
  def passed(self):
    if not math.isfinite(self.value):
      return False
    return self.value >= self.threshold if self.at_least else self.value <= self.threshold

  def __str__(self):
    sign = ('>=' if self.at_least else '<=') if self.passed else ('<' if self.at_least else '>')
    return f'{self.name}: {self.value:.4g} {sign} {self.threshold:.4g}'


def at_least(name, value, threshold):
  return Gate(name, float(value), float(threshold), at_least=True)


def at_most(name, value, threshold):
  return Gate(name, float(value), float(threshold), at_least=False)


def trained(arm, records, min_accuracy):
  """Gate: every seed of `arm` reached `min_accuracy` training accuracy (eval mode)."""
  worst = min((r['final']['train_eval_accuracy'] for r in records), default=math.nan)
  return at_least(f'{arm} trained (lowest training accuracy)', worst, min_accuracy)


def warmed(arm, records, statistics='ema'):
  """Gate: the running averages the finding's numbers use hold at most `WARM` of their
  initial values (momentum^steps, largest over seeds). PreciseBN, bias-corrected or train-mode
  numbers (`statistics` 'precise', 'corrected' or 'batch') do not depend on them: 0."""
  weight = 0.0 if statistics != 'ema' else max(
      (initial_weight(r['config'], r['steps']) for r in records), default=math.nan)
  return at_most(f'{arm} running averages warmed (momentum^steps)', weight, WARM)


def no_divergence(arm, records):
  """Gate: no seed of `arm` diverged."""
  return at_most(f'{arm} diverged seeds', sum(r['status'] != 'ok' for r in records), 0)


def converged(arm, at_budget, at_double, tolerance=0.01):
  """Gate: the budget is long enough: `arm`'s accuracy (mean over seeds) at twice the budget
  is within `tolerance` of its accuracy at the budget."""
  return at_most(f'{arm} budget long enough (accuracy gain from doubling it)',
                 at_double - at_budget, tolerance)
