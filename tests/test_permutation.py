"""Tests for press_jax.permutation and the PIT behaviour of press_loss."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import likelihoods
from press_jax import permutation
from press_jax.types import ExitOutputs

press_loss = jax.jit(likelihoods.press_loss, static_argnames="config")
pairwise_loss = jax.jit(likelihoods.pairwise_loss, static_argnames="config")


def _brute_force(costs):
  """Best permutation of a (S, S) cost matrix by exhaustive search in numpy."""
  speakers = costs.shape[0]
  best = min(itertools.permutations(range(speakers)),
             key=lambda p: sum(costs[i, p[i]] for i in range(speakers)))
  return np.array(best)


@pytest.mark.parametrize("speakers", [2, 3, 4])
def test_joint_and_per_exit_match_brute_force(speakers):
  rng = np.random.default_rng(speakers)
  pairwise = rng.normal(size=(3, 5, speakers, speakers)).astype(np.float32)
  choose = jax.jit(permutation.choose_permutation, static_argnames="mode")
  joint = np.asarray(choose(pairwise, "joint"))
  per_exit = np.asarray(choose(pairwise, "per_exit"))
  assert joint.shape == (5, speakers) and per_exit.shape == (3, 5, speakers)
  for b in range(5):
    np.testing.assert_array_equal(joint[b], _brute_force(pairwise[:, b].sum(axis=0)))
    for e in range(3):
      np.testing.assert_array_equal(per_exit[e, b], _brute_force(pairwise[e, b]))


def test_permutations_array():
  assert permutation.permutations_array(3).shape == (6, 3)
  assert permutation.permutations_array(4).shape == (24, 4)
  with pytest.raises(ValueError, match="S = 5"):
    permutation.permutations_array(5)


def test_apply_permutation():
  targets = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  perm = jnp.array([[2, 0, 1], [0, 1, 2]])
  aligned = np.asarray(permutation.apply_permutation(targets, perm))
  np.testing.assert_array_equal(aligned[0], np.asarray(targets)[0, [2, 0, 1]])
  np.testing.assert_array_equal(aligned[1], np.asarray(targets)[1])
  per_exit = jnp.stack([perm, perm[::-1]])
  assert permutation.apply_permutation(targets, per_exit).shape == (2, 2, 3, 4)


def _outputs(rng, exits, batch, speakers, samples, block_length):
  blocks = likelihoods.num_blocks(samples, block_length)
  return ExitOutputs(
      mean=jnp.asarray(rng.normal(size=(exits, batch, speakers, samples)), jnp.float32),
      log_var=jnp.asarray(rng.normal(size=(exits, batch, speakers, blocks)), jnp.float32),
      log_alpha=jnp.asarray(rng.normal(size=(exits, batch, speakers, blocks)), jnp.float32))


@pytest.mark.parametrize("kind", ["student_t", "si_snr"])
@pytest.mark.parametrize("speakers", [2, 3])
def test_swapped_targets_leave_joint_loss_unchanged(kind, speakers):
  rng = np.random.default_rng(7)
  outputs = _outputs(rng, 2, 3, speakers, 48, 16)
  targets = rng.normal(size=(3, speakers, 48)).astype(np.float32)
  config = likelihoods.LossConfig(kind=kind, block_length=16)
  loss, aux = press_loss(outputs, targets, None, config)
  swap = np.roll(np.arange(speakers), 1)
  loss_swapped, aux_swapped = press_loss(outputs, targets[:, swap], None, config)
  np.testing.assert_allclose(float(loss_swapped), float(loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux_swapped["aligned_targets"]),
                             np.asarray(aux["aligned_targets"]))
  # The chosen joint permutation is the brute-force minimiser of the summed pairwise loss.
  pairwise = np.asarray(pairwise_loss(outputs, targets, None, config)).sum(axis=0)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(aux["permutation"])[b], _brute_force(pairwise[b]))


def test_per_exit_differs_from_joint_when_exits_disagree():
  rng = np.random.default_rng(8)
  targets = rng.normal(size=(1, 2, 64)).astype(np.float32)
  # Exit 0 reconstructs the targets in order, exit 1 swapped (and more accurately).
  mean = np.stack([targets + 0.3 * rng.normal(size=targets.shape),
                   targets[:, ::-1] + 0.1 * rng.normal(size=targets.shape)]).astype(np.float32)
  outputs = ExitOutputs(mean=jnp.asarray(mean), log_var=jnp.full((2, 1, 2, 4), -2.0),
                        log_alpha=jnp.full((2, 1, 2, 4), 2.0))
  joint_config = likelihoods.LossConfig(block_length=16, permutation="joint")
  per_exit_config = likelihoods.LossConfig(block_length=16, permutation="per_exit")
  loss_joint, aux_joint = press_loss(outputs, targets, None, joint_config)
  loss_per_exit, aux_per_exit = press_loss(outputs, targets, None, per_exit_config)
  np.testing.assert_array_equal(np.asarray(aux_per_exit["permutation"])[:, 0], [[0, 1], [1, 0]])
  assert aux_joint["permutation"].shape == (1, 2)
  assert float(loss_per_exit) < float(loss_joint)
  np.testing.assert_allclose(np.asarray(aux_per_exit["aligned_targets"])[1, 0],
                             targets[0, ::-1])


def test_speaker_mismatch_raises():
  rng = np.random.default_rng(9)
  outputs = _outputs(rng, 2, 1, 2, 32, 16)
  with pytest.raises(ValueError, match="model outputs 2 speakers but the targets have 3"):
    likelihoods.press_loss(outputs, np.zeros((1, 3, 32), np.float32), None,
                           likelihoods.LossConfig(block_length=16))
  with pytest.raises(ValueError, match="S = 5"):
    permutation.best_permutation(jnp.zeros((5, 5)))
  with pytest.raises(ValueError, match="must match"):
    permutation.best_permutation(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="permutation mode"):
    permutation.choose_permutation(jnp.zeros((1, 1, 2, 2)), "greedy")
