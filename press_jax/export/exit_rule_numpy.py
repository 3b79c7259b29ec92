"""The PRESS exit rule in plain numpy + scipy, for runtimes without JAX (SPEC §4).

This file is self-contained: `press-export` copies it into every export directory as
`press_exit_rule.py`, where it runs with numpy and scipy alone. It mirrors
`press_jax.exit_rule` (`snr_exit_probabilities`, `exit_probabilities`, `first_accepted_exit`,
`splice_weights`, `select_exits`) and `press_jax.calibration.apply_post_calibration`, computed in
float64; tests/test_export.py checks that it picks the same exits, with probabilities and the
spliced waveform within 1e-5 of the JAX rule.

Arrays follow the exported graphs' outputs (docs/export.md):

    mean       (exits, batch, speakers, samples)   the exits' waveforms
    log_var    (exits, batch, speakers, blocks)    log(beta / alpha) per block
    log_alpha  (exits, batch, speakers, blocks)    log(alpha) per block
    mixture    (batch, samples); mask (batch, samples): 1 valid, 0 padding

blocks = ceil(samples / block_length). Outputs of the per-exit graphs (no exit axis) are stacked
on a new leading axis first, e.g. `np.stack([mean_1, mean_2])`.

    import json, press_exit_rule as rule
    settings = rule.load_settings("export_dir/press_config.json")
    log_var, log_alpha = rule.apply_post_calibration(log_var, log_alpha, settings["calibration"])
    chosen = rule.select_exits(mean, log_var, log_alpha, mixture, mask,
                               block_length=settings["block_length"],
                               sample_rate=settings["sample_rate"], target_db=10.0,
                               confidence=0.9)
    chosen.waveform, chosen.exit_index  # (batch, speakers, samples), (batch, blocks), 0-based
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import scipy.special

CONDITIONS = ("snr", "snri", "snr_ref")
PROBABILITY_METHODS = ("approximate", "exact")


class ExitSelection(NamedTuple):
  """What `select_exits` returns (the fields of press_jax.exit_rule.ExitSelection)."""

  waveform: np.ndarray  # (batch, speakers, samples)
  exit_index: np.ndarray  # (batch, blocks), 0-based
  probabilities: np.ndarray  # (exits, batch, speakers, blocks): p_exit
  block_valid: np.ndarray  # (batch, blocks) bool


# --- blocks -----------------------------------------------------------------------------------
def num_blocks(num_samples: int, block_length: int) -> int:
  """ceil(samples / block_length): the last block may be ragged."""
  return -(-int(num_samples) // int(block_length))


def block_sums(values: np.ndarray, mask: np.ndarray | None, block_length: int) -> np.ndarray:
  """Masked sums over blocks of block_length samples, (..., samples) -> (..., blocks)."""
  values = np.asarray(values, np.float64)
  if mask is not None:
    values = values * np.asarray(mask, np.float64)
  samples = values.shape[-1]
  blocks = num_blocks(samples, block_length)
  pad = blocks * block_length - samples
  if pad:
    values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)])
  return values.reshape(values.shape[:-1] + (blocks, block_length)).sum(axis=-1)


def _positive_log(energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """log(energy) where energy > 0 (else 0) and the positivity mask."""
  energy = np.asarray(energy, np.float64)
  positive = energy > 0
  return np.log(np.where(positive, energy, 1.0)), positive


def mixture_reference_power(mixture: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Mean power of the valid part of each mixture, (batch,): the default P_ref."""
  mixture = np.asarray(mixture, np.float64)
  mask = np.ones_like(mixture) if mask is None else np.asarray(mask, np.float64)
  return (mixture * mixture * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)


