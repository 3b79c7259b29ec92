"""Tests for press_jax.metrics against numpy and fast_bss_eval references."""

import fast_bss_eval.numpy as fbe
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from press_jax import calibration
from press_jax import metrics
from press_jax.types import ExitOutputs

# Eager op-by-op dispatch compiles every primitive; one jit per shape is much faster on CPU.
_si_snr = jax.jit(metrics.si_snr)
_pit_si_snr = jax.jit(metrics.pit_si_snr)
_si_snr_improvement = jax.jit(metrics.si_snr_improvement)
_crps_db = jax.jit(calibration.crps_db, static_argnames="num_points")


def _numpy_si_snr(estimate, target):
  """Plain float64 SI-SNR of one pair."""
  estimate = estimate - estimate.mean()
  target = target - target.mean()
  projection = (estimate @ target) / (target @ target) * target
  return 10 * np.log10(np.sum(projection ** 2) / np.sum((estimate - projection) ** 2))


def _correlated_pair(rng, speakers, samples, noise=0.5):
  reference = rng.normal(size=(speakers, samples))
  estimate = reference + noise * rng.normal(size=(speakers, samples)) + 0.1
  return estimate, reference


def test_si_snr_matches_numpy_and_fast_bss_eval():
  rng = np.random.default_rng(0)
  estimate, target = _correlated_pair(rng, 3, 4000)
  ours = np.asarray(_si_snr(estimate.astype(np.float32), target.astype(np.float32)))
  reference = [_numpy_si_snr(estimate[j], target[j]) for j in range(3)]
  np.testing.assert_allclose(ours, reference, atol=1e-3)
  fast = fbe.si_sdr(target, estimate, zero_mean=True)
  np.testing.assert_allclose(ours, fast, atol=1e-3)


def test_si_snr_mask_ignores_padding_and_is_scale_invariant():
  rng = np.random.default_rng(1)
  estimate, target = _correlated_pair(rng, 2, 1000)
  mask = np.zeros((1000,), np.float32)
  mask[:700] = 1.0
  padded_est = estimate.copy()
  padded_est[:, 700:] = 50.0
  masked = np.asarray(_si_snr(padded_est.astype(np.float32), target.astype(np.float32), mask))
  trimmed = [_numpy_si_snr(estimate[j, :700], target[j, :700]) for j in range(2)]
  np.testing.assert_allclose(masked, trimmed, atol=1e-3)
  scaled = np.asarray(_si_snr((3.0 * estimate).astype(np.float32), target.astype(np.float32)))
  np.testing.assert_allclose(scaled, np.asarray(_si_snr(estimate.astype(np.float32),
                                                        target.astype(np.float32))), atol=1e-4)
  silent = float(metrics.si_snr(np.zeros(10), np.zeros(10)))
  assert np.isfinite(silent)


def test_si_snr_improvement_and_pit():
  rng = np.random.default_rng(2)
  target = rng.normal(size=(1, 2, 2000))
  mixture = target.sum(axis=1)
  estimate = target[:, ::-1] + 0.2 * rng.normal(size=target.shape)
  values, perm = _pit_si_snr(estimate.astype(np.float32), target.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(perm), [[1, 0]])
  expected = [_numpy_si_snr(estimate[0, 0], target[0, 1]),
              _numpy_si_snr(estimate[0, 1], target[0, 0])]
  np.testing.assert_allclose(np.asarray(values)[0], expected, atol=1e-3)
  improvement = np.asarray(_si_snr_improvement(
      estimate[:, ::-1].astype(np.float32), target.astype(np.float32),
      mixture.astype(np.float32)))
  mixture_snr = [_numpy_si_snr(mixture[0], target[0, j]) for j in range(2)]
  np.testing.assert_allclose(improvement[0], np.array(expected[::-1]) - mixture_snr, atol=1e-3)


@pytest.mark.parametrize("filter_length", [512, 32])
def test_sdr_matches_fast_bss_eval(filter_length):
  rng = np.random.default_rng(3)
  estimate, reference = _correlated_pair(rng, 2, 3000, noise=0.7)
  # Estimates with some linear distortion the filter can explain.
  estimate = estimate + np.roll(reference, 3, axis=-1) * 0.3
  ours = metrics.sdr(estimate, reference, filter_length=filter_length)
  fast = fbe.sdr(reference, estimate, filter_length=filter_length)
  np.testing.assert_allclose(ours, fast, atol=0.01)
  # Uncorrelated random signals: compare through the permutation-invariant version.
  random_est = rng.normal(size=(2, 2, 2500))
  random_ref = rng.normal(size=(2, 2, 2500))
  ours_pit, _ = metrics.pit_sdr(random_est, random_ref, filter_length=filter_length)
  fast_pit = fbe.sdr(random_ref, random_est, filter_length=filter_length)
  np.testing.assert_allclose(np.sort(ours_pit, axis=-1), np.sort(fast_pit, axis=-1), atol=0.01)


def test_sdr_improvement_and_errors():
  rng = np.random.default_rng(4)
  reference = rng.normal(size=(2, 2000))
  mixture = reference.sum(axis=0)
  estimate = reference + 0.3 * rng.normal(size=reference.shape)
  improvement = metrics.sdr_improvement(estimate, reference, mixture, filter_length=64)
  expected = [fbe.sdr(reference[j:j + 1], estimate[j:j + 1], filter_length=64)[0]
              - fbe.sdr(reference[j:j + 1], mixture[None], filter_length=64)[0] for j in range(2)]
  np.testing.assert_allclose(improvement, expected, atol=0.01)
  with pytest.raises(ValueError, match="same number of samples"):
    metrics.sdr(estimate[:, :-1], reference)
  with pytest.raises(ValueError, match="filter_length"):
    metrics.sdr(estimate[:, :100], reference[:, :100], filter_length=512)


