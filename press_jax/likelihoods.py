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


# c_k = B_2k / (2k (2k - 1)), k = 1..7, of Stirling's series
# lnΓ(z) = (z - 1/2) ln z - z + ln(2π)/2 + Σ_k c_k z^(1 - 2k) + R, |R| < |c_8| z^-15,
# |c_8| = 3617 / 122400.
_STIRLING_COEFFS = (1 / 12, -1 / 360, 1 / 1260, -1 / 1680, 1 / 1188, -691 / 360360, 1 / 156)


def _stirling_min_alpha(dtype) -> float:
  """Smallest integer α with |c_8| α^-15 < eps / 100: 4 in float32, 12 in float64.

  Measured in float32 (gradient abs error of lnΓ(α+h) - lnΓ(α) - h ln α, h = 0.5 ... 3): the
  series is < 3e-8 off from α = 3 on, but 7e-2 at α = 1 and 6e-6 at α = 2; the gammaln difference
  is ~1e-6 off at α = 3 ... 8 and grows with α.
  """
  return float(math.ceil((3617 / 122400 * 100 / float(jnp.finfo(dtype).eps)) ** (1 / 15)))


def _log1p_minus_x_over_x(x: jax.Array) -> jax.Array:
  """(log1p(x) - x) / x for x >= 0 (0 at x = 0), to a few ulps, also through autodiff.

  Below x = 1 with s = x / (2 + x): log1p(x) = 2 atanh(s) and x = 2s + x s, so the quotient is
  -s + 2 s^2 / (2 + x) Σ_k s^(2k) / (2k + 3) (s^2 <= 1/9; terms up to the dtype's epsilon).
  """
  small = x < 1.0
  xs = jnp.where(small, x, 0.0)
  s = xs / (2.0 + xs)
  t = s * s
  eps = float(jnp.finfo(x.dtype).eps)
  num_terms = 1
  while (1 / 9) ** num_terms / (2 * num_terms + 3) > eps / 8:
    num_terms += 1
  poly = jnp.zeros_like(t)
  for k in reversed(range(num_terms)):
    poly = poly * t + 1.0 / (2 * k + 3)
  series = -s + 2.0 * t * poly / (2.0 + xs)
  xl = jnp.where(small, 1.0, x)
  return jnp.where(small, series, jnp.log1p(xl) / xl - 1.0)


def _log_gamma_ratio(
    log_alpha: jax.Array, half_count: jax.Array, log_weight: jax.Array) -> jax.Array:
  """lnΓ(α + h) - lnΓ(α) - w h ln α (w = log_weight, 0 or 1); see log_gamma_ratio_minus_log."""
  min_alpha = _stirling_min_alpha(log_alpha.dtype)
  large = log_alpha >= math.log(min_alpha)
  # Small alpha: direct (inputs made safe for the other branch, so where() keeps gradients finite).
  log_alpha_small = jnp.where(large, 0.0, log_alpha)
  alpha_small = jnp.exp(log_alpha_small)
  direct = (gammaln(alpha_small + half_count) - gammaln(alpha_small)
            - log_weight * half_count * log_alpha_small)
  # Large alpha: Stirling's series for both lnΓ with the h ln α cancelled analytically.
  log_alpha_large = jnp.where(large, log_alpha, math.log(min_alpha))
  inv_alpha = jnp.exp(-log_alpha_large)
  x = half_count * inv_alpha
  log1p_x = jnp.log1p(x)
  correction = jnp.zeros_like(x)
  power = inv_alpha
  for k, coeff in enumerate(_STIRLING_COEFFS, start=1):
    correction = correction + coeff * power * jnp.expm1((1 - 2 * k) * log1p_x)
    power = power * inv_alpha * inv_alpha
  stirling = (half_count * _log1p_minus_x_over_x(x) + (half_count - 0.5) * log1p_x + correction
              + (1.0 - log_weight) * half_count * log_alpha_large)
  return jnp.where(large, stirling, direct)


