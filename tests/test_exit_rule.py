"""Tests for press_jax.exit_rule: tail probabilities, the masked rule, splicing, policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from press_jax import exit_rule
from press_jax.likelihoods import num_blocks
from press_jax.types import ExitOutputs

# Eager op-by-op dispatch compiles every primitive; one jit per shape is much faster on CPU.
_probabilities = jax.jit(exit_rule.snr_exit_probabilities, static_argnames=("block_length",))
_exit_probabilities = jax.jit(exit_rule.exit_probabilities,
                              static_argnames=("block_length", "conditions"))
_splice_weights = jax.jit(exit_rule.splice_weights, static_argnums=(2, 3, 4, 5))
_block_exit_snr = jax.jit(exit_rule.block_exit_snr, static_argnums=(3,))
_oracle_policy = jax.jit(exit_rule.oracle_policy, static_argnums=(3,))


def _outputs(mean, log_var, log_alpha):
  return ExitOutputs(mean=jnp.asarray(mean, jnp.float32), log_var=jnp.asarray(log_var, jnp.float32),
                     log_alpha=jnp.asarray(log_alpha, jnp.float32))


def test_tail_probabilities_match_monte_carlo():
  rng = np.random.default_rng(0)
  block, draws, chunk = 2000, 16000, 4000
  estimate = rng.normal(size=block)
  estimate *= np.sqrt(block * 1.0 / np.sum(estimate ** 2))  # ||x_hat||^2 = T
  mixture = estimate + rng.normal(size=block) * np.sqrt(3.0)  # ||x_hat - x_mix||^2 ~ 3 T
  residual = estimate - mixture
  reference_power = 0.5
  # Error directions z ~ N(0, I_T), shared by every (alpha, beta); e = sigma z.
  z_energy, z_dot_estimate, z_dot_residual = [], [], []
  for _ in range(draws // chunk):
    z = rng.standard_normal((chunk, block), dtype=np.float32).astype(np.float64)
    z_energy.append(np.sum(z * z, axis=1))
    z_dot_estimate.append(z @ estimate)
    z_dot_residual.append(z @ residual)
  z_energy, z_dot_estimate, z_dot_residual = map(
      np.concatenate, (z_energy, z_dot_estimate, z_dot_residual))

  checked = 0
  for alpha in (1.5, 4.0, 12.0):
    for scale in (0.02, 0.3):  # beta / alpha
      beta = alpha * scale
      variance = scipy.stats.invgamma.rvs(alpha, scale=beta, size=draws, random_state=rng)
      sigma = np.sqrt(variance)
      error_energy = variance * z_energy
      # x = x_hat + e; SNR = ||x||^2/||e||^2, SNRi = ||x - x_mix||^2/||e||^2, SNRref = P/sigma^2.
      actual = {
          "snr": (np.sum(estimate ** 2) + 2 * sigma * z_dot_estimate + error_energy) / error_energy,
          "snri": (np.sum(residual ** 2) + 2 * sigma * z_dot_residual + error_energy)
                  / error_energy,
          "snr_ref": reference_power / variance,
      }
      outputs = _outputs(estimate[None, None, None], np.full((1, 1, 1, 1), np.log(scale)),
                         np.full((1, 1, 1, 1), np.log(alpha)))
      for level in (0.25, 0.5, 0.75):
        quantile = scipy.stats.invgamma.ppf(level, alpha, scale=beta)
        # Thresholds at which each condition's probability is non-trivial.
        for t_lin in (1 + 1.0 / quantile, 1 + 3.0 / quantile, reference_power / quantile):
          predicted = _probabilities(
              outputs, jnp.asarray(mixture[None], jnp.float32), None, block_length=block,
              target_db=10 * np.log10(t_lin), reference_power=reference_power)
          for name, values in actual.items():
            expected = np.mean(values >= t_lin)
            np.testing.assert_allclose(float(predicted[name].ravel()[0]), expected, atol=0.02,
                                       err_msg=f"{name} alpha={alpha} scale={scale} t={t_lin}")
            checked += 0.05 < expected < 0.95
  assert checked >= 40


def _numpy_probabilities(mean, log_var, log_alpha, mixture, mask, block_length, target_db,
                         reference_power=None):
  """Loop reference of the three tail probabilities and their max, float64."""
  exits, batch, speakers, samples = mean.shape
  blocks = num_blocks(samples, block_length)
  t_lin = 10 ** (target_db / 10)
  out = np.zeros((3, exits, batch, speakers, blocks))
  for b in range(batch):
    valid = mask[b] > 0
    p_ref = (np.sum(mixture[b, valid] ** 2) / valid.sum() if reference_power is None
             else reference_power)
    for blk in range(blocks):
      sl = slice(blk * block_length, (blk + 1) * block_length)
      keep = valid[sl]
      count = keep.sum()
      for e in range(exits):
        for j in range(speakers):
          alpha = np.exp(log_alpha[e, b, j, blk])
          beta = alpha * np.exp(log_var[e, b, j, blk])
          est = mean[e, b, j, sl][keep]
          res = est - mixture[b, sl][keep]
          if count == 0:
            continue
          out[0, e, b, j, blk] = (1.0 if t_lin <= 1 else scipy.special.gammaincc(
              alpha, (t_lin - 1) * beta * count / np.sum(est ** 2)))
          out[1, e, b, j, blk] = (1.0 if t_lin <= 1 else scipy.special.gammaincc(
              alpha, (t_lin - 1) * beta * count / np.sum(res ** 2)))
          out[2, e, b, j, blk] = scipy.special.gammaincc(alpha, t_lin * beta / p_ref)
  return out


def _loop_first_exit(p_exit, confidence):
  exits, batch, _, blocks = p_exit.shape
  choice = np.zeros((batch, blocks), int)
  for b in range(batch):
    for blk in range(blocks):
      for e in range(exits):
        if p_exit[e, b, :, blk].min() >= confidence or e == exits - 1:
          choice[b, blk] = e
          break
  return choice


def _random_problem(seed, exits=4, batch=2, speakers=2, samples=530, block_length=200, valid=460):
  rng = np.random.default_rng(seed)
  blocks = num_blocks(samples, block_length)
  mean = rng.normal(size=(exits, batch, speakers, samples)).astype(np.float32)
  log_var = (rng.normal(size=(exits, batch, speakers, blocks)) * 1.5 - 2.5).astype(np.float32)
  log_alpha = rng.normal(size=(exits, batch, speakers, blocks)).astype(np.float32) + 1.0
  mixture = (mean[0].sum(axis=1) + rng.normal(size=(batch, samples))).astype(np.float32)
  mask = np.ones((batch, samples), np.float32)
  mask[1, valid:] = 0.0
  return mean, log_var, log_alpha, mixture, mask


@pytest.mark.parametrize("reference_power", [None, 0.7])
def test_selection_matches_python_loop_with_hard_switching(reference_power):
  mean, log_var, log_alpha, mixture, mask = _random_problem(1)
  outputs = _outputs(mean, log_var, log_alpha)
  block_length, target_db, confidence = 200, 8.0, 0.6
  selection = exit_rule.select_exits(
      outputs, mixture, mask, block_length=block_length, target_db=target_db,
      confidence=confidence, sample_rate=8000, reference_power=reference_power, crossfade_ms=0.0)
  reference = _numpy_probabilities(mean.astype(np.float64), log_var, log_alpha, mixture, mask,
                                   block_length, target_db, reference_power)
  np.testing.assert_allclose(np.asarray(selection.probabilities), reference.max(axis=0),
                             atol=2e-4)
  expected_choice = _loop_first_exit(reference.max(axis=0), confidence)
  valid_blocks = np.asarray(selection.block_valid)
  np.testing.assert_array_equal(np.asarray(selection.exit_index)[valid_blocks],
                                expected_choice[valid_blocks])
  assert len(np.unique(expected_choice)) > 1  # the problem is not degenerate
  waveform = np.asarray(selection.waveform)
  for b in range(2):
    for blk in range(3):
      sl = slice(blk * block_length, (blk + 1) * block_length)
      np.testing.assert_allclose(
          waveform[b, :, sl], mean[expected_choice[b, blk], b, :, sl] * mask[b, sl], atol=1e-6)


def test_condition_subsets():
  mean, log_var, log_alpha, mixture, mask = _random_problem(2)
  outputs = _outputs(mean, log_var, log_alpha)
  reference = _numpy_probabilities(mean.astype(np.float64), log_var, log_alpha, mixture, mask,
                                   200, 8.0)
  for names, rows in [(("snr",), [0]), (("snri", "snr_ref"), [1, 2])]:
    values = _exit_probabilities(outputs, mixture, mask, block_length=200, target_db=8.0,
                                 conditions=names)
    np.testing.assert_allclose(np.asarray(values), reference[rows].max(axis=0), atol=2e-4)
  with pytest.raises(ValueError, match="conditions"):
    exit_rule.exit_probabilities(outputs, mixture, mask, block_length=200, target_db=8.0,
                                 conditions=("sdr",))
  # SNRref reads no estimate: without one (the dynamic path's variance-only stages) it gives
  # the same values as the numpy reference, and the estimate conditions refuse.
  free = outputs.replace(mean=None)
  values = exit_rule.exit_probabilities(free, mixture, mask, block_length=200, target_db=8.0,
                                        conditions=("snr_ref",))
  np.testing.assert_allclose(np.asarray(values), reference[2], atol=2e-4)
  assert not exit_rule.needs_estimate(("snr_ref",)) and exit_rule.needs_estimate(("snri",))
  with pytest.raises(ValueError, match="need the exits' estimates"):
    exit_rule.exit_probabilities(free, mixture, mask, block_length=200, target_db=8.0,
                                 conditions=("snr", "snr_ref"))


def test_zero_energies_give_zero_probability_not_nan():
  mean = np.zeros((1, 1, 1, 20), np.float32)
  outputs = _outputs(mean, np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 1, 2)))
  tails = _probabilities(outputs, np.zeros((1, 20)), None, block_length=10,
                                           target_db=5.0)
  for name in exit_rule.CONDITIONS:
    np.testing.assert_array_equal(np.asarray(tails[name]), 0.0)
  below_one = _probabilities(outputs, np.ones((1, 20)), None, block_length=10,
                                               target_db=-3.0)
  np.testing.assert_array_equal(np.asarray(below_one["snr"]), 1.0)
  assert np.all(np.isfinite(np.asarray(below_one["snr_ref"])))


def test_crossfade_weights_partition_of_unity():
  rng = np.random.default_rng(3)
  exits, block_length, crossfade, samples = 4, 200, 80, 930
  blocks = num_blocks(samples, block_length)
  exit_index = jnp.asarray(rng.integers(0, exits, size=(2, blocks)), jnp.int32)
  exit_index = exit_index.at[0, 1].set(0).at[0, 2].set(3)
  block_valid = np.ones((2, blocks), bool)
  block_valid[1, -1] = False  # a padded last block is never faded in
  weights = np.asarray(_splice_weights(exit_index, jnp.asarray(block_valid), exits,
                                                samples, block_length, crossfade))
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
  hard = np.asarray(_splice_weights(exit_index, jnp.asarray(block_valid), exits,
                                             samples, block_length, 0))
  own = np.asarray(jax.nn.one_hot(exit_index, exits))[:, np.arange(samples) // block_length]
  np.testing.assert_array_equal(hard, np.swapaxes(own, 1, 2))
  distance = np.abs(np.arange(samples)[:, None] - np.arange(1, blocks)[None] * block_length)
  far = distance.min(axis=1) >= crossfade // 2
  np.testing.assert_allclose(weights[:, :, far], hard[:, :, far], atol=1e-7)
  # Border between block 1 (exit 0) and block 2 (exit 3) of utterance 0: 0.5 each, symmetric ramp.
  border = 2 * block_length
  np.testing.assert_allclose(weights[0, [0, 3], border], [0.5, 0.5], atol=1e-6)
  for k in range(1, crossfade // 2):
    np.testing.assert_allclose(weights[0, 3, border + k] + weights[0, 3, border - k], 1.0,
                               atol=1e-6)
    assert weights[0, 3, border + k] >= weights[0, 3, border + k - 1]
  # Utterance 1's last block is padding: the block before it keeps its own choice to the end.
  last_valid = (blocks - 1) * block_length
  np.testing.assert_allclose(weights[1, :, last_valid - 10:last_valid],
                             hard[1, :, last_valid - 10:last_valid])


def test_selection_with_crossfade_is_weighted_sum():
  mean, log_var, log_alpha, mixture, mask = _random_problem(4)
  outputs = _outputs(mean, log_var, log_alpha)
  selection = exit_rule.select_exits(outputs, mixture, mask, block_length=200, target_db=8.0,
                                     confidence=0.6, sample_rate=8000, crossfade_ms=10.0)
  weights = _splice_weights(selection.exit_index, selection.block_valid, 4, 530, 200, 80)
  expected = np.einsum("bes,ebjs->bjs", np.asarray(weights), mean) * mask[:, None]
  np.testing.assert_allclose(np.asarray(selection.waveform), expected, atol=1e-5)


def _primitive_names(jaxpr):
  """All primitive names in a jaxpr, recursing into sub-jaxprs (pjit, scan, custom_jvp, ...)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for item in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(item, jax.extend.core.ClosedJaxpr):
          names |= _primitive_names(item.jaxpr)
        elif isinstance(item, jax.extend.core.Jaxpr):
          names |= _primitive_names(item)
  return names