# --- probabilities ----------------------------------------------------------------------------
def snr_exit_probabilities(mean, log_var, log_alpha, mixture, mask=None, *, block_length: int,
                           target_db: float, reference_power=None,
                           method: str = "approximate") -> dict[str, np.ndarray]:
  """P(SNR >= t), P(SNRi >= t), P(SNRref >= t), each (exits, batch, speakers, blocks).

  'approximate' (the paper): Q(alpha, T beta / E) with Q the regularised upper incomplete gamma;
  'exact': I_x(T/2, alpha) at x = E / (E + 2 beta) (||e||^2 / (T beta / alpha) ~ F(T, 2 alpha)).
  E is the error energy the condition allows: ||x_hat||^2 / (t_lin - 1) for SNR,
  ||x_hat - x_mix||^2 / (t_lin - 1) for SNRi, T P_ref / t_lin for SNRref.
  """
  if method not in PROBABILITY_METHODS:
    raise ValueError(f"method must be one of {PROBABILITY_METHODS}, got {method!r}")
  mean = np.asarray(mean, np.float64)
  mixture = np.asarray(mixture, np.float64)
  mask = np.ones(mixture.shape) if mask is None else np.asarray(mask, np.float64)
  log_alpha = np.asarray(log_alpha, np.float64)
  alpha = np.exp(log_alpha)
  log_beta = log_alpha + np.asarray(log_var, np.float64)
  t_lin = 10.0 ** (float(target_db) / 10.0)
  count = block_sums(mask, None, block_length)[None, :, None, :]
  log_count, has_samples = _positive_log(count)
  log_excess, excess_positive = _positive_log(t_lin - 1.0)
  sample_mask = mask[None, :, None, :]

  def tail(log_limit, valid):
    """P(||e||^2 <= E) given log E, where valid (else 0)."""
    if method == "exact":
      x = scipy.special.expit(np.where(valid, log_limit - np.log(2.0) - log_beta, 0.0))
      counts = np.exp(np.where(valid, log_count, 0.0))
      return np.where(valid, scipy.special.betainc(0.5 * counts, alpha, x), 0.0)
    x = np.exp(np.where(valid, log_count + log_beta - log_limit, 0.0))
    return np.where(valid, scipy.special.gammaincc(alpha, x), 0.0)

  log_estimate, estimate_positive = _positive_log(block_sums(mean * mean, sample_mask,
                                                             block_length))
  snr = tail(log_estimate - log_excess, has_samples & estimate_positive)
  snr = np.where(excess_positive, snr, np.where(has_samples, 1.0, 0.0))

  residual = mean - mixture[None, :, None, :]
  log_residual, residual_positive = _positive_log(block_sums(residual * residual, sample_mask,
                                                             block_length))
  snri = tail(log_residual - log_excess, has_samples & residual_positive)
  snri = np.where(excess_positive, snri, np.where(has_samples, 1.0, 0.0))

  if reference_power is None:
    reference = mixture_reference_power(mixture, mask)
  else:
    reference = np.broadcast_to(np.asarray(reference_power, np.float64), mixture.shape[:1])
  log_reference, reference_positive = _positive_log(reference[None, :, None, None])
  snr_ref = tail(log_count + log_reference - np.log(t_lin), has_samples & reference_positive)
  return {"snr": snr, "snri": snri, "snr_ref": snr_ref}


def _check_conditions(conditions) -> tuple[str, ...]:
  conditions = tuple(conditions)
  if not conditions or any(c not in CONDITIONS for c in conditions):
    raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}")
  return conditions


def exit_probabilities(mean, log_var, log_alpha, mixture, mask=None, *, block_length: int,
                       target_db: float, reference_power=None, conditions=CONDITIONS,
                       method: str = "approximate") -> np.ndarray:
  """p_exit (exits, batch, speakers, blocks): the max over the chosen conditions."""
  conditions = _check_conditions(conditions)
  tails = snr_exit_probabilities(mean, log_var, log_alpha, mixture, mask,
                                 block_length=block_length, target_db=target_db,
                                 reference_power=reference_power, method=method)
  return np.maximum.reduce([tails[c] for c in conditions])


def first_accepted_exit(probabilities: np.ndarray, confidence: float) -> np.ndarray:
  """(batch, blocks) 0-based: the first exit whose min over speakers is >= p; the last always."""
  probabilities = np.asarray(probabilities)
  is_last = (np.arange(probabilities.shape[0]) == probabilities.shape[0] - 1)[:, None, None]
  accepted = (probabilities.min(axis=2) >= confidence) | is_last
  return np.argmax(accepted, axis=0).astype(np.int32)


def exit_accepted(probabilities: np.ndarray, confidence: float) -> np.ndarray:
  """(batch, blocks) bool for ONE exit's p_exit (batch, speakers, blocks): every speaker >= p.

  For runtimes that run the per-exit graphs in order and stop when every valid block is
  accepted (the first accepted exit per block is kept; the last exit run is always accepted).
  """
  return np.asarray(probabilities).min(axis=1) >= confidence


# --- splicing ---------------------------------------------------------------------------------
def crossfade_samples(crossfade_ms: float, sample_rate: int) -> int:
  """round(ms * rate / 1000)."""
  return int(round(float(crossfade_ms) * float(sample_rate) / 1000.0))


