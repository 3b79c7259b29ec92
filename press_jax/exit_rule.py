"""Probabilistic exit conditions, the masked (cond-free) exit rule, splicing, and policies."""

from __future__ import annotations

import functools
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc, gammaincc
from jaxtyping import Array, Bool, Float, Int

from press_jax.likelihoods import block_sums, num_blocks
from press_jax.types import ExitOutputs

CONDITIONS = ("snr", "snri", "snr_ref")
# The conditions that read the exit's estimate x_hat; SNRref needs only the predicted variance,
# so a rule without these can decide an exit before (or without) running its waveform head.
ESTIMATE_CONDITIONS = ("snr", "snri")
# Added to both energies of the true block SNR so that silent blocks give 0 dB instead of NaN.
SNR_EPS = 1e-8


@flax.struct.dataclass
class ExitSelection:
  """Result of the masked exit rule."""

  waveform: Float[Array, "batch speakers samples"]
  exit_index: Int[Array, "batch blocks"]
  probabilities: Float[Array, "exits batch speakers blocks"]
  block_valid: Bool[Array, "batch blocks"]


def _positive_log(energy: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log(energy) where energy > 0 (else 0) and the positivity mask."""
  positive = energy > 0
  return jnp.log(jnp.where(positive, energy, 1.0)), positive


def _tail(alpha: jax.Array, log_x: jax.Array, valid: jax.Array) -> jax.Array:
  """Q(alpha, exp(log_x)) where valid, else 0."""
  x = jnp.exp(jnp.where(valid, log_x, 0.0))
  return jnp.where(valid, gammaincc(alpha, x), 0.0)


def mixture_reference_power(
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None = None,
) -> Float[Array, "batch"]:
  """Mean power of the valid part of each input mixture (the default P_ref)."""
  mixture = jnp.asarray(mixture)
  if mask is None:
    mask = jnp.ones_like(mixture)
  mask = jnp.asarray(mask).astype(mixture.dtype)
  return jnp.sum(mixture * mixture * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


PROBABILITY_METHODS = ("approximate", "exact")


def _exact_tail(alpha, log_count, log_beta, log_energy_limit, valid):
  """P(||e||^2 <= E) for e ~ N(0, sigma^2 I_T), sigma^2 ~ InvGamma(alpha, beta), where valid.

  ||e||^2 / (T beta / alpha) ~ F(T, 2 alpha), so the probability is the regularised incomplete
  beta function I_x(T/2, alpha) at x = E / (E + 2 beta) (docs/exit_rule.md).
  """
  x = jax.nn.sigmoid(jnp.where(valid, log_energy_limit - jnp.log(2.0) - log_beta, 0.0))
  count = jnp.exp(jnp.where(valid, log_count, 0.0))
  return jnp.where(valid, betainc(0.5 * count, alpha, x), 0.0)


def snr_exit_probabilities(
    outputs: ExitOutputs,
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None,
    *,
    block_length: int,
    target_db: float | jax.Array,
    reference_power: float | jax.Array | None = None,
    method: str = "approximate",
) -> dict[str, Float[Array, "exits batch speakers blocks"]]:
  """P(SNR >= t), P(SNRi >= t), P(SNRref >= t) per exit, speaker and block (keys of CONDITIONS).

  method 'approximate' is the paper's large-T form (SPEC §4): the block's error energy taken as
  T sigma^2. 'exact' (beyond the paper) uses the error energy's exact distribution given the
  predicted inverse gamma, ||e||^2 / (T beta / alpha) ~ F(T, 2 alpha): exact for SNRref, and
  for SNR / SNRi up to the cross term between estimate and error that the SNR definitions drop.
  Each condition is an event ||e||^2 <= E: E = ||x_hat||^2 / (t_lin - 1) for SNR,
  ||x_hat - x_mix||^2 / (t_lin - 1) for SNRi, T P_ref / t_lin for SNRref.
  With `outputs.mean` None (no waveform head run) only 'snr_ref' is returned.
  """
  if method not in PROBABILITY_METHODS:
    raise ValueError(f"method must be one of {PROBABILITY_METHODS}, got {method!r}")
  estimate = outputs.mean is not None
  dtype = jnp.promote_types(outputs.mean.dtype if estimate else outputs.log_alpha.dtype,
                            jnp.float32)  # energies in >= float32
  mixture = jnp.asarray(mixture, dtype)
  mask = jnp.ones(mixture.shape, dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  alpha = outputs.alpha.astype(dtype)
  log_beta = (outputs.log_alpha + outputs.log_var).astype(dtype)
  t_lin = jnp.power(10.0, jnp.asarray(target_db, dtype) / 10.0)
  count = block_sums(mask, None, block_length)[None, :, None, :]
  log_count, has_samples = _positive_log(count)
  log_excess, excess_positive = _positive_log(t_lin - 1.0)

  def tail(log_energy_limit, valid):
    """P(||e||^2 <= E) given log E, where valid (else 0)."""
    if method == "exact":
      return _exact_tail(alpha, log_count, log_beta, log_energy_limit, valid)
    # Q(alpha, T beta / E): the event T sigma^2 <= E.
    return _tail(alpha, log_count + log_beta - log_energy_limit, valid)

  # SNRref: P_ref / (||e||^2 / T) >= t_lin.
  if reference_power is None:
    reference = mixture_reference_power(mixture, mask)
  else:
    reference = jnp.broadcast_to(jnp.asarray(reference_power, dtype), mixture.shape[:1])
  log_reference, reference_positive = _positive_log(reference[None, :, None, None])
  snr_ref = tail(log_count + log_reference - jnp.log(t_lin), has_samples & reference_positive)
  if not estimate:
    return {"snr_ref": snr_ref}

  # SNR: ||x_hat||^2 / ||e||^2 >= t_lin - 1; always true when t_lin <= 1.
  mean = outputs.mean.astype(dtype)
  estimate_energy = block_sums(mean * mean, mask[None, :, None, :], block_length)
  log_estimate_energy, estimate_positive = _positive_log(estimate_energy)
  snr = tail(log_estimate_energy - log_excess, has_samples & estimate_positive)
  snr = jnp.where(excess_positive, snr, jnp.where(has_samples, 1.0, 0.0))

  # SNRi: ||x_hat - x_mix||^2 / ||e||^2 >= t_lin - 1.
  residual = mean - mixture[None, :, None, :]
  residual_energy = block_sums(residual * residual, mask[None, :, None, :], block_length)
  log_residual_energy, residual_positive = _positive_log(residual_energy)
  snri = tail(log_residual_energy - log_excess, has_samples & residual_positive)
  snri = jnp.where(excess_positive, snri, jnp.where(has_samples, 1.0, 0.0))
  return {"snr": snr, "snri": snri, "snr_ref": snr_ref}


def _check_conditions(conditions: tuple[str, ...]) -> tuple[str, ...]:
  """Validates a non-empty subset of CONDITIONS."""
  conditions = tuple(conditions)
  if not conditions or any(c not in CONDITIONS for c in conditions):
    raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}.")
  return conditions


def needs_estimate(conditions: tuple[str, ...]) -> bool:
  """Whether any of `conditions` reads the exit's estimate (SNR, SNRi), not only its variance."""
  return any(condition in ESTIMATE_CONDITIONS for condition in conditions)


def exit_probabilities(
    outputs: ExitOutputs,
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None,
    *,
    block_length: int,
    target_db: float | jax.Array,
    reference_power: float | jax.Array | None = None,
    conditions: tuple[str, ...] = CONDITIONS,
    method: str = "approximate",
) -> Float[Array, "exits batch speakers blocks"]:
  """p_exit(e, j, b): the max over the chosen conditions' probabilities (any condition suffices).

  `method`: 'approximate' (the paper's large-T tails) or 'exact' (snr_exit_probabilities).
  `outputs.mean` may be None where no condition needs the estimate (`needs_estimate`).
  """
  conditions = _check_conditions(conditions)
  if outputs.mean is None and needs_estimate(conditions):
    raise ValueError(f"conditions {conditions} need the exits' estimates, but outputs.mean is None")
  tails = snr_exit_probabilities(
      outputs, mixture, mask, block_length=block_length, target_db=target_db,
      reference_power=reference_power, method=method)
  return functools.reduce(jnp.maximum, [tails[c] for c in conditions])


def first_accepted_exit(
    probabilities: Float[Array, "exits batch speakers blocks"],
    confidence: float | jax.Array,
) -> Int[Array, "batch blocks"]:
  """First exit with min over speakers of p_exit >= confidence; the last is always accepted."""
  num_exits = probabilities.shape[0]
  is_last = (jnp.arange(num_exits) == num_exits - 1)[:, None, None]
  accepted = (jnp.min(probabilities, axis=2) >= confidence) | is_last
  return jnp.argmax(accepted, axis=0).astype(jnp.int32)


def crossfade_samples(crossfade_ms: float, sample_rate: int) -> int:
  """Crossfade length in samples, round(ms * rate / 1000)."""
  return int(round(float(crossfade_ms) * float(sample_rate) / 1000.0))


def splice_weights(
    exit_index: Int[Array, "batch blocks"],
    block_valid: Bool[Array, "batch blocks"],
    num_exits: int,
    num_samples: int,
    block_length: int,
    crossfade: int,
) -> Float[Array, "batch exits samples"]:
  """Per-sample exit weights: raised-cosine overlap-add of neighbouring blocks' one-hot choices.

  A window of `crossfade` samples is centred on each block border (sample index b*T gets 0.5 from
  each side); the ramp is 0.5 - 0.5 cos. Weights sum to 1. A neighbour block with no valid sample
  (padding) is never faded in. crossfade == 0 gives hard switching.
  """
  blocks = exit_index.shape[-1]
  # Static per-sample geometry (numpy): own block, nearest border, neighbour across that border.
  sample = np.arange(num_samples)
  own = sample // block_length
  offset = sample - own * block_length
  before_midpoint = offset < block_length / 2.0
  border = np.where(before_midpoint, own, own + 1) * block_length
  neighbour = np.clip(np.where(before_midpoint, own - 1, own + 1), 0, blocks - 1)
  distance = (sample - border).astype(np.float64)
  if crossfade > 0:
    half = crossfade / 2.0
    ramp = np.clip((distance + half) / crossfade, 0.0, 1.0)
    after_weight = 0.5 - 0.5 * np.cos(np.pi * ramp)
  else:
    after_weight = (distance >= 0).astype(np.float64)
  neighbour_weight = np.where(before_midpoint, 1.0 - after_weight, after_weight)
  neighbour_weight = np.where(neighbour == own, 0.0, neighbour_weight)

  onehot = jax.nn.one_hot(exit_index, num_exits, dtype=jnp.float32)  # (batch, blocks, exits)
  own_onehot = onehot[:, own, :]  # (batch, samples, exits)
  neighbour_onehot = onehot[:, neighbour, :]
  neighbour_valid = block_valid[:, neighbour].astype(jnp.float32)[..., None]
  weight = jnp.asarray(neighbour_weight, jnp.float32)[None, :, None] * neighbour_valid
  weights = (1.0 - weight) * own_onehot + weight * neighbour_onehot
  return jnp.swapaxes(weights, 1, 2)


@functools.partial(jax.jit, static_argnames=("block_length", "crossfade", "conditions",
                                             "use_mixture_reference", "method"))
def _select_exits_core(outputs, mixture, mask, target_db, confidence, reference_power, *,
                       block_length, crossfade, conditions, use_mixture_reference, method):
  """Jitted masked exit rule; t, p and P_ref are traced so sweeping them does not recompile."""
  probabilities = exit_probabilities(
      outputs, mixture, mask, block_length=block_length, target_db=target_db,
      reference_power=None if use_mixture_reference else reference_power,
      conditions=conditions, method=method)
  exit_index = first_accepted_exit(probabilities, confidence)
  block_valid = block_sums(mask, None, block_length) > 0
  weights = splice_weights(exit_index, block_valid, outputs.num_exits, mask.shape[-1],
                           block_length, crossfade)
  waveform = jnp.einsum("bes,ebjs->bjs", weights.astype(outputs.mean.dtype), outputs.mean,
                        preferred_element_type=outputs.mean.dtype)
  waveform = waveform * mask[:, None, :].astype(waveform.dtype)
  return ExitSelection(waveform=waveform, exit_index=exit_index, probabilities=probabilities,
                       block_valid=block_valid)


def _is_concrete_number(value) -> bool:
  """True for Python/numpy scalars and concrete 0-d arrays (not tracers)."""
  if isinstance(value, jax.core.Tracer):
    return False
  return isinstance(value, numbers.Real) or np.ndim(value) == 0


def validate_selection_inputs(
    outputs: ExitOutputs,
    mixture: jax.Array,
    mask: jax.Array | None,
    *,
    block_length: int,
    confidence,
    crossfade: int,
) -> None:
  """Plain-Python checks for select_exits; raises ValueError saying what was expected."""
  if _is_concrete_number(confidence):
    p = float(confidence)
    if not 0.0 < p < 1.0:
      raise ValueError(f"confidence p must be in the open interval (0, 1), got {p}.")
  if not isinstance(block_length, int) or block_length < 1:
    raise ValueError(f"block_length must be a positive int (samples), got {block_length!r}.")
  if outputs.mean.ndim != 4:
    raise ValueError(
        f"outputs.mean must be (exits, batch, speakers, samples), got {outputs.mean.shape}.")
  num_exits, batch, speakers, samples = outputs.mean.shape
  expected_blocks = (num_exits, batch, speakers, num_blocks(samples, block_length))
  for name in ("log_var", "log_alpha"):
    shape = tuple(getattr(outputs, name).shape)
    if shape != expected_blocks:
      raise ValueError(
          f"outputs.{name} must be (exits, batch, speakers, blocks) = {expected_blocks} for "
          f"{samples} samples and block_length {block_length}, got {shape}.")
  if tuple(np.shape(mixture)) != (batch, samples):
    raise ValueError(
        f"mixture must be (batch={batch}, samples={samples}), got {tuple(np.shape(mixture))}.")
  if mask is not None and tuple(np.shape(mask)) != (batch, samples):
    raise ValueError(
        f"mask must be (batch={batch}, samples={samples}), got {tuple(np.shape(mask))}.")
  if crossfade < 0 or crossfade >= block_length:
    raise ValueError(
        f"the crossfade must be non-negative and shorter than a block ({block_length} samples), "
        f"got {crossfade} samples.")


def select_exits(
    outputs: ExitOutputs,
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None,
    *,
    block_length: int,
    target_db: float | jax.Array,
    confidence: float | jax.Array,
    sample_rate: int,
    reference_power: float | jax.Array | None = None,
    crossfade_ms: float = 10.0,
    conditions: tuple[str, ...] = CONDITIONS,
    method: str = "approximate",
) -> ExitSelection:
  """Masked exit rule: first accepted exit per block, blocks spliced with a crossfade.

  `method`: the exit probabilities' 'approximate' (paper) or 'exact' form.
  """
  if method not in PROBABILITY_METHODS:
    raise ValueError(f"method must be one of {PROBABILITY_METHODS}, got {method!r}")
  if sample_rate <= 0:
    raise ValueError(f"sample_rate must be positive, got {sample_rate}.")
  if crossfade_ms < 0:
    raise ValueError(f"crossfade_ms must be >= 0, got {crossfade_ms}.")
  crossfade = crossfade_samples(crossfade_ms, sample_rate)
  validate_selection_inputs(outputs, mixture, mask, block_length=block_length,
                            confidence=confidence, crossfade=crossfade)
  conditions = _check_conditions(conditions)
  dtype = jnp.promote_types(outputs.mean.dtype, jnp.float32)
  mixture = jnp.asarray(mixture, dtype)
  mask = jnp.ones(mixture.shape, dtype) if mask is None else jnp.asarray(mask).astype(dtype)
  use_mixture_reference = reference_power is None
  reference = jnp.asarray(0.0 if use_mixture_reference else reference_power, dtype)
  return _select_exits_core(
      outputs, mixture, mask, jnp.asarray(target_db, dtype), jnp.asarray(confidence, dtype),
      reference,
      block_length=block_length, crossfade=crossfade, conditions=conditions,
      use_mixture_reference=use_mixture_reference, method=method)


# ----------------------------------------------------------------------------------------------
# Compute accounting, policies and regret.
# ----------------------------------------------------------------------------------------------


def exit_cost(
    exit_index: Int[Array, "..."],
    gmac_per_exit: Float[Array, "exits"],
    block_valid: Bool[Array, "..."] | None = None,
) -> Float[Array, ""]:
  """Mean over (valid) blocks of the chosen exit's cost (e.g. GMAC per second of audio)."""
  cost = jnp.asarray(gmac_per_exit, jnp.float32)[jnp.asarray(exit_index)]
  if block_valid is None:
    return jnp.mean(cost)
  weight = jnp.asarray(block_valid, jnp.float32)
  return jnp.sum(cost * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def static_policy(exit_index: int, shape: tuple[int, ...]) -> Int[Array, "..."]:
  """One fixed exit for every block."""
  return jnp.full(shape, exit_index, jnp.int32)


def uniform_policy(key: jax.Array, num_exits: int, shape: tuple[int, ...]) -> Int[Array, "..."]:
  """An exit drawn uniformly at random per block."""
  return jax.random.randint(key, shape, 0, num_exits, jnp.int32)


def block_exit_snr(
    outputs: ExitOutputs,
    targets: Float[Array, "batch speakers samples"],
    mask: Float[Array, "batch samples"] | None,
    block_length: int,
) -> Float[Array, "exits batch speakers blocks"]:
  """True block SNR 10 log10(||x_j||^2 / ||x_j - x_hat_ej||^2); targets aligned with estimates."""
  targets = jnp.asarray(targets, outputs.mean.dtype)
  if mask is not None:
    mask = jnp.asarray(mask).astype(outputs.mean.dtype)[None, :, None, :]
  error = targets[None] - outputs.mean
  signal_energy = block_sums(targets * targets, None if mask is None else mask[0], block_length)
  error_energy = block_sums(error * error, mask, block_length)
  return 10.0 * (jnp.log10(signal_energy[None] + SNR_EPS) - jnp.log10(error_energy + SNR_EPS))


def chosen_block_snr(
    block_snr: Float[Array, "exits batch speakers blocks"],
    exit_index: Int[Array, "batch blocks"],
) -> Float[Array, "batch speakers blocks"]:
  """The true block SNR of the chosen exit per block."""
  index = jnp.broadcast_to(exit_index[None, :, None, :], (1,) + block_snr.shape[1:])
  return jnp.take_along_axis(block_snr, index, axis=0)[0]


def oracle_policy(
    outputs: ExitOutputs,
    targets: Float[Array, "batch speakers samples"],
    mask: Float[Array, "batch samples"] | None,
    block_length: int,
    target_db: float | jax.Array,
) -> Int[Array, "batch blocks"]:
  """First exit whose true block SNR is >= t for every speaker, else the last exit."""
  return oracle_from_block_snr(block_exit_snr(outputs, targets, mask, block_length), target_db)


def oracle_from_block_snr(
    block_snr: Float[Array, "exits batch speakers blocks"],
    target_db: float | jax.Array,
) -> Int[Array, "batch blocks"]:
  """oracle_policy given the true block SNRs (block_exit_snr), e.g. computed once per batch."""
  num_exits = block_snr.shape[0]
  is_last = (jnp.arange(num_exits) == num_exits - 1)[:, None, None]
  accepted = (jnp.min(block_snr, axis=2) >= target_db) | is_last
  return jnp.argmax(accepted, axis=0).astype(jnp.int32)


def one_sided_regret(
    true_snr_of_chosen: Float[Array, "..."],
    target_db: float | jax.Array,
    weights: Float[Array, "..."] | None = None,
) -> Float[Array, ""]:
  """Mean of max(0, t - SNR) over blocks (optionally weighted, e.g. by block validity)."""
  shortfall = jnp.maximum(0.0, target_db - jnp.asarray(true_snr_of_chosen))
  if weights is None:
    return jnp.mean(shortfall)
  weights = jnp.broadcast_to(jnp.asarray(weights, shortfall.dtype), shortfall.shape)
  return jnp.sum(shortfall * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
