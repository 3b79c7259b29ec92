"""The PRESS training loss in PyTorch: press_jax.likelihoods' block Student-t with uPIT.

`press_loss(outputs, targets, mask, block_length=...)` is `likelihoods.press_loss` with
`LossConfig(kind="student_t", permutation="joint")` (the trainer's default; "per_exit" and
`exit_weights` as there): per exit, utterance and (estimate, target) pair, the negative
log-likelihood of each block's error energy under the Gaussian-with-InvGamma-variance model,
summed over blocks and divided by (valid samples x speakers); one permutation per utterance
minimising the weighted sum over exits; the batch mean of the weighted sum at that permutation.

`student_t_nll` is the same cancellation-free form as the JAX one (docs/probabilistic.md,
"Stable form"), with the same branches and the same safe inputs to the branch not taken, so
autograd's gradients stay finite wherever JAX's do.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
from torch.nn import functional as F

_LOG_2PI = math.log(2.0 * math.pi)
# c_k = B_2k / (2k (2k - 1)), k = 1..7, of Stirling's series (press_jax.likelihoods).
_STIRLING_COEFFS = (1 / 12, -1 / 360, 1 / 1260, -1 / 1680, 1 / 1188, -691 / 360360, 1 / 156)
PERMUTATION_MODES = ("joint", "per_exit")


def num_blocks(num_samples: int, block_length: int) -> int:
  """Number of blocks ceil(samples / T) covering a signal; the last may be ragged."""
  return -(-num_samples // block_length)


def block_sums(values: torch.Tensor, block_length: int) -> torch.Tensor:
  """(..., samples) -> (..., blocks): sums over consecutive blocks (the last may be ragged)."""
  samples = values.shape[-1]
  blocks = num_blocks(samples, block_length)
  pad = blocks * block_length - samples
  if pad:
    values = F.pad(values, (0, pad))
  return values.reshape(*values.shape[:-1], blocks, block_length).sum(-1)


def _stirling_min_alpha(dtype: torch.dtype) -> float:
  """Smallest integer alpha with |c_8| alpha^-15 < eps / 100: 4 in float32, 12 in float64."""
  return float(math.ceil((3617 / 122400 * 100 / torch.finfo(dtype).eps) ** (1 / 15)))


def _log1p_minus_x_over_x(x: torch.Tensor) -> torch.Tensor:
  """(log1p(x) - x) / x for x >= 0 (0 at x = 0): a series in s = x / (2 + x) below x = 1."""
  small = x < 1.0
  xs = torch.where(small, x, torch.zeros_like(x))
  s = xs / (2.0 + xs)
  t = s * s
  eps = torch.finfo(x.dtype).eps
  num_terms = 1
  while (1 / 9) ** num_terms / (2 * num_terms + 3) > eps / 8:
    num_terms += 1
  poly = torch.zeros_like(t)
  for k in reversed(range(num_terms)):
    poly = poly * t + 1.0 / (2 * k + 3)
  series = -s + 2.0 * t * poly / (2.0 + xs)
  xl = torch.where(small, torch.ones_like(x), x)
  return torch.where(small, series, torch.log1p(xl) / xl - 1.0)


def _log_gamma_ratio(log_alpha: torch.Tensor, half_count: torch.Tensor,
                     log_weight: torch.Tensor) -> torch.Tensor:
  """lnGamma(alpha + h) - lnGamma(alpha) - w h ln alpha (w = log_weight, 0 or 1): the gammaln
  difference below alpha = 4 (float32), Stirling's series with h ln alpha cancelled above."""
  min_alpha = _stirling_min_alpha(log_alpha.dtype)
  large = log_alpha >= math.log(min_alpha)
  log_alpha_small = torch.where(large, torch.zeros_like(log_alpha), log_alpha)
  alpha_small = torch.exp(log_alpha_small)
  direct = (torch.lgamma(alpha_small + half_count) - torch.lgamma(alpha_small)
            - log_weight * half_count * log_alpha_small)
  log_alpha_large = torch.where(large, log_alpha, torch.full_like(log_alpha,
                                                                  math.log(min_alpha)))
  inv_alpha = torch.exp(-log_alpha_large)
  x = half_count * inv_alpha
  log1p_x = torch.log1p(x)
  correction = torch.zeros_like(x)
  power = inv_alpha
  for k, coeff in enumerate(_STIRLING_COEFFS, start=1):
    correction = correction + coeff * power * torch.expm1((1 - 2 * k) * log1p_x)
    power = power * inv_alpha * inv_alpha
  stirling = (half_count * _log1p_minus_x_over_x(x) + (half_count - 0.5) * log1p_x + correction
              + (1.0 - log_weight) * half_count * log_alpha_large)
  return torch.where(large, stirling, direct)