def splice_weights(exit_index: np.ndarray, block_valid: np.ndarray, num_exits: int,
                   num_samples: int, block_length: int, crossfade: int) -> np.ndarray:
  """(batch, exits, samples): raised-cosine overlap-add of neighbouring blocks' one-hot choices.

  A `crossfade`-sample window is centred on each block border (0.5 from each side at the
  border), ramp 0.5 - 0.5 cos; a neighbour block without valid samples is never faded in;
  crossfade 0 switches hard. Weights sum to 1 per sample.
  """
  exit_index = np.asarray(exit_index)
  block_valid = np.asarray(block_valid, bool)
  blocks = exit_index.shape[-1]
  sample = np.arange(num_samples)
  own = sample // block_length
  offset = sample - own * block_length
  before_midpoint = offset < block_length / 2.0
  border = np.where(before_midpoint, own, own + 1) * block_length
  neighbour = np.clip(np.where(before_midpoint, own - 1, own + 1), 0, blocks - 1)
  distance = (sample - border).astype(np.float64)
  if crossfade > 0:
    ramp = np.clip((distance + crossfade / 2.0) / crossfade, 0.0, 1.0)
    after_weight = 0.5 - 0.5 * np.cos(np.pi * ramp)
  else:
    after_weight = (distance >= 0).astype(np.float64)
  neighbour_weight = np.where(before_midpoint, 1.0 - after_weight, after_weight)
  neighbour_weight = np.where(neighbour == own, 0.0, neighbour_weight)
  onehot = np.eye(num_exits)[exit_index]  # (batch, blocks, exits)
  weight = neighbour_weight[None, :, None] * block_valid[:, neighbour][..., None]
  weights = (1.0 - weight) * onehot[:, own, :] + weight * onehot[:, neighbour, :]
  return np.swapaxes(weights, 1, 2)


def select_exits(mean, log_var, log_alpha, mixture, mask=None, *, block_length: int,
                 target_db: float, confidence: float, sample_rate: int, reference_power=None,
                 crossfade_ms: float = 10.0, conditions=CONDITIONS,
                 method: str = "approximate") -> ExitSelection:
  """The masked exit rule: the first accepted exit per block, blocks spliced with a crossfade."""
  mean = np.asarray(mean, np.float64)
  if mean.ndim != 4:
    raise ValueError(f"mean must be (exits, batch, speakers, samples), got {mean.shape}")
  if not 0.0 < float(confidence) < 1.0:
    raise ValueError(f"confidence p must be in the open interval (0, 1), got {confidence}")
  num_exits, batch, _, samples = mean.shape
  expected = (num_exits, batch, mean.shape[2], num_blocks(samples, block_length))
  for name, value in (("log_var", log_var), ("log_alpha", log_alpha)):
    if np.shape(value) != expected:
      raise ValueError(f"{name} must be (exits, batch, speakers, blocks) = {expected}, got "
                       f"{np.shape(value)}")
  crossfade = crossfade_samples(crossfade_ms, sample_rate)
  if not 0 <= crossfade < block_length:
    raise ValueError(f"the crossfade must be non-negative and shorter than a block "
                     f"({block_length} samples), got {crossfade} samples")
  mixture = np.asarray(mixture, np.float64)
  mask = np.ones(mixture.shape) if mask is None else np.asarray(mask, np.float64)
  probabilities = exit_probabilities(mean, log_var, log_alpha, mixture, mask,
                                     block_length=block_length, target_db=target_db,
                                     reference_power=reference_power, conditions=conditions,
                                     method=method)
  exit_index = first_accepted_exit(probabilities, confidence)
  block_valid = block_sums(mask, None, block_length) > 0
  weights = splice_weights(exit_index, block_valid, num_exits, samples, block_length, crossfade)
  waveform = np.einsum("bes,ebjs->bjs", weights, mean) * mask[:, None, :]
  return ExitSelection(waveform=waveform, exit_index=exit_index, probabilities=probabilities,
                       block_valid=block_valid)


# --- post-calibration and the export's settings -----------------------------------------------
def apply_post_calibration(log_var, log_alpha, calibration: dict | None):
  """alpha' = e^a alpha, beta' = e^b beta: log_alpha + a, log_var + b - a (per exit or shared).

  `calibration` is press_config.json's "post_calibration" ({"log_alpha_scale": [...],
  "log_beta_scale": [...]}, one factor or one per exit) or None (returned unchanged).
  """
  log_var = np.asarray(log_var, np.float64)
  log_alpha = np.asarray(log_alpha, np.float64)
  if not calibration:
    return log_var, log_alpha
  a = np.asarray(calibration["log_alpha_scale"], np.float64).reshape(-1, 1, 1, 1)
  b = np.asarray(calibration["log_beta_scale"], np.float64).reshape(-1, 1, 1, 1)
  if a.shape[0] not in (1, log_alpha.shape[0]):
    raise ValueError(f"the post-calibration has {a.shape[0]} factors; expected 1 or one per "
                     f"exit ({log_alpha.shape[0]})")
  return log_var + b - a, log_alpha + a


def load_settings(press_config_path: str) -> dict:
  """block_length, sample_rate, exits, speakers and calibration from press_config.json."""
  with open(press_config_path) as handle:
    values = json.load(handle)
  return {"block_length": int(values["block_length"]), "sample_rate": int(values["sample_rate"]),
          "exits": int(values["exits"]), "speakers": int(values["config"]["speakers"]),
          "calibration": values.get("post_calibration")}