def log_gamma_ratio_minus_log(
    log_alpha: Float[Array, "..."],
    half_count: Float[Array, "..."],
) -> Float[Array, "..."]:
  """lnΓ(α + h) - lnΓ(α) - h ln α for α = exp(log_alpha), h >= 0, without cancellation.

  For α >= 4 (12 in float64), with x = h / α, Stirling's series gives exactly
  h (log1p(x) - x) / x + (h - 1/2) log1p(x) + Σ_k c_k α^(1-2k) expm1((1 - 2k) log1p(x)):
  every term is small when the result is, so value and autodiff gradient keep their relative
  precision (the gammaln difference loses ~eps α ln α). Below it the gammaln difference is used.
  """
  dtype = jnp.result_type(log_alpha, half_count, jnp.float32)
  log_alpha = jnp.asarray(log_alpha, dtype)
  half_count = jnp.asarray(half_count, dtype)
  return _log_gamma_ratio(log_alpha, half_count, jnp.ones_like(log_alpha))


def student_t_nll(
    error_energy: Float[Array, "..."],
    block_count: Float[Array, "..."],
    log_var: Float[Array, "..."],
    log_alpha: Float[Array, "..."],
) -> Float[Array, "..."]:
  """-ln L of the block Student-t (Gaussian error, InvGamma variance); 0 where count == 0.

  Evaluated in a cancellation-free form (docs/probabilistic.md, "Stable form"): the h ln α in
  -h ln(2πβ) is cancelled analytically against lnΓ(α + h) - lnΓ(α) (r = E/2β < 1) or against
  h log1p(r) (r >= 1), so value and gradients keep float32 precision at any α (the direct form's
  log_alpha gradient was off by orders of magnitude for α >~ 1e3).
  """
  dtype = jnp.result_type(error_energy, log_var, log_alpha, jnp.float32)
  error_energy = jnp.asarray(error_energy, dtype)
  count = jnp.asarray(block_count, dtype)
  log_alpha = jnp.asarray(log_alpha, dtype)
  log_var = jnp.asarray(log_var, dtype)
  half_count = 0.5 * count
  log_energy, positive = _safe_log(error_energy)
  # c = E / (2 σ²) and r = E / (2β) = c / α, formed in logs.
  log_half_energy = log_energy - math.log(2.0)
  log_c = log_half_energy - log_var
  log_r = log_c - log_alpha
  small = jnp.logical_not(positive) | (log_r < 0.0)
  # r < 1 (or E = 0): -h ln σ² - (α + h) log1p(r), with α log1p(r) = c + c (log1p(r) - r) / r;
  # c does not depend on α, the other terms are as small as their log_alpha gradients.
  r_small = jnp.exp(jnp.where(small, log_r, 0.0))
  c_small = jnp.exp(jnp.where(small, log_c, 0.0))
  energy_small = (c_small + c_small * _log1p_minus_x_over_x(r_small)
                  + half_count * jnp.log1p(r_small))
  rest_small = -half_count * log_var - jnp.where(positive, energy_small, 0.0)
  # r >= 1: -h ln σ² - h log1p(r) = -h ln(E/2) + h ln α - h log1p(1/r); log1p through softplus.
  log_r_large = jnp.where(small, 0.0, log_r)
  alpha_large = jnp.exp(jnp.where(small, 0.0, log_alpha))
  rest_large = (-half_count * (log_half_energy + jax.nn.softplus(-log_r_large))
                - alpha_large * jax.nn.softplus(log_r_large))
  # Q = lnΓ(α + h) - lnΓ(α) - h ln α where r < 1, lnΓ(α + h) - lnΓ(α) where r >= 1.
  log_gamma_ratio = _log_gamma_ratio(log_alpha, half_count, small.astype(dtype))
  log_likelihood = (log_gamma_ratio - half_count * _LOG_2PI
                    + jnp.where(small, rest_small, rest_large))
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

  # (exits, batch, est, target, samples) errors; padding samples are zeroed by the mask, applied
  # to estimates and targets before their pairwise difference (the same values for a 0/1 mask,
  # without a mask broadcast to the five-dimensional pairwise shape, which XLA:CPU wrote out).
  error = ((targets * mask[:, None, :])[None, :, None, :, :]
           - (mean * mask[None, :, None, :])[:, :, :, None, :])
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
