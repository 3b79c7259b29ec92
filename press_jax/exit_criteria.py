"""Exit criteria behind one interface: PRESS's probabilistic rule and the alternatives.

Every criterion maps all exits' outputs of a batch to `accepted` (exits, batch, blocks): whether
exit e may stop at block b. The chosen exit is the first accepted one, the last always accepted
(`first_exit`), exactly as for PRESS's rule, so every criterion shares the splicing, the
compute accounting and the regret of `exit_rule`.

  PressRule(target_db, confidence)           PRESS: min over speakers of p_exit >= p (SPEC §4)
  ConsecutiveSimilarity(threshold_db)        stop when exit e changed its estimates little from
                                             exit e-1: 10 log10(||x_e - x_{e-1}||^2 / ||x_e||^2)
                                             <= -threshold_db for every speaker (Chen et al.
                                             2021, early-exit Transformer for separation)
  Patience(patience, threshold_db)           stop after `patience` consecutive exits that each
                                             changed less than threshold_db (Zhou et al. 2020,
                                             PABEE; 1 = ConsecutiveSimilarity)
  FixedDepth(exit_number)                    a static exit (1-based)

The similarity criteria need no predicted distribution: they are the baselines PRESS's
probabilistic rule is compared with on the same table.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from press_jax import exit_rule
from press_jax.likelihoods import block_sums
from press_jax.types import ExitOutputs

_EPS = 1e-12


def first_exit(accepted: Bool[Array, "exits batch blocks"]) -> Int[Array, "batch blocks"]:
  """First accepted exit per block; the last exit is always accepted."""
  num_exits = accepted.shape[0]
  accepted = accepted | (jnp.arange(num_exits) == num_exits - 1)[:, None, None]
  return jnp.argmax(accepted, axis=0).astype(jnp.int32)


def change_db(outputs: ExitOutputs, mask, block_length: int) -> Float[Array, "exits batch speakers blocks"]:
  """Per block, 10 log10(||x_e - x_{e-1}||^2 / ||x_e||^2); +inf for the first exit (no change known)."""
  mean = outputs.mean.astype(jnp.float32)
  block_mask = None if mask is None else jnp.asarray(mask, jnp.float32)[None, :, None, :]
  difference = block_sums((mean[1:] - mean[:-1]) ** 2, block_mask, block_length)
  energy = block_sums(mean[1:] ** 2, block_mask, block_length)
  ratio = 10.0 * (jnp.log10(difference + _EPS) - jnp.log10(energy + _EPS))
  first = jnp.full_like(ratio[:1], jnp.inf)
  return jnp.concatenate([first, ratio], axis=0)


@dataclasses.dataclass(frozen=True)
class PressRule:
  target_db: float = 10.0
  confidence: float = 0.9
  conditions: tuple[str, ...] = exit_rule.CONDITIONS
  method: str = "approximate"
  name: str = "press"

  def accepted(self, outputs: ExitOutputs, mixture, mask, block_length: int):
    probabilities = exit_rule.exit_probabilities(
        outputs, mixture, mask, block_length=block_length, target_db=self.target_db,
        conditions=self.conditions, method=self.method)
    return jnp.min(probabilities, axis=2) >= self.confidence


@dataclasses.dataclass(frozen=True)
class ConsecutiveSimilarity:
  threshold_db: float = 20.0
  name: str = "similarity"

  def accepted(self, outputs: ExitOutputs, mixture, mask, block_length: int):
    return jnp.max(change_db(outputs, mask, block_length), axis=2) <= -self.threshold_db


@dataclasses.dataclass(frozen=True)
class Patience:
  patience: int = 2
  threshold_db: float = 20.0
  name: str = "patience"

  def __post_init__(self):
    if self.patience < 1:
      raise ValueError(f"Patience: patience must be >= 1, got {self.patience}")

  def accepted(self, outputs: ExitOutputs, mixture, mask, block_length: int):
    small = jnp.max(change_db(outputs, mask, block_length), axis=2) <= -self.threshold_db
    # run[e] = number of consecutive small changes ending at exit e.
    runs, run = [], jnp.zeros(small.shape[1:], jnp.int32)
    for e in range(small.shape[0]):
      run = jnp.where(small[e], run + 1, 0)
      runs.append(run)
    return jnp.stack(runs) >= self.patience


@dataclasses.dataclass(frozen=True)
class FixedDepth:
  exit_number: int = 1  # 1-based
  name: str = "fixed"

  def accepted(self, outputs: ExitOutputs, mixture, mask, block_length: int):
    num_exits = outputs.num_exits
    if not 1 <= self.exit_number <= num_exits:
      raise ValueError(f"FixedDepth: exit_number must be in 1..{num_exits}, got "
                       f"{self.exit_number}")
    blocks = outputs.log_var.shape[-1]
    batch = outputs.mean.shape[1]
    chosen = jnp.arange(num_exits) == self.exit_number - 1
    return jnp.broadcast_to(chosen[:, None, None], (num_exits, batch, blocks))


def choose(criterion, outputs: ExitOutputs, mixture, mask, block_length: int):
  """(exit_index (batch, blocks), block_valid (batch, blocks)) of a criterion."""
  accepted = criterion.accepted(outputs, mixture, mask, block_length)
  mask = jnp.ones(jnp.shape(mixture), jnp.float32) if mask is None else mask
  block_valid = block_sums(jnp.asarray(mask, jnp.float32), None, block_length) > 0
  return first_exit(accepted), block_valid
