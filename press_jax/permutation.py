"""Permutation-invariant training helpers: enumerate, choose and apply speaker permutations."""

from __future__ import annotations

import functools
import itertools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

MAX_SPEAKERS = 4
PERMUTATION_MODES = ("joint", "per_exit")


def check_speaker_counts(estimated_speakers: int, target_speakers: int) -> None:
  """Raises ValueError when the model's speaker count differs from the targets' or exceeds 4."""
  if estimated_speakers != target_speakers:
    raise ValueError(
        f"The model outputs {estimated_speakers} speakers but the targets have "
        f"{target_speakers}; they must match (check the model's num_speakers and the data).")
  if not 1 <= target_speakers <= MAX_SPEAKERS:
    raise ValueError(
        f"Permutation search enumerates all S! permutations and supports 1 <= S <= "
        f"{MAX_SPEAKERS} speakers, got S = {target_speakers}.")


@functools.lru_cache(maxsize=None)
def permutations_array(num_speakers: int) -> np.ndarray:
  """All permutations of range(num_speakers) as a static (S!, S) int32 array."""
  check_speaker_counts(num_speakers, num_speakers)
  return np.array(list(itertools.permutations(range(num_speakers))), dtype=np.int32)


def permutation_costs(
    pairwise: Float[Array, "... speakers speakers"],
) -> Float[Array, "... permutations"]:
  """Cost sum_i pairwise[..., i, perm[i]] of every permutation."""
  num_speakers = pairwise.shape[-1]
  check_speaker_counts(pairwise.shape[-2], num_speakers)
  perms = permutations_array(num_speakers)
  rows = np.arange(num_speakers)
  return jnp.sum(jnp.asarray(pairwise)[..., rows, perms], axis=-1)


def best_permutation(
    pairwise: Float[Array, "... speakers speakers"],
) -> Int[Array, "... speakers"]:
  """Per leading index, the permutation minimising sum_i pairwise[i, perm[i]]."""
  perms = permutations_array(pairwise.shape[-1])
  best = jnp.argmin(permutation_costs(pairwise), axis=-1)
  return jnp.asarray(perms)[best]


def choose_permutation(
    pairwise: Float[Array, "exits batch speakers speakers"],
    mode: str = "joint",
    exit_weights: Float[Array, "exits"] | None = None,
) -> Int[Array, "..."]:
  """Joint: one (batch, S) perm for the weighted sum over exits; per_exit: (exits, batch, S)."""
  if mode not in PERMUTATION_MODES:
    raise ValueError(f"permutation mode must be one of {PERMUTATION_MODES}, got {mode!r}.")
  if pairwise.ndim != 4:
    raise ValueError(
        f"pairwise costs must be (exits, batch, speakers, speakers), got shape {pairwise.shape}.")
  if mode == "per_exit":
    return best_permutation(pairwise)
  if exit_weights is not None:
    pairwise = pairwise * jnp.asarray(exit_weights)[:, None, None, None]
  return best_permutation(jnp.sum(pairwise, axis=0))


def gather_permuted_cost(
    pairwise: Float[Array, "exits batch speakers speakers"],
    perm: Int[Array, "..."],
) -> Float[Array, "exits batch"]:
  """Cost sum_i pairwise[e, b, i, perm[i]] for a (batch, S) or (exits, batch, S) permutation."""
  perm = jnp.broadcast_to(perm, pairwise.shape[:-1])
  chosen = jnp.take_along_axis(pairwise, perm[..., None], axis=-1)[..., 0]
  return jnp.sum(chosen, axis=-1)


def apply_permutation(
    targets: Float[Array, "batch speakers samples"],
    perm: Int[Array, "... batch speakers"],
) -> Float[Array, "... batch speakers samples"]:
  """Reorders targets: output[..., b, i] = targets[b, perm[..., b, i]] (aligned with estimate i)."""
  targets = jnp.asarray(targets)
  perm = jnp.asarray(perm)
  check_speaker_counts(perm.shape[-1], targets.shape[-2])
  leading = perm.shape[:-2]
  expanded = jnp.broadcast_to(targets, leading + targets.shape)
  return jnp.take_along_axis(expanded, perm[..., None], axis=-2)