def test_selection_has_no_cond_and_does_not_recompile_for_t_and_p():
  mean, log_var, log_alpha, mixture, mask = _random_problem(5)
  outputs = _outputs(mean, log_var, log_alpha)
  select = functools.partial(exit_rule.select_exits, block_length=200, sample_rate=8000)
  closed = jax.make_jaxpr(lambda t, p: select(outputs, mixture, mask, target_db=t, confidence=p))(
      8.0, 0.6)
  names = _primitive_names(closed.jaxpr)
  assert "pjit" in names or "jit" in names
  assert "igammac" in names or any("gamma" in n for n in names)
  assert "cond" not in names and "while" not in names
  select(outputs, mixture, mask, target_db=8.0, confidence=0.6)
  cache_size = exit_rule._select_exits_core._cache_size()
  for t, p in [(3.0, 0.9), (25.0, 0.1)]:
    select(outputs, mixture, mask, target_db=t, confidence=p)
  assert exit_rule._select_exits_core._cache_size() == cache_size


def test_bad_inputs_raise_helpful_errors():
  mean, log_var, log_alpha, mixture, mask = _random_problem(6)
  outputs = _outputs(mean, log_var, log_alpha)
  select = functools.partial(exit_rule.select_exits, block_length=200, sample_rate=8000,
                             target_db=8.0)
  for p in (0.0, 1.0, 1.5, -0.2):
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
      select(outputs, mixture, mask, confidence=p)
  with pytest.raises(ValueError, match="mixture must be"):
    select(outputs, mixture[:, :-1], mask, confidence=0.5)
  with pytest.raises(ValueError, match="mask must be"):
    select(outputs, mixture, mask[:1], confidence=0.5)
  with pytest.raises(ValueError, match="log_var must be"):
    select(outputs.replace(log_var=outputs.log_var[..., :2]), mixture, mask, confidence=0.5)
  with pytest.raises(ValueError, match="log_alpha must be"):
    select(outputs.replace(log_alpha=outputs.log_alpha[:2]), mixture, mask, confidence=0.5)
  with pytest.raises(ValueError, match="shorter than a block"):
    select(outputs, mixture, mask, confidence=0.5, crossfade_ms=25.0)
  with pytest.raises(ValueError, match="sample_rate"):
    exit_rule.select_exits(outputs, mixture, mask, block_length=200, sample_rate=0,
                           target_db=8.0, confidence=0.5)


