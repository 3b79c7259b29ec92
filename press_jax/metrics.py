"""Separation metrics: SI-SNR (jnp, differentiable) and BSS-eval v4 style SDR (numpy)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from jaxtyping import Array, Float

from press_jax import permutation as permutation_lib

# Added to both energies of every ratio (and to the target energy of the projection) so that
# silent signals give 0/0 -> (eps / eps) instead of NaN. Negligible for any audible signal.
DEFAULT_EPS = 1e-8


def _masked_zero_mean(signal: jax.Array, mask: jax.Array) -> jax.Array:
  """Subtracts the mean over valid samples and zeroes the padding."""
  count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
  mean = jnp.sum(signal * mask, axis=-1, keepdims=True) / count
  return (signal - mean) * mask


def si_snr(
    estimate: Float[Array, "... samples"],
    target: Float[Array, "... samples"],
    mask: Float[Array, "... samples"] | None = None,
    eps: float = DEFAULT_EPS,
) -> Float[Array, "..."]:
  """Scale-invariant SNR (= SI-SDR) in dB over the valid samples; eps only avoids 0/0."""
  estimate = jnp.asarray(estimate)
  target = jnp.asarray(target)
  dtype = jnp.result_type(estimate.dtype, target.dtype, jnp.float32)
  if mask is None:
    mask = jnp.ones(jnp.broadcast_shapes(estimate.shape, target.shape)[-1:], dtype)
  mask = jnp.asarray(mask).astype(dtype)
  estimate = _masked_zero_mean(estimate.astype(dtype), mask)
  target = _masked_zero_mean(target.astype(dtype), mask)
  target_energy = jnp.sum(target * target, axis=-1, keepdims=True)
  scale = jnp.sum(estimate * target, axis=-1, keepdims=True) / (target_energy + eps)
  projection = scale * target
  noise = estimate - projection
  signal_energy = jnp.sum(projection * projection, axis=-1)
  noise_energy = jnp.sum(noise * noise, axis=-1)
  return 10.0 * (jnp.log10(signal_energy + eps) - jnp.log10(noise_energy + eps))


def si_snr_improvement(
    estimate: Float[Array, "... speakers samples"],
    target: Float[Array, "... speakers samples"],
    mixture: Float[Array, "... samples"],
    mask: Float[Array, "... samples"] | None = None,
    eps: float = DEFAULT_EPS,
) -> Float[Array, "... speakers"]:
  """SI-SNRi: SI-SNR of the estimate minus SI-SNR of the mixture, per speaker."""
  mixture = jnp.asarray(mixture)[..., None, :]
  if mask is not None:
    mask = jnp.asarray(mask)[..., None, :]
  return si_snr(estimate, target, mask, eps) - si_snr(mixture, target, mask, eps)


def pairwise_si_snr(
    estimate: Float[Array, "... speakers samples"],
    target: Float[Array, "... speakers samples"],
    mask: Float[Array, "... samples"] | None = None,
    eps: float = DEFAULT_EPS,
) -> Float[Array, "... speakers speakers"]:
  """SI-SNR of every estimate i (axis -2) against every target j (axis -1)."""
  if mask is not None:
    mask = jnp.asarray(mask)[..., None, None, :]
  return si_snr(
      jnp.asarray(estimate)[..., :, None, :], jnp.asarray(target)[..., None, :, :], mask, eps)


def pit_si_snr(
    estimate: Float[Array, "batch speakers samples"],
    target: Float[Array, "batch speakers samples"],
    mask: Float[Array, "batch samples"] | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[Float[Array, "batch speakers"], jax.Array]:
  """Permutation-invariant SI-SNR: per-speaker values at the best permutation, and it."""
  permutation_lib.check_speaker_counts(estimate.shape[-2], target.shape[-2])
  pairwise = pairwise_si_snr(estimate, target, mask, eps)
  perm = permutation_lib.best_permutation(-pairwise)
  values = jnp.take_along_axis(pairwise, perm[..., None], axis=-1)[..., 0]
  return values, perm


# ----------------------------------------------------------------------------------------------
# BSS-eval v4 style SDR (numpy). Same algorithm as fast_bss_eval.numpy.sdr: both signals are
# normalised to unit norm, the reference's autocorrelation (filter_length lags) forms a symmetric
# Toeplitz system R h = r whose right-hand side is the reference/estimate cross-correlation, the
# coherence c = r . h is the squared cosine between the estimate and the span of the reference's
# filter_length shifts, and SDR = 10 log10(c / (1 - c)).
# ----------------------------------------------------------------------------------------------


def _correlations(
    reference: np.ndarray, estimate: np.ndarray, filter_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Autocorrelation of the reference and its cross-correlation with the estimate, lags 0..K-1."""
  num_samples = reference.shape[-1]
  n_fft = 2 ** math.ceil(math.log2(2 * num_samples - 1))
  ref_spec = scipy.fft.rfft(reference, n=n_fft, axis=-1)
  est_spec = scipy.fft.rfft(estimate, n=n_fft, axis=-1)
  autocorrelation = scipy.fft.irfft(np.abs(ref_spec) ** 2, n=n_fft, axis=-1)
  crosscorrelation = scipy.fft.irfft(np.conj(ref_spec) * est_spec, n=n_fft, axis=-1)
  return autocorrelation[..., :filter_length], crosscorrelation[..., :filter_length]


