"""Block likelihoods (Student-t, Gaussian), negative SI-SNR and the permutation-invariant loss."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln
from jaxtyping import Array, Float

from press_jax import metrics
from press_jax import permutation as permutation_lib
from press_jax.types import ExitOutputs

LOSS_KINDS = ("student_t", "gaussian", "si_snr")
_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Training-loss options; validated on construction."""

  kind: str = "student_t"
  block_length: int = 2000
  exit_weights: tuple[float, ...] | None = None
  permutation: str = "joint"

  def __post_init__(self):
    if self.kind not in LOSS_KINDS:
      raise ValueError(f"LossConfig.kind must be one of {LOSS_KINDS}, got {self.kind!r}.")
    if (not isinstance(self.block_length, int) or isinstance(self.block_length, bool)
        or self.block_length < 1):
      raise ValueError(
          f"LossConfig.block_length must be a positive int (samples), got {self.block_length!r}.")
    if self.permutation not in permutation_lib.PERMUTATION_MODES:
      raise ValueError(
          f"LossConfig.permutation must be one of {permutation_lib.PERMUTATION_MODES}, "
          f"got {self.permutation!r}.")
    if self.exit_weights is not None:
      weights = tuple(float(w) for w in self.exit_weights)
      if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(
            "LossConfig.exit_weights must be None or a non-empty tuple of finite non-negative "
            f"floats, got {self.exit_weights!r}.")
      object.__setattr__(self, "exit_weights", weights)


def num_blocks(num_samples: int, block_length: int) -> int:
  """Number of blocks ceil(samples / T) covering a signal; the last may be ragged."""
  return -(-num_samples // block_length)


def block_sums(
    values: Float[Array, "... samples"],
    mask: Float[Array, "... samples"] | None,
    block_length: int,
) -> Float[Array, "... blocks"]:
  """Masked sums over consecutive blocks of block_length samples (the last block may be ragged)."""
  values = jnp.asarray(values)
  if mask is not None:
    values = values * jnp.asarray(mask).astype(values.dtype)
  num_samples = values.shape[-1]
  blocks = num_blocks(num_samples, block_length)
  pad = blocks * block_length - num_samples
  if pad:
    values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)])
  return jnp.sum(values.reshape(values.shape[:-1] + (blocks, block_length)), axis=-1)


