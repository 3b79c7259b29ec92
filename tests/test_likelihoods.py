"""Tests for press_jax.likelihoods against scipy references."""

import decimal
import fractions
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


@functools.lru_cache(None)
def _stirling_coefficients(terms):
  """B_2k / (2k (2k - 1)), k = 1..terms, as Decimal (Bernoulli numbers by Akiyama-Tanigawa)."""
  a, bernoulli = [], []
  for i in range(2 * terms + 1):
    a.append(fractions.Fraction(1, i + 1))
    for j in range(i, 0, -1):
      a[j - 1] = j * (a[j - 1] - a[j])
    bernoulli.append(a[0])
  with decimal.localcontext() as context:
    context.prec = 60
    return [decimal.Decimal(b.numerator) / b.denominator / (2 * k * (2 * k - 1))
            for k, b in ((k, bernoulli[2 * k]) for k in range(1, terms + 1))]


def _decimal_log_gamma(z):
  """lnΓ(z) - ln(2π)/2 for Decimal z > 0: recurrence up to z >= 40, then 15 Stirling terms."""
  product = decimal.Decimal(1)
  while z < 40:
    product *= z
    z += 1
  total = (z - decimal.Decimal("0.5")) * z.ln() - z - product.ln()
  power = 1 / z
  for coefficient in _stirling_coefficients(15):
    total += coefficient * power
    power /= z * z
  return total


def _precise_student_t_nll(energy, count, log_var, log_alpha):
  """(-ln L, d/dlog_alpha, d/dlog_var) in 50-digit Decimal arithmetic at the exact float inputs.

  Independent of gammaln/digamma and of the float formulas: lnΓ by recurrence + Stirling to ~1e-40,
  gradients by central differences with step 1e-20. Agrees with scipy float64 where that is
  accurate (test below); float64 itself loses ~1e-3 of the log_alpha gradient at α = 1e6.
  """
  with decimal.localcontext() as context:
    context.prec = 50
    e, h = decimal.Decimal(float(energy)), decimal.Decimal(float(count)) / 2

    def log_likelihood(lv, la):  # + h ln 2π
      alpha, log_beta = la.exp(), la + lv
      value = _decimal_log_gamma(alpha + h) - _decimal_log_gamma(alpha) - h * log_beta
      return value - (alpha + h) * (1 + e / (2 * log_beta.exp())).ln()

    lv, la = decimal.Decimal(float(log_var)), decimal.Decimal(float(log_alpha))
    step = decimal.Decimal("1e-20")
    d_alpha = (log_likelihood(lv, la + step) - log_likelihood(lv, la - step)) / (2 * step)
    d_var = (log_likelihood(lv + step, la) - log_likelihood(lv - step, la)) / (2 * step)
    nll = float(h) * math.log(2 * math.pi) - float(log_likelihood(lv, la))
    return nll, -float(d_alpha), -float(d_var)


def _student_t_grid():
  """float32 (energy, count, log_var, log_alpha) over α in logspace(-2, 6), T in {1, 50, 2000}."""
  rows = [(0.09, 1.0, math.log(0.09), math.log(1e4))]  # the case
  for count in (1.0, 50.0, 2000.0):
    for var, ratio in [(1.0, 0.0), (0.09, 0.05), (0.09, 1.0), (3.0, 1.0), (3.0, 20.0)]:
      for alpha in np.logspace(-2, 6, 17):  # ratio = sigma_hat^2 / var, 0: silence
        rows.append((ratio * count * var, count, math.log(var), math.log(alpha)))
  return tuple(np.asarray(column, np.float32) for column in zip(*rows))


@jax.jit
def _student_t_value_and_grads(energy, count, log_var, log_alpha):
  grad = jax.grad(lambda lv, la: jnp.sum(likelihoods.student_t_nll(energy, count, lv, la)),
                  argnums=(0, 1))
  return (likelihoods.student_t_nll(energy, count, log_var, log_alpha),
          *grad(log_var, log_alpha))


def test_precise_reference_matches_scipy_float64():
  energy, count, log_var, log_alpha = (a.astype(np.float64) for a in _student_t_grid())
  keep = log_alpha <= math.log(100.0)  # where the float64 digamma difference is accurate
  alpha, half = np.exp(log_alpha[keep]), count[keep] / 2
  ratio = energy[keep] / (2 * alpha * np.exp(log_var[keep]))
  nll = -(scipy.special.gammaln(alpha + half) - scipy.special.gammaln(alpha)
          - half * (math.log(2 * math.pi) + log_alpha[keep] + log_var[keep])
          - (alpha + half) * np.log1p(ratio))
  d_alpha = -(alpha * (scipy.special.digamma(alpha + half) - scipy.special.digamma(alpha)) - half
              - alpha * np.log1p(ratio) + (alpha + half) * ratio / (1 + ratio))
  d_var = (half - energy[keep] / (2 * np.exp(log_var[keep]))) / (1 + ratio)
  reference = np.array([_precise_student_t_nll(*row) for row in zip(
      energy[keep], count[keep], log_var[keep], log_alpha[keep])])
  np.testing.assert_allclose(reference[:, 0], nll, rtol=1e-12)
  np.testing.assert_allclose(reference[:, 1], d_alpha, rtol=1e-10)
  np.testing.assert_allclose(reference[:, 2], d_var, rtol=1e-10, atol=1e-10)