def sdr(
    estimate: np.ndarray,
    reference: np.ndarray,
    filter_length: int = 512,
    zero_mean: bool = False,
    clamp_db: float | None = None,
) -> np.ndarray:
  """BSS-eval v4 SDR (dB) of each estimate against its aligned reference, over the last axis."""
  estimate = np.asarray(estimate, dtype=np.float64)
  reference = np.asarray(reference, dtype=np.float64)
  if estimate.shape[-1] != reference.shape[-1]:
    raise ValueError(
        f"estimate and reference need the same number of samples, got {estimate.shape[-1]} "
        f"and {reference.shape[-1]}.")
  if filter_length < 1 or filter_length > reference.shape[-1]:
    raise ValueError(
        f"filter_length must be in [1, samples={reference.shape[-1]}], got {filter_length}.")
  estimate, reference = np.broadcast_arrays(estimate, reference)
  if zero_mean:
    estimate = estimate - estimate.mean(axis=-1, keepdims=True)
    reference = reference - reference.mean(axis=-1, keepdims=True)
  estimate = estimate / np.maximum(np.linalg.norm(estimate, axis=-1, keepdims=True), 1e-6)
  reference = reference / np.maximum(np.linalg.norm(reference, axis=-1, keepdims=True), 1e-6)
  batch_shape = estimate.shape[:-1]
  flat_est = estimate.reshape(-1, estimate.shape[-1])
  flat_ref = reference.reshape(-1, reference.shape[-1])
  autocorrelation, crosscorrelation = _correlations(flat_ref, flat_est, filter_length)
  lags = np.abs(np.arange(filter_length)[:, None] - np.arange(filter_length)[None, :])
  coherence = np.empty(flat_est.shape[0])
  chunk = 16  # bounds the memory of the stacked (chunk, K, K) Toeplitz systems
  for start in range(0, flat_est.shape[0], chunk):
    rows = slice(start, start + chunk)
    systems = autocorrelation[rows][:, lags]  # symmetric Toeplitz R[k, l] = acf[|k - l|]
    solution = np.linalg.solve(systems, crosscorrelation[rows][..., None])[..., 0]
    coherence[rows] = np.sum(crosscorrelation[rows] * solution, axis=-1)
  if clamp_db is not None:
    limit = 10.0 ** (-clamp_db / 10.0)
    limit = limit / (1.0 + limit)
    coherence = np.clip(coherence, limit, 1.0 - limit)
  with np.errstate(divide="ignore"):
    values = 10.0 * np.log10(coherence / (1.0 - coherence))
  return values.reshape(batch_shape)


def sdr_improvement(
    estimate: np.ndarray,
    reference: np.ndarray,
    mixture: np.ndarray,
    filter_length: int = 512,
) -> np.ndarray:
  """SDRi: SDR of each estimate minus SDR of the mixture, per speaker."""
  mixture = np.asarray(mixture)[..., None, :]
  return (sdr(estimate, reference, filter_length)
          - sdr(np.broadcast_to(mixture, np.shape(reference)), reference, filter_length))


def pit_sdr(
    estimate: np.ndarray,
    reference: np.ndarray,
    filter_length: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
  """Permutation-invariant SDR over (..., speakers, samples): values and permutation."""
  estimate = np.asarray(estimate)
  reference = np.asarray(reference)
  permutation_lib.check_speaker_counts(estimate.shape[-2], reference.shape[-2])
  pairwise = sdr(estimate[..., :, None, :], reference[..., None, :, :], filter_length)
  perm = np.asarray(permutation_lib.best_permutation(-pairwise))
  values = np.take_along_axis(pairwise, perm[..., None], axis=-1)[..., 0]
  return values, perm