def student_t_nll(error_energy: torch.Tensor, block_count: torch.Tensor, log_var: torch.Tensor,
                  log_alpha: torch.Tensor) -> torch.Tensor:
  """-ln L of the block Student-t (Gaussian error, InvGamma variance); 0 where count == 0.

  Arguments broadcast together (e.g. (exits, batch, speakers, speakers, blocks)).
  """
  error_energy, count, log_var, log_alpha = torch.broadcast_tensors(
      error_energy, block_count.to(error_energy.dtype), log_var, log_alpha)
  half_count = 0.5 * count
  positive = error_energy > torch.finfo(error_energy.dtype).tiny
  log_energy = torch.log(torch.where(positive, error_energy, torch.ones_like(error_energy)))
  zeros = torch.zeros_like(log_energy)
  # c = E / (2 sigma^2) and r = E / (2 beta) = c / alpha, formed in logs.
  log_half_energy = log_energy - math.log(2.0)
  log_c = log_half_energy - log_var
  log_r = log_c - log_alpha
  small = (~positive) | (log_r < 0.0)
  # r < 1 (or E = 0): -h ln sigma^2 - (alpha + h) log1p(r), with
  # alpha log1p(r) = c + c (log1p(r) - r) / r.
  r_small = torch.exp(torch.where(small, log_r, zeros))
  c_small = torch.exp(torch.where(small, log_c, zeros))
  energy_small = (c_small + c_small * _log1p_minus_x_over_x(r_small)
                  + half_count * torch.log1p(r_small))
  rest_small = -half_count * log_var - torch.where(positive, energy_small, zeros)
  # r >= 1: -h ln sigma^2 - h log1p(r) = -h ln(E/2) + h ln alpha - h log1p(1/r).
  log_r_large = torch.where(small, zeros, log_r)
  alpha_large = torch.exp(torch.where(small, zeros, log_alpha))
  rest_large = (-half_count * (log_half_energy + F.softplus(-log_r_large))
                - alpha_large * F.softplus(log_r_large))
  log_gamma_ratio = _log_gamma_ratio(log_alpha, half_count, small.to(log_alpha.dtype))
  log_likelihood = (log_gamma_ratio - half_count * _LOG_2PI
                    + torch.where(small, rest_small, rest_large))
  return torch.where(count > 0, -log_likelihood, zeros)


def pairwise_loss(outputs, targets: torch.Tensor, mask: torch.Tensor | None,
                  block_length: int) -> torch.Tensor:
  """Student-t loss of estimate i vs target j, (exits, batch, speakers, speakers).

  outputs: (mean (exits, batch, speakers, samples), log_var, log_alpha (exits, batch, speakers,
  blocks)); targets (batch, speakers, samples); mask (batch, samples) or None.
  """
  mean, log_var, log_alpha = outputs[0], outputs[1], outputs[2]
  exits, batch, speakers, samples = mean.shape
  targets = torch.as_tensor(targets).to(mean.dtype)
  if tuple(targets.shape) != (batch, speakers, samples):
    raise ValueError(f"targets must be (batch, speakers, samples) = {(batch, speakers, samples)}"
                     f", got {tuple(targets.shape)}")
  blocks = num_blocks(samples, block_length)
  for name, value in (("log_var", log_var), ("log_alpha", log_alpha)):
    if tuple(value.shape) != (exits, batch, speakers, blocks):
      raise ValueError(f"outputs.{name} must be (exits, batch, speakers, blocks) = "
                       f"{(exits, batch, speakers, blocks)} for {samples} samples and "
                       f"block_length {block_length}, got {tuple(value.shape)}")
  mask = (mean.new_ones(batch, samples) if mask is None
          else torch.as_tensor(mask).to(mean.dtype))
  error = (targets[None, :, None, :, :] - mean[:, :, :, None, :]) * mask[None, :, None, None, :]
  error_energy = block_sums(error * error, block_length)
  block_count = block_sums(mask, block_length)[None, :, None, None, :]
  per_block = student_t_nll(error_energy, block_count, log_var[:, :, :, None, :],
                            log_alpha[:, :, :, None, :])
  valid_samples = torch.clamp(mask.sum(-1), min=1.0)
  return per_block.sum(-1) / (valid_samples * speakers)[None, :, None, None]


def press_loss(outputs, targets: torch.Tensor, mask: torch.Tensor | None, *, block_length: int,
               exit_weights: Sequence[float] | None = None, permutation: str = "joint"
               ) -> tuple[torch.Tensor, dict[str, Any]]:
  """Batch mean of sum_e w_e loss_e at the best permutation (joint: one per utterance over the
  weighted exits; per_exit: one per exit and utterance), and aux.

  aux: `per_exit_loss` (exits,) batch means; `permutation` (batch, speakers) or
  (exits, batch, speakers), estimate i paired with target permutation[..., i].
  """
  if permutation not in PERMUTATION_MODES:
    raise ValueError(f"permutation must be one of {PERMUTATION_MODES}, got {permutation!r}")
  pairwise = pairwise_loss(outputs, targets, mask, block_length)
  exits, _, speakers, _ = pairwise.shape
  if exit_weights is None:
    weights = pairwise.new_ones(exits)
  else:
    if len(exit_weights) != exits:
      raise ValueError(f"exit_weights has {len(exit_weights)} entries but the model has "
                       f"{exits} exits")
    weights = torch.as_tensor(exit_weights, dtype=torch.float32).to(pairwise.dtype)
  perms = torch.tensor(list(itertools.permutations(range(speakers))), dtype=torch.int64)
  rows = torch.arange(speakers)
  with torch.no_grad():
    costs = pairwise.detach()
    if permutation == "joint":
      costs = (costs * weights[:, None, None, None]).sum(0)
    chosen = perms[costs[..., rows, perms].sum(-1).argmin(-1)]  # (..., batch, speakers)
  index = torch.broadcast_to(chosen, pairwise.shape[:-1])[..., None]
  per_exit_per_utterance = torch.gather(pairwise, -1, index)[..., 0].sum(-1)  # (exits, batch)
  total = (weights[:, None] * per_exit_per_utterance).sum(0).mean()
  return total, {"per_exit_loss": per_exit_per_utterance.mean(1), "permutation": chosen}