# ------------------------------------------------------------------------------------------
# Calibration (press_jax.calibration): PIT, KS distance, CRPS, post-calibration.
# ------------------------------------------------------------------------------------------


def _model_draws(rng, blocks=3000, block=2000):
  """Block error energies from the model: sigma^2 ~ InvGamma(alpha, beta), e ~ N(0, sigma^2 I)."""
  alpha = rng.uniform(2.0, 10.0, size=blocks)
  beta = alpha * np.exp(rng.normal(size=blocks) - 3.0)
  variance = scipy.stats.invgamma.rvs(alpha, scale=beta, random_state=rng)
  energy = variance * rng.chisquare(block, size=blocks)  # ||e||^2 given sigma^2
  return energy, np.full(blocks, float(block)), np.log(beta / alpha), np.log(alpha)


def test_pit_and_ks_distance():
  rng = np.random.default_rng(10)
  energy, count, log_var, log_alpha = _model_draws(rng)
  u = np.asarray(calibration.pit_values(energy, count, log_var, log_alpha))
  reference = scipy.stats.invgamma.cdf(energy / count, np.exp(log_alpha),
                                       scale=np.exp(log_alpha + log_var))
  np.testing.assert_allclose(u, reference, atol=1e-4)
  distance = calibration.ks_distance(u)
  np.testing.assert_allclose(distance, scipy.stats.kstest(u, "uniform").statistic, atol=1e-6)
  assert distance < 0.04
  overconfident = np.asarray(calibration.pit_values(energy, count, log_var - 1.0, log_alpha + 1.0))
  assert calibration.ks_distance(overconfident) > 0.2
  histogram = calibration.pit_histogram(u, bins=10)
  np.testing.assert_allclose(histogram.mean(), 1.0)


@pytest.mark.parametrize("alpha,beta,observed", [
    (3.0, 0.1, 0.05), (0.5, 0.2, 0.3), (20.0, 1.0, 0.01), (0.05, 1e-3, 3.0), (1.0, 1.0, 1e-6)])
def test_crps_db_matches_quadrature(alpha, beta, observed):
  # CRPS of Y = 10 log10 sigma^2 at y = 10 log10 sigma_hat^2: integral of (F_Y - 1[. >= y])^2.
  y = 10 * np.log10(observed)
  cdf = lambda v: scipy.stats.invgamma.cdf(10 ** (v / 10), alpha, scale=beta)
  median = 10 * np.log10(scipy.stats.invgamma.median(alpha, scale=beta))
  lo = min(y, 10 * np.log10(scipy.stats.invgamma.ppf(1e-12, alpha, scale=beta))) - 10
  hi = max(y, 10 * np.log10(scipy.stats.invgamma.ppf(1 - 1e-12, alpha, scale=beta))) + 10
  left = scipy.integrate.quad(lambda v: cdf(v) ** 2, lo, y, limit=500, points=[min(median, y)])
  right = scipy.integrate.quad(lambda v: (1 - cdf(v)) ** 2, y, hi, limit=500,
                               points=[max(median, y)])
  reference = left[0] + right[0]
  ours = float(_crps_db(observed * 2000, 2000.0, np.log(beta / alpha), np.log(alpha)))
  np.testing.assert_allclose(ours, reference, rtol=2e-3)


def test_post_calibration_recovers_scale_factors(tmp_path):
  rng = np.random.default_rng(11)
  energy, count, log_var, log_alpha = _model_draws(rng)
  # A miscalibrated model: alpha halved and beta 1.5x too large.
  bad_log_alpha = log_alpha - np.log(2.0)
  bad_log_var = log_var + np.log(1.5) + np.log(2.0)
  fitted = calibration.fit_post_calibration(energy[None], count, bad_log_var[None],
                                            bad_log_alpha[None])
  np.testing.assert_allclose(np.exp(np.asarray(fitted.log_alpha_scale)), [2.0], rtol=0.1)
  np.testing.assert_allclose(np.exp(np.asarray(fitted.log_beta_scale)), [1 / 1.5], rtol=0.1)
  outputs = ExitOutputs(mean=jnp.zeros((1, 1, 1, 4)),
                        log_var=jnp.asarray(bad_log_var[None, None, None, :4]),
                        log_alpha=jnp.asarray(bad_log_alpha[None, None, None, :4]))
  fixed = calibration.apply_post_calibration(outputs, fitted)
  np.testing.assert_allclose(np.asarray(fixed.alpha)[0, 0, 0], np.exp(log_alpha[:4]), rtol=0.1)
  np.testing.assert_allclose(np.asarray(fixed.beta)[0, 0, 0],
                             np.exp(log_alpha[:4] + log_var[:4]), rtol=0.1)
  path = str(tmp_path / "post_calibration.json")
  calibration.save_post_calibration(path, fitted)
  loaded = calibration.load_post_calibration(path)
  np.testing.assert_allclose(np.asarray(loaded.log_alpha_scale), np.asarray(fitted.log_alpha_scale))
  per_exit = calibration.fit_post_calibration(
      np.stack([energy[:500], energy[500:1000]]), count[:500],
      np.stack([bad_log_var[:500], log_var[500:1000]]),
      np.stack([bad_log_alpha[:500], log_alpha[500:1000]]), per_exit=True)
  assert per_exit.log_alpha_scale.shape == (2,)
  assert abs(float(per_exit.log_alpha_scale[1])) < 0.3 < float(per_exit.log_alpha_scale[0])
