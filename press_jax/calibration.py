"""Calibration of the predicted error variance: PIT values, KS distance, CRPS, post-calibration."""

from __future__ import annotations

import json
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.scipy.special import gammainc, gammaincc, gammaln
from jaxtyping import Array, Bool, Float

from press_jax.likelihoods import block_sums, student_t_nll
from press_jax.types import ExitOutputs

_DB_PER_NEPER = 10.0 / math.log(10.0)


def block_error_statistics(
    outputs: ExitOutputs,
    targets: Float[Array, "batch speakers samples"],
    mask: Float[Array, "batch samples"] | None,
    block_length: int,
) -> tuple[Float[Array, "exits batch speakers blocks"], Float[Array, "batch blocks"]]:
  """Per-block error energy ||x - x_hat||^2 (targets aligned with estimates) and valid length T."""
  targets = jnp.asarray(targets, outputs.mean.dtype)
  if mask is None:
    mask = jnp.ones((targets.shape[0], targets.shape[-1]), outputs.mean.dtype)
  mask = jnp.asarray(mask).astype(outputs.mean.dtype)
  error = targets[None] - outputs.mean
  error_energy = block_sums(error * error, mask[None, :, None, :], block_length)
  return error_energy, block_sums(mask, None, block_length)


def pit_values(
    error_energy: Float[Array, "..."],
    block_count: Float[Array, "..."],
    log_var: Float[Array, "..."],
    log_alpha: Float[Array, "..."],
) -> Float[Array, "..."]:
  """PIT u = P(sigma^2 <= sigma_hat^2) = Q(alpha, beta / sigma_hat^2), sigma_hat^2 = ||e||^2 / T."""
  count = jnp.maximum(jnp.asarray(block_count, jnp.float32), 1.0)
  log_beta = jnp.asarray(log_alpha) + jnp.asarray(log_var)
  energy = jnp.asarray(error_energy, jnp.float32)
  positive = energy > 0
  log_observed = jnp.log(jnp.where(positive, energy, 1.0)) - jnp.log(count)
  x = jnp.exp(jnp.where(positive, log_beta - log_observed, 0.0))
  return jnp.where(positive, gammaincc(jnp.exp(log_alpha), x), 0.0)


def ks_distance(u: np.ndarray, valid: np.ndarray | None = None) -> float:
  """Kolmogorov-Smirnov distance sup |F_n(u) - u| of the PIT values to Uniform(0, 1)."""
  u = np.asarray(u, np.float64)
  if valid is not None:
    u = u[np.broadcast_to(np.asarray(valid, bool), u.shape)]
  u = np.sort(u.ravel())
  n = u.size
  if n == 0:
    raise ValueError("ks_distance needs at least one valid PIT value.")
  ranks = np.arange(1, n + 1) / n
  return float(max(np.max(ranks - u), np.max(u - (ranks - 1.0 / n))))


def pit_histogram(u: np.ndarray, valid: np.ndarray | None = None, bins: int = 20) -> np.ndarray:
  """Density-normalised histogram of the PIT values on [0, 1] (flat at 1 when calibrated)."""
  u = np.asarray(u, np.float64)
  if valid is not None:
    u = u[np.broadcast_to(np.asarray(valid, bool), u.shape)]
  counts, _ = np.histogram(u, bins=bins, range=(0.0, 1.0), density=True)
  return counts


def crps_db(
    error_energy: Float[Array, "..."],
    block_count: Float[Array, "..."],
    log_var: Float[Array, "..."],
    log_alpha: Float[Array, "..."],
    num_points: int = 512,
) -> Float[Array, "..."]:
  """CRPS (dB) of the predicted 10 log10 sigma^2 (InvGamma(alpha, beta)) at 10 log10 sigma_hat^2.

  With G ~ Gamma(alpha, 1), 10 log10 sigma^2 = c (ln beta - ln G), c = 10 / ln 10, and the CRPS is
  c * integral (F(z) - 1[z >= w])^2 dz with F(z) = P(ln G <= z) = P(alpha, e^z) and
  w = ln beta - ln sigma_hat^2; the integral is a trapezoid rule on num_points points covering
  F in [1e-7, 1 - 1e-7] (split as F^2 everywhere plus 1 - 2F beyond w, both smooth), plus the
  linear pieces when w lies outside that range. Memory is
  O(num_points) per block: chunk very large evaluations.
  """
  alpha = jnp.exp(jnp.asarray(log_alpha, jnp.float32))
  log_beta = jnp.asarray(log_alpha) + jnp.asarray(log_var)
  count = jnp.maximum(jnp.asarray(block_count, jnp.float32), 1.0)
  energy = jnp.maximum(jnp.asarray(error_energy, jnp.float32), jnp.finfo(jnp.float32).tiny)
  w = log_beta - (jnp.log(energy) - jnp.log(count))
  # Range of ln G: left tail P(G <= g) ~ g^alpha / Gamma(alpha + 1), right tail ~ exponential.
  lower = (math.log(1e-7) + gammaln(alpha + 1.0)) / alpha
  upper = jnp.log(alpha + 8.0 * jnp.sqrt(alpha) + 20.0)
  fraction = jnp.linspace(0.0, 1.0, num_points)
  z = lower[..., None] + (upper - lower)[..., None] * fraction
  spacing = (upper - lower) / (num_points - 1)
  cdf = gammainc(alpha[..., None], jnp.exp(z))
  # On [lower, upper]: integral of F^2, plus integral over z >= w of (1 - F)^2 - F^2 = 1 - 2F.
  # Both integrands are smooth, so the trapezoid rule is second order (no kink at w).
  square = cdf * cdf
  total_square = spacing * (jnp.sum(square, axis=-1) - 0.5 * (square[..., 0] + square[..., -1]))
  excess = 1.0 - 2.0 * cdf
  pieces = 0.5 * spacing[..., None] * (excess[..., 1:] + excess[..., :-1])
  tail = jnp.flip(jnp.cumsum(jnp.flip(pieces, -1), axis=-1), -1)  # integral from z_k to upper
  tail = jnp.concatenate([tail, jnp.zeros_like(tail[..., :1])], axis=-1)
  position = jnp.clip((w - lower) / spacing, 0.0, num_points - 1.0)
  index = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, num_points - 2)
  within = (position - index)[..., None]
  take = lambda values, k: jnp.take_along_axis(values, (index + k)[..., None], axis=-1)
  excess_at_w = (1.0 - within) * take(excess, 0) + within * take(excess, 1)
  tail_at_w = take(tail, 0) - within * spacing[..., None] * 0.5 * (take(excess, 0) + excess_at_w)
  inside = total_square + tail_at_w[..., 0]
  outside = jnp.maximum(lower - w, 0.0) + jnp.maximum(w - upper, 0.0)
  return _DB_PER_NEPER * (inside + outside)


