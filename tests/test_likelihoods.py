"""Tests for press_jax.likelihoods against scipy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats

from press_jax import likelihoods
from press_jax import metrics
from press_jax.types import ExitOutputs

# Eager op-by-op dispatch compiles every primitive; one jit per shape is much faster on CPU.
press_loss = jax.jit(likelihoods.press_loss, static_argnames="config")
pairwise_loss = jax.jit(likelihoods.pairwise_loss, static_argnames="config")


def _numpy_student_t_nll(energy, count, log_var, log_alpha):
  """Independent float64 formula of -ln L for one block."""
  alpha = math.exp(log_alpha)
  beta = alpha * math.exp(log_var)
  return -(scipy.special.gammaln(alpha + count / 2) - scipy.special.gammaln(alpha)
           - count / 2 * math.log(2 * math.pi * beta)
           - (alpha + count / 2) * math.log1p(energy / (2 * beta)))


@pytest.mark.parametrize("block", [3, 4, 5, 6, 8])
def test_student_t_matches_scipy_multivariate_t(block):
  rng = np.random.default_rng(block)
  for _ in range(4):
    alpha = rng.uniform(0.3, 20.0)
    scale2 = math.exp(rng.uniform(-3.0, 2.0))
    mean = rng.normal(size=block)
    x = mean + rng.normal(size=block) * math.sqrt(scale2) * rng.uniform(0.2, 3.0)
    reference = -scipy.stats.multivariate_t(
        loc=mean, shape=scale2 * np.eye(block), df=2 * alpha).logpdf(x)
    nll = likelihoods.student_t_nll(
        np.sum((x - mean) ** 2), float(block), math.log(scale2), math.log(alpha))
    np.testing.assert_allclose(float(nll), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("alpha,beta,energy,block", [
    (2.0, 0.5, 1.3, 3), (0.7, 0.02, 0.5, 5), (8.0, 3.0, 0.1, 4), (1.5, 1.0, 20.0, 8)])
def test_student_t_matches_gaussian_inverse_gamma_integral(alpha, beta, energy, block):
  def log_integrand(log_variance):
    variance = math.exp(log_variance)
    log_gauss = -0.5 * block * math.log(2 * math.pi * variance) - energy / (2 * variance)
    log_prior = scipy.stats.invgamma.logpdf(variance, alpha, scale=beta)
    return log_gauss + log_prior + log_variance  # d sigma^2 = sigma^2 d log sigma^2
  grid = np.linspace(-40, 40, 4001)
  peak = max(log_integrand(u) for u in grid)
  value, _ = scipy.integrate.quad(
      lambda u: math.exp(log_integrand(u) - peak), -40, 40, limit=500, points=[grid[np.argmax(
          [log_integrand(u) for u in grid])]])
  reference = -(math.log(value) + peak)
  nll = likelihoods.student_t_nll(energy, float(block), math.log(beta / alpha), math.log(alpha))
  np.testing.assert_allclose(float(nll), reference, rtol=1e-5, atol=1e-4)


def test_gaussian_nll_matches_scipy_norm():
  rng = np.random.default_rng(1)
  error = rng.normal(size=7) * 0.3
  log_var = math.log(0.2)
  reference = -np.sum(scipy.stats.norm(0.0, math.sqrt(0.2)).logpdf(error))
  nll = likelihoods.gaussian_nll(np.sum(error ** 2), 7.0, log_var)
  np.testing.assert_allclose(float(nll), reference, rtol=1e-6)


def test_zero_count_blocks_contribute_nothing():
  nll = likelihoods.student_t_nll(jnp.array([0.0, 5.0]), jnp.array([0.0, 0.0]),
                                  jnp.array([0.3, -2.0]), jnp.array([1.0, -3.0]))
  np.testing.assert_array_equal(np.asarray(nll), 0.0)
  np.testing.assert_array_equal(
      np.asarray(likelihoods.gaussian_nll(jnp.array([0.0, 5.0]), jnp.zeros(2), jnp.zeros(2))), 0.0)


def test_block_sums_ragged_and_masked():
  values = np.arange(7.0)[None]
  mask = np.array([[1, 1, 1, 1, 1, 0, 0]], np.float32)
  np.testing.assert_allclose(likelihoods.block_sums(values, None, 3), [[3.0, 12.0, 6.0]])
  np.testing.assert_allclose(likelihoods.block_sums(values, mask, 3), [[3.0, 7.0, 0.0]])
  np.testing.assert_allclose(likelihoods.block_sums(mask, None, 3), [[3.0, 2.0, 0.0]])


def _random_outputs(rng, exits, batch, speakers, samples, block_length, scale=1.0):
  blocks = likelihoods.num_blocks(samples, block_length)
  return ExitOutputs(
      mean=jnp.asarray(rng.normal(size=(exits, batch, speakers, samples)) * scale, jnp.float32),
      log_var=jnp.asarray(rng.normal(size=(exits, batch, speakers, blocks)) - 1.0, jnp.float32),
      log_alpha=jnp.asarray(rng.normal(size=(exits, batch, speakers, blocks)) + 1.0, jnp.float32))


@pytest.mark.parametrize("kind", ["student_t", "gaussian"])
def test_ragged_last_block_matches_manual_numpy(kind):
  rng = np.random.default_rng(2)
  samples, block_length = 45, 20  # blocks of 20, 20, 5
  outputs = _random_outputs(rng, 2, 1, 2, samples, block_length)
  targets = rng.normal(size=(1, 2, samples))
  config = likelihoods.LossConfig(kind=kind, block_length=block_length)
  pairwise = np.asarray(pairwise_loss(outputs, targets, None, config))
  mean = np.asarray(outputs.mean, np.float64)
  for e in range(2):
    for i in range(2):
      for j in range(2):
        total = 0.0
        for b, (start, stop) in enumerate([(0, 20), (20, 40), (40, 45)]):
          error = targets[0, j, start:stop] - mean[e, 0, i, start:stop]
          log_var = float(outputs.log_var[e, 0, i, b])
          if kind == "student_t":
            total += _numpy_student_t_nll(np.sum(error ** 2), stop - start, log_var,
                                          float(outputs.log_alpha[e, 0, i, b]))
          else:
            total -= np.sum(scipy.stats.norm(0, math.exp(log_var / 2)).logpdf(error))
        np.testing.assert_allclose(pairwise[e, 0, i, j], total / (samples * 2), rtol=2e-5)


@pytest.mark.parametrize("kind", ["student_t", "gaussian", "si_snr"])
def test_padding_does_not_change_the_loss(kind):
  rng = np.random.default_rng(3)
  samples, valid, block_length = 50, 37, 20
  outputs = _random_outputs(rng, 2, 1, 2, samples, block_length)
  targets = rng.normal(size=(1, 2, samples)).astype(np.float32)
  mask = np.zeros((1, samples), np.float32)
  mask[:, :valid] = 1.0
  config = likelihoods.LossConfig(kind=kind, block_length=block_length)
  loss, _ = press_loss(outputs, targets, mask, config)
  # Garbage in the padding changes nothing.
  noisy_targets = targets.copy()
  noisy_targets[..., valid:] = 1e3
  noisy_outputs = outputs.replace(mean=outputs.mean.at[..., valid:].set(-7.0))
  loss_noisy, _ = press_loss(noisy_outputs, noisy_targets, mask, config)
  np.testing.assert_allclose(float(loss_noisy), float(loss), rtol=1e-6)
  # Same as the unpadded utterance (its last block is ragged: 17 samples).
  blocks = likelihoods.num_blocks(valid, block_length)
  trimmed = ExitOutputs(mean=outputs.mean[..., :valid], log_var=outputs.log_var[..., :blocks],
                        log_alpha=outputs.log_alpha[..., :blocks])
  loss_trimmed, _ = press_loss(trimmed, targets[..., :valid], None, config)
  np.testing.assert_allclose(float(loss_trimmed), float(loss), rtol=1e-5)


def test_si_snr_pairwise_loss_is_negative_si_snr_over_speakers():
  rng = np.random.default_rng(4)
  outputs = _random_outputs(rng, 1, 2, 2, 64, 16)
  targets = rng.normal(size=(2, 2, 64)).astype(np.float32)
  config = likelihoods.LossConfig(kind="si_snr", block_length=16)
  pairwise = pairwise_loss(outputs, targets, None, config)
  expected = -metrics.si_snr(outputs.mean[0, 1, 0], targets[1, 1]) / 2
  np.testing.assert_allclose(float(pairwise[0, 1, 0, 1]), float(expected), rtol=1e-5)


def _extreme_cases():
  samples = 40
  zeros = np.zeros((1, 1, samples), np.float32)
  return {
      "silence": (zeros, zeros, 0.0, 0.0),
      "huge_error": (zeros, np.full((1, 1, samples), 1e4, np.float32), -30.0, 0.0),
      "tiny_variance": (zeros, np.full((1, 1, samples), 1e-3, np.float32), -80.0, 0.0),
      "alpha_floor": (zeros, np.full((1, 1, samples), 0.5, np.float32), 0.0, math.log(1e-3)),
      "alpha_floor_silence": (zeros, zeros, -5.0, math.log(1e-3)),
      "large_alpha": (zeros, np.full((1, 1, samples), 0.5, np.float32), 0.0, 12.0),
  }


@functools.partial(jax.jit, static_argnames="config")
def _value_and_grad(mean, log_var, log_alpha, target, config):
  def loss_fn(mean, log_var, log_alpha):
    outputs = ExitOutputs(mean=mean[None], log_var=log_var, log_alpha=log_alpha)
    return likelihoods.press_loss(outputs, target, None, config)[0]
  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(mean, log_var, log_alpha)


@pytest.mark.parametrize("kind", ["student_t", "gaussian"])
@pytest.mark.parametrize("case", sorted(_extreme_cases()))
def test_gradients_are_finite_for_extreme_inputs(kind, case):
  target, mean, log_var, log_alpha = _extreme_cases()[case]
  config = likelihoods.LossConfig(kind=kind, block_length=16)
  blocks = likelihoods.num_blocks(target.shape[-1], 16)

  args = (jnp.asarray(mean), jnp.full((1, 1, 1, blocks), log_var),
          jnp.full((1, 1, 1, blocks), log_alpha), jnp.asarray(target))
  value, grads = _value_and_grad(*args, config=config)
  assert np.isfinite(float(value)), case
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad))), case


def test_loss_config_validation():
  with pytest.raises(ValueError, match="kind"):
    likelihoods.LossConfig(kind="laplace")
  with pytest.raises(ValueError, match="block_length"):
    likelihoods.LossConfig(block_length=0)
  with pytest.raises(ValueError, match="permutation"):
    likelihoods.LossConfig(permutation="greedy")
  with pytest.raises(ValueError, match="exit_weights"):
    likelihoods.LossConfig(exit_weights=(1.0, -1.0))
  assert likelihoods.LossConfig(exit_weights=[1, 2]).exit_weights == (1.0, 2.0)


def test_press_loss_weights_and_shape_errors():
  rng = np.random.default_rng(5)
  outputs = _random_outputs(rng, 3, 2, 2, 40, 16)
  targets = rng.normal(size=(2, 2, 40)).astype(np.float32)
  config = likelihoods.LossConfig(block_length=16)
  loss, aux = press_loss(outputs, targets, None, config)
  np.testing.assert_allclose(float(loss), float(jnp.sum(aux["per_exit_loss"])), rtol=1e-5)
  weighted = likelihoods.LossConfig(block_length=16, exit_weights=(0.0, 0.0, 1.0))
  loss_last, _ = press_loss(outputs, targets, None, weighted)
  with pytest.raises(ValueError, match="exit_weights"):
    press_loss(outputs, targets, None,
                           likelihoods.LossConfig(block_length=16, exit_weights=(1.0, 1.0)))
  with pytest.raises(ValueError, match="blocks"):
    press_loss(outputs, targets, None, likelihoods.LossConfig(block_length=8))
  with pytest.raises(ValueError, match="mask"):
    press_loss(outputs, targets, np.ones((2, 39)), config)
  assert float(loss_last) <= float(aux["per_exit_loss"][2]) + 1e-5
