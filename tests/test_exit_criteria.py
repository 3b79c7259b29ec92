"""Exit criteria against plain-Python loops over random exits."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import exit_criteria, exit_rule
from press_jax.types import ExitOutputs

T = 50


def random_outputs(seed=0, exits=4, batch=3, speakers=2, blocks=5, converge=True):
  rng = np.random.default_rng(seed)
  samples = blocks * T - 17  # a ragged last block
  base = rng.standard_normal((batch, speakers, samples))
  means = []
  for e in range(exits):  # each exit closer to the last, by a random amount per block
    scale = np.repeat(rng.uniform(0.0, 1.0, (batch, speakers, blocks)) ** (e + 1) if converge
                      else rng.uniform(0, 1, (batch, speakers, blocks)), T, axis=-1)[..., :samples]
    means.append(base + scale * rng.standard_normal((batch, speakers, samples)))
  shape = (exits, batch, speakers, blocks)
  outputs = ExitOutputs(mean=jnp.asarray(np.stack(means), jnp.float32),
                        log_var=jnp.asarray(rng.normal(-1, 1, shape), jnp.float32),
                        log_alpha=jnp.asarray(rng.normal(1, 1, shape), jnp.float32))
  mask = np.ones((batch, samples), np.float32)
  mask[0, samples - 60:] = 0.0
  mixture = jnp.asarray(base.sum(1), jnp.float32)
  return outputs, mixture, jnp.asarray(mask)


def reference_change_db(means, mask):
  exits, batch, speakers, samples = means.shape
  blocks = math.ceil(samples / T)
  change = np.full((exits, batch, speakers, blocks), np.inf)
  for e in range(1, exits):
    for b in range(batch):
      for j in range(speakers):
        for k in range(blocks):
          span = slice(k * T, min((k + 1) * T, samples))
          m = mask[b, span]
          difference = float(np.sum(((means[e, b, j, span] - means[e - 1, b, j, span]) * m) ** 2))
          energy = float(np.sum((means[e, b, j, span] * m) ** 2))
          change[e, b, j, k] = 10 * (math.log10(difference + 1e-12) - math.log10(energy + 1e-12))
  return change


def reference_choice(change, threshold_db, patience):
  exits, batch, _, blocks = change.shape
  chosen = np.zeros((batch, blocks), int)
  for b in range(batch):
    for k in range(blocks):
      run = 0
      chosen[b, k] = exits - 1
      for e in range(exits):
        small = all(change[e, b, j, k] <= -threshold_db for j in range(change.shape[2]))
        run = run + 1 if small else 0
        if run >= patience:
          chosen[b, k] = e
          break
  return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold_db", [0.0, 3.0, 8.0])
def test_similarity_and_patience_match_a_loop(seed, threshold_db):
  outputs, mixture, mask = random_outputs(seed)
  change = reference_change_db(np.asarray(outputs.mean, np.float64), np.asarray(mask))
  np.testing.assert_allclose(
      np.asarray(exit_criteria.change_db(outputs, mask, T))[1:], change[1:], atol=1e-3)
  for patience in (1, 2, 3):
    criterion = (exit_criteria.ConsecutiveSimilarity(threshold_db) if patience == 1
                 else exit_criteria.Patience(patience, threshold_db))
    chosen, _ = exit_criteria.choose(criterion, outputs, mixture, mask, T)
    np.testing.assert_array_equal(np.asarray(chosen),
                                  reference_choice(change, threshold_db, patience))


def test_choices_are_not_all_the_same():
  outputs, mixture, mask = random_outputs(0)
  chosen, _ = exit_criteria.choose(exit_criteria.ConsecutiveSimilarity(3.0), outputs, mixture,
                                   mask, T)
  assert len(np.unique(np.asarray(chosen))) >= 2


def test_press_rule_is_exit_rule():
  outputs, mixture, mask = random_outputs(1)
  criterion = exit_criteria.PressRule(target_db=3.0, confidence=0.7)
  chosen, valid = exit_criteria.choose(criterion, outputs, mixture, mask, T)
  selection = exit_rule.select_exits(outputs, mixture, mask, block_length=T, target_db=3.0,
                                     confidence=0.7, sample_rate=8000, crossfade_ms=0.0)
  np.testing.assert_array_equal(np.asarray(chosen), np.asarray(selection.exit_index))
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(selection.block_valid))


@pytest.mark.parametrize("exit_number", [1, 2, 4])
def test_fixed_depth(exit_number):
  outputs, mixture, mask = random_outputs(2)
  chosen, _ = exit_criteria.choose(exit_criteria.FixedDepth(exit_number), outputs, mixture,
                                   mask, T)
  assert np.all(np.asarray(chosen) == exit_number - 1)
  with pytest.raises(ValueError, match="exit_number must be in 1..4"):
    exit_criteria.choose(exit_criteria.FixedDepth(5), outputs, mixture, mask, T)
  with pytest.raises(ValueError, match="patience must be >= 1"):
    exit_criteria.Patience(0)
