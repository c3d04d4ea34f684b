"""The reproductions: the verdict rule on hand-made effects, the percentile tracker and drift
against numpy (each script end to end: tests/test_paper_<script>.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import health
from bn_jax import models
from bn_jax import papers


def test_verdict_rule_on_hand_made_effects():
  # mean 2, sample variance 2/3, n = 4: half-width t(0.975, 3) sqrt(2/3) / 2 = 3.1824 *
  # 0.8165 / 2 = 1.2992
  above = papers.finding('f', 's', [1.0, 2.0, 3.0, 2.0], 'u')
  np.testing.assert_allclose(above['interval'], [2 - 1.2992, 2 + 1.2992], atol=1e-3)
  below = papers.finding('f', 's', [-1.0, -2.0, -3.0, -2.0], 'u')
  across = papers.finding('f', 's', [1.0, -1.0, 2.0, -2.0], 'u')
  one = papers.finding('f', 's', [5.0, np.nan], 'u')  # a diverged seed gives no value
  cold = papers.finding('g', 's', [1.0, 2.0, 3.0, 2.0], 'u', gates=[
      health.at_most('BN running averages warmed (momentum^steps)', 0.34, 0.01)])
  text = papers.markdown('T', 'idx:x', [above, below, across, one, cold], ['a note'],
                         ['p.png'], '| x |')
  verdicts = [line.split('**')[1] for line in text.splitlines() if line.count('**') == 2]
  assert verdicts == ['reproduced', 'not reproduced', 'inconclusive',
                      'invalid setup (seeds with a value: 1 < 2)',
                      'invalid setup (BN running averages warmed (momentum^steps): 0.34 > 0.01)']
  assert papers.RULE in text and 'Holm' in text
  assert '- a note' in text and '![p](p.png)' in text and '| x |' in text


def test_percentiles_of_the_last_hidden_layer_match_numpy():
  model = models.create_model('mlp', norm='none', hidden=(5, 4), dropout=0.0,
                              activation='sigmoid')
  images = np.random.default_rng(0).uniform(0, 1, (50, 28, 28, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  p = variables['params']
  h = jax.nn.sigmoid(images.reshape(50, -1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
  inputs = np.asarray(h @ p['Dense_1']['kernel'] + p['Dense_1']['bias'])  # last layer's
  np.testing.assert_allclose(papers.percentiles(model, variables, jnp.asarray(images)),
                             np.percentile(inputs, (15, 50, 85), axis=0), rtol=1e-5, atol=1e-6)


def test_drift_is_zero_when_nothing_moves_and_matches_a_hand_computation():
  still = np.tile(np.array([[-1.0, 0.0, 1.0]]).T[None, :, :], (4, 1, 2))  # 4 points, 2 units
  assert papers.drift(still) == 0.0
  tracks = still.copy()
  tracks[0, :, 0] = [0.0, 1.0, 4.0]  # unit 0 at the first point: median +1, width 4 vs 2
  # unit 0: (|1 - 0| + |4 - 2|) / 2 at one of 3 earlier points -> 1.5 / 3 = 0.5; unit 1: 0
  assert papers.drift(tracks) == pytest.approx(0.25)
  # absolute: unit 0 moved (1 + 2) / 3 = 1 on average, unit 1 nothing -> 0.5
  assert papers.drift(tracks, relative=False) == pytest.approx(0.5)


def test_a_not_reproduced_finding_says_why_its_test_is_fair():
  against = papers.finding('BN helps', 's', [-1.0, -2.0, -1.5, -1.2], 'u',
                           why_fair='both arms trained to the same accuracy')
  passed = papers.finding('BN trains', 's', [1.0, 2.0, 1.5, 1.2], 'u', why_fair='unused')
  text = papers.markdown('t', 'synthetic', [against, passed])
  assert '**not reproduced**' in text and '**reproduced**' in text
  section = text.split('Why each "not reproduced" is a fair test:')[1]
  assert '- BN helps: both arms trained to the same accuracy' in section
  assert 'unused' not in text  # only the refuted finding's sentence is shown
  assert 'fair test' not in papers.markdown('t', 'synthetic', [passed])