def test_student_t_float32_value_and_gradients_match_precise_reference():
  """float32 loss and jax.grad w.r.t. log_alpha and log_var against the 50-digit reference.

  Measured worst cases on this grid: loss 2e-7 (|nll| + h + 1) (9e-6 relative where nll ~ 0),
  log_alpha gradient 2.4e-4 relative (T = 2000, σ̂² = σ², where O(h^2/α) terms cancel to
  O(h/α)), log_var gradient 4e-7 (h + c) absolute with c = E/(2σ²) (the gradient is
  (h - c)/(1 + r), 0 at σ̂² = σ²). The direct gammaln form was up to 4e6 relative off in the
  log_alpha gradient (α = 1e6, T = 1) and -9.5e-3 instead of -2.5e-5 in the issue's case.
  """
  energy, count, log_var, log_alpha = _student_t_grid()
  nll, d_var, d_alpha = (np.asarray(a, np.float64) for a in _student_t_value_and_grads(
      energy, count, log_var, log_alpha))
  reference = np.array([_precise_student_t_nll(*row) for row in zip(
      energy, count, log_var, log_alpha)])
  half = count.astype(np.float64) / 2
  scale = half + energy / (2 * np.exp(log_var.astype(np.float64)))  # h + c
  np.testing.assert_array_less(np.abs(nll - reference[:, 0]),
                               2e-6 * (np.abs(reference[:, 0]) + half + 1))
  np.testing.assert_array_less(np.abs(d_alpha - reference[:, 1]), 1e-3 * np.abs(reference[:, 1]))
  np.testing.assert_array_less(np.abs(d_var - reference[:, 2]),
                               1e-3 * np.abs(reference[:, 2]) + 2e-6 * scale)
  # The case: α = 1e4, T = 1, E = 0.09, σ² = 0.09 (float32 gammaln form: -9.5e-3).
  np.testing.assert_allclose(d_alpha[0], -2.5e-5, rtol=1e-4)
  np.testing.assert_allclose(d_alpha[0], reference[0, 1], rtol=1e-5)


@pytest.mark.parametrize("half_count", [0.0, 0.5, 1.0, 25.0, 1000.0])
def test_log_gamma_ratio_minus_log_matches_precise_reference(half_count):
  # Across the switch to Stirling's series (α = 4 in float32) and up to α = 1e7.
  log_alpha = np.log(np.concatenate([np.logspace(-2, 7, 19), [3.999, 4.0, 4.001]])).astype(
      np.float32)
  value = np.asarray(likelihoods.log_gamma_ratio_minus_log(log_alpha, half_count), np.float64)
  grad = np.asarray(jax.grad(lambda la: jnp.sum(
      likelihoods.log_gamma_ratio_minus_log(la, half_count)))(log_alpha), np.float64)
  with decimal.localcontext() as context:
    context.prec = 50
    h, step = decimal.Decimal(half_count), decimal.Decimal("1e-20")
    f = lambda la: _decimal_log_gamma(la.exp() + h) - _decimal_log_gamma(la.exp()) - h * la
    la = [decimal.Decimal(float(x)) for x in log_alpha]
    ref_value = np.array([float(f(x)) for x in la])
    ref_grad = np.array([float((f(x + step) - f(x - step)) / (2 * step)) for x in la])
  # Relative 1e-6; below α = 4 (gammaln difference) plus ~8 eps times the size of its terms.
  alpha, h = np.exp(log_alpha.astype(np.float64)), half_count
  direct = alpha < 4.0
  value_floor = np.where(direct, 1e-6 * (1 + np.abs(scipy.special.gammaln(alpha + h))
                                         + np.abs(scipy.special.gammaln(alpha))
                                         + h * np.abs(np.log(alpha))), 1e-7)
  grad_floor = np.where(direct, 1e-6 * (1 + alpha * np.abs(scipy.special.digamma(alpha + h))
                                        + alpha * np.abs(scipy.special.digamma(alpha)) + h), 1e-7)
  np.testing.assert_array_less(np.abs(value - ref_value), 1e-6 * np.abs(ref_value) + value_floor)
  np.testing.assert_array_less(np.abs(grad - ref_grad), 1e-6 * np.abs(ref_grad) + grad_floor)


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