def _safe_log(energy: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log(energy) where energy > tiny (else 0) and that positivity mask; gradients stay finite."""
  positive = energy > jnp.finfo(energy.dtype).tiny
  return jnp.log(jnp.where(positive, energy, 1.0)), positive


def student_t_nll(
    error_energy: Float[Array, "..."],
    block_count: Float[Array, "..."],
    log_var: Float[Array, "..."],
    log_alpha: Float[Array, "..."],
) -> Float[Array, "..."]:
  """-ln L of the block Student-t (Gaussian error, InvGamma variance); 0 where count == 0."""
  dtype = jnp.result_type(error_energy, log_var, log_alpha, jnp.float32)
  error_energy = jnp.asarray(error_energy, dtype)
  count = jnp.asarray(block_count, dtype)
  log_alpha = jnp.asarray(log_alpha, dtype)
  alpha = jnp.exp(log_alpha)
  log_beta = log_alpha + jnp.asarray(log_var, dtype)
  half_count = 0.5 * count
  # log1p(E / (2 beta)) = softplus(log E - log 2 - log beta), exact and overflow-free.
  log_energy, positive = _safe_log(error_energy)
  log1p_ratio = jnp.where(positive, jax.nn.softplus(log_energy - math.log(2.0) - log_beta), 0.0)
  log_likelihood = (
      gammaln(alpha + half_count) - gammaln(alpha)
      - half_count * (_LOG_2PI + log_beta)
      - (alpha + half_count) * log1p_ratio)
  return jnp.where(count > 0, -log_likelihood, 0.0)


def gaussian_nll(
    error_energy: Float[Array, "..."],
    block_count: Float[Array, "..."],
    log_var: Float[Array, "..."],
) -> Float[Array, "..."]:
  """(T/2) ln(2 pi sigma^2) + ||e||^2 / (2 sigma^2) = -ln N(e; 0, sigma^2 I_T); 0 where T == 0."""
  dtype = jnp.result_type(error_energy, log_var, jnp.float32)
  error_energy = jnp.asarray(error_energy, dtype)
  count = jnp.asarray(block_count, dtype)
  log_var = jnp.asarray(log_var, dtype)
  log_energy, positive = _safe_log(error_energy)
  scaled_energy = jnp.where(positive, jnp.exp(log_energy - math.log(2.0) - log_var), 0.0)
  nll = 0.5 * count * (_LOG_2PI + log_var) + scaled_energy
  return jnp.where(count > 0, nll, 0.0)


def negative_si_snr(
    estimate: Float[Array, "... samples"],
    target: Float[Array, "... samples"],
    mask: Float[Array, "... samples"] | None = None,
) -> Float[Array, "..."]:
  """Negative SI-SNR (dB) of the means, the SI-SNR ablation's loss."""
  return -metrics.si_snr(estimate, target, mask)


def _check_shapes(outputs: ExitOutputs, targets: jax.Array, mask: jax.Array | None,
                  block_length: int) -> None:
  """Raises ValueError when outputs, targets and mask do not fit together."""
  if outputs.mean.ndim != 4:
    raise ValueError(
        f"outputs.mean must be (exits, batch, speakers, samples), got shape {outputs.mean.shape}.")
  num_exits, batch, speakers, samples = outputs.mean.shape
  if targets.ndim != 3:
    raise ValueError(f"targets must be (batch, speakers, samples), got shape {targets.shape}.")
  permutation_lib.check_speaker_counts(speakers, targets.shape[1])
  if (targets.shape[0], targets.shape[2]) != (batch, samples):
    raise ValueError(
        f"targets {targets.shape} do not match outputs.mean {outputs.mean.shape}: expected "
        f"(batch={batch}, speakers={speakers}, samples={samples}).")
  if mask is not None and tuple(mask.shape) != (batch, samples):
    raise ValueError(f"mask must be (batch={batch}, samples={samples}), got {mask.shape}.")
  expected = (num_exits, batch, speakers, num_blocks(samples, block_length))
  for name in ("log_var", "log_alpha"):
    shape = tuple(getattr(outputs, name).shape)
    if shape != expected:
      raise ValueError(
          f"outputs.{name} must be (exits, batch, speakers, blocks) = {expected} for "
          f"{samples} samples and block_length {block_length}, got {shape}.")


def pairwise_loss(
    outputs: ExitOutputs,
    targets: Float[Array, "batch speakers samples"],
    mask: Float[Array, "batch samples"] | None,
    config: LossConfig,
) -> Float[Array, "exits batch speakers speakers"]:
  """Loss of estimate i vs target j per exit and utterance, over (valid samples x speakers)."""
  targets = jnp.asarray(targets)
  _check_shapes(outputs, targets, mask, config.block_length)
  dtype = jnp.promote_types(outputs.mean.dtype, jnp.float32)  # energies in >= float32
  mean = outputs.mean.astype(dtype)
  targets = targets.astype(dtype)
  speakers, samples = mean.shape[2], mean.shape[3]
  mask = (jnp.ones((mean.shape[1], samples), dtype) if mask is None
          else jnp.asarray(mask).astype(dtype))
  if config.kind == "si_snr":
    estimate = mean[:, :, :, None, :]
    target = targets[None, :, None, :, :]
    return negative_si_snr(estimate, target, mask[None, :, None, None, :]) / speakers

  # (exits, batch, est, target, samples) errors; padding samples are zeroed by the mask.
  error = (targets[None, :, None, :, :] - mean[:, :, :, None, :]) * mask[None, :, None, None, :]
  error_energy = block_sums(error * error, None, config.block_length)
  block_count = block_sums(mask, None, config.block_length)[None, :, None, None, :]
  log_var = outputs.log_var[:, :, :, None, :]
  if config.kind == "student_t":
    log_alpha = outputs.log_alpha[:, :, :, None, :]
    per_block = student_t_nll(error_energy, block_count, log_var, log_alpha)
  else:
    per_block = gaussian_nll(error_energy, block_count, log_var)
  valid_samples = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return jnp.sum(per_block, axis=-1) / (valid_samples * speakers)[None, :, None, None]


def exit_weight_vector(config: LossConfig, num_exits: int) -> jax.Array:
  """The (exits,) loss weights, all ones when config.exit_weights is None."""
  if config.exit_weights is None:
    return jnp.ones((num_exits,), jnp.float32)
  if len(config.exit_weights) != num_exits:
    raise ValueError(
        f"LossConfig.exit_weights has {len(config.exit_weights)} entries but the model has "
        f"{num_exits} exits.")
  return jnp.asarray(config.exit_weights, jnp.float32)


def press_loss(
    outputs: ExitOutputs,
    targets: Float[Array, "batch speakers samples"],
    mask: Float[Array, "batch samples"] | None,
    config: LossConfig,
) -> tuple[Float[Array, ""], dict[str, Any]]:
  """Batch mean of sum_e w_e loss_e at the chosen permutation (joint uPIT or per exit), and aux."""
  pairwise = pairwise_loss(outputs, targets, mask, config)
  weights = exit_weight_vector(config, outputs.num_exits).astype(pairwise.dtype)
  perm = permutation_lib.choose_permutation(
      jax.lax.stop_gradient(pairwise), config.permutation, weights)
  per_exit_per_utterance = permutation_lib.gather_permuted_cost(pairwise, perm)
  total = jnp.mean(jnp.sum(weights[:, None] * per_exit_per_utterance, axis=0))
  aux = {
      "per_exit_loss": jnp.mean(per_exit_per_utterance, axis=1),
      "permutation": perm,
      "aligned_targets": permutation_lib.apply_permutation(targets, perm),
  }
  return total, aux