@flax.struct.dataclass
class PostCalibration:
  """Scale factors alpha' = exp(log_alpha_scale) alpha, beta' = exp(log_beta_scale) beta."""

  log_alpha_scale: Float[Array, "..."]
  log_beta_scale: Float[Array, "..."]

  def to_dict(self) -> dict[str, list[float]]:
    """JSON-serialisable form (per-exit lists, or one-element lists for shared factors)."""
    return {"log_alpha_scale": np.atleast_1d(np.asarray(self.log_alpha_scale)).tolist(),
            "log_beta_scale": np.atleast_1d(np.asarray(self.log_beta_scale)).tolist()}

  @classmethod
  def from_dict(cls, values: dict[str, list[float]]) -> "PostCalibration":
    """Inverse of to_dict."""
    return cls(log_alpha_scale=jnp.asarray(values["log_alpha_scale"], jnp.float32),
               log_beta_scale=jnp.asarray(values["log_beta_scale"], jnp.float32))


def identity_post_calibration(num_exits: int = 1) -> PostCalibration:
  """Post-calibration that changes nothing."""
  return PostCalibration(jnp.zeros((num_exits,)), jnp.zeros((num_exits,)))


def apply_post_calibration(outputs: ExitOutputs, calibration: PostCalibration) -> ExitOutputs:
  """Scales alpha and beta (per exit or shared): log_alpha += a, log_var += b - a."""
  log_alpha_scale = jnp.reshape(jnp.asarray(calibration.log_alpha_scale), (-1, 1, 1, 1))
  log_beta_scale = jnp.reshape(jnp.asarray(calibration.log_beta_scale), (-1, 1, 1, 1))
  if log_alpha_scale.shape[0] not in (1, outputs.num_exits):
    raise ValueError(
        f"the post-calibration has {log_alpha_scale.shape[0]} factors; expected 1 or one per exit "
        f"({outputs.num_exits}).")
  return outputs.replace(
      log_alpha=outputs.log_alpha + log_alpha_scale,
      log_var=outputs.log_var + log_beta_scale - log_alpha_scale)


def fit_post_calibration(
    error_energy: Float[Array, "exits ..."],
    block_count: Float[Array, "..."],
    log_var: Float[Array, "exits ..."],
    log_alpha: Float[Array, "exits ..."],
    valid: Bool[Array, "..."] | None = None,
    per_exit: bool = False,
    max_log_scale: float = 10.0,
) -> PostCalibration:
  """Scale factors on alpha and beta maximising the Student-t likelihood of the block errors.

  The Student-t block likelihood is the exact marginal likelihood of the error energy
  ||e||^2 = T sigma_hat^2 under sigma^2 ~ InvGamma(alpha', beta'); L-BFGS-B on the log factors.
  """
  error_energy = jnp.asarray(error_energy, jnp.float32)
  shape = error_energy.shape
  count = jnp.broadcast_to(jnp.asarray(block_count, jnp.float32), shape)
  log_var = jnp.broadcast_to(jnp.asarray(log_var, jnp.float32), shape)
  log_alpha = jnp.broadcast_to(jnp.asarray(log_alpha, jnp.float32), shape)
  weight = count > 0
  if valid is not None:
    weight = weight & jnp.broadcast_to(jnp.asarray(valid, bool), shape)
  weight = weight.astype(jnp.float32)
  num_factors = shape[0] if per_exit else 1
  extra = (1,) * (len(shape) - 1)

  @jax.jit
  def objective(params):
    a = params[:num_factors].reshape((num_factors,) + extra)
    b = params[num_factors:].reshape((num_factors,) + extra)
    nll = student_t_nll(error_energy, count, log_var + b - a, log_alpha + a)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  value_and_grad = jax.jit(jax.value_and_grad(objective))

  def scipy_objective(params):
    value, grad = value_and_grad(jnp.asarray(params, jnp.float32))
    return float(value), np.asarray(grad, np.float64)

  result = scipy.optimize.minimize(
      scipy_objective, np.zeros(2 * num_factors), jac=True, method="L-BFGS-B",
      bounds=[(-max_log_scale, max_log_scale)] * (2 * num_factors))
  params = jnp.asarray(result.x, jnp.float32)
  return PostCalibration(log_alpha_scale=params[:num_factors], log_beta_scale=params[num_factors:])


def save_post_calibration(path: str, calibration: PostCalibration) -> None:
  """Writes the factors as JSON (e.g. next to a checkpoint)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(calibration.to_dict(), f, indent=2)


def load_post_calibration(path: str) -> PostCalibration:
  """Reads factors written by save_post_calibration."""
  with open(path) as f:
    return PostCalibration.from_dict(json.load(f))