def test_oracle_policy_regret_and_cost():
  rng = np.random.default_rng(7)
  exits, batch, speakers, samples, block_length = 3, 2, 2, 50, 20
  targets = rng.normal(size=(batch, speakers, samples)).astype(np.float32)
  noise_levels = np.array([1.0, 0.3, 0.05])[:, None, None, None]
  mean = (targets[None] + noise_levels * rng.normal(size=(exits, batch, speakers, samples)) *
          rng.uniform(0.2, 3.0, size=(exits, batch, speakers, 1))).astype(np.float32)
  zeros = np.zeros((exits, batch, speakers, 3))
  outputs = _outputs(mean, zeros, zeros)
  mask = np.ones((batch, samples), np.float32)
  mask[1, 45:] = 0.0
  target_db = 12.0
  block_snr = np.asarray(_block_exit_snr(outputs, targets, mask, block_length))
  choice = np.asarray(_oracle_policy(outputs, targets, mask, block_length, target_db))
  for b in range(batch):
    for blk in range(3):
      sl = slice(blk * block_length, (blk + 1) * block_length)
      snrs = []
      for e in range(exits):
        x = targets[b, :, sl] * mask[b, sl]
        err = (targets[b, :, sl] - mean[e, b, :, sl]) * mask[b, sl]
        snrs.append(10 * np.log10(np.sum(x ** 2, axis=-1) / np.sum(err ** 2, axis=-1)))
      snrs = np.array(snrs)
      np.testing.assert_allclose(block_snr[:, b, :, blk], snrs, atol=1e-3)
      accepted = [e for e in range(exits) if snrs[e].min() >= target_db] + [exits - 1]
      assert choice[b, blk] == accepted[0]
  chosen = np.asarray(exit_rule.chosen_block_snr(jnp.asarray(block_snr), jnp.asarray(choice)))
  expected_regret = np.mean(np.maximum(0.0, target_db - chosen))
  np.testing.assert_allclose(float(exit_rule.one_sided_regret(chosen, target_db)),
                             expected_regret, rtol=1e-6)
  gmac = np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(float(exit_rule.exit_cost(choice, gmac)), gmac[choice].mean())
  static = exit_rule.static_policy(1, (batch, 3))
  np.testing.assert_allclose(float(exit_rule.exit_cost(static, gmac)), 2.0)
  uniform = np.asarray(exit_rule.uniform_policy(jax.random.key(0), exits, (1000,)))
  assert uniform.min() == 0 and uniform.max() == exits - 1
  valid = np.array([[True, True, True], [True, True, False]])
  np.testing.assert_allclose(float(exit_rule.exit_cost(choice, gmac, valid)),
                             gmac[choice][valid].mean(), rtol=1e-6)
