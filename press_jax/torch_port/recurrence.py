"""The linear recurrence h_t = a_t * h_{t-1} + b_t in PyTorch (press_jax/models/recurrence.py).

Two kernels, the same values to float rounding, both differentiated by autograd:

- ``"sequential"``: one frame per Python step (T steps of O(channels) work);
- ``"chunked"``: the frames cut into chunks of C; a loop of C steps runs every chunk at once
  from a zero state (and the decay product from the chunk's start), a loop of T / C steps carries
  the state across chunk boundaries, and one multiply-add fixes up each frame:
  h_t = local_t + (prod_{chunk start <= r <= t} a_r) h_(chunk start - 1).
  With C = ceil(sqrt(T)) that is about 2 sqrt(T) Python steps instead of T. No division by a
  decay product, so a zero decay (a padded frame resets the state) is exact.

Shapes: (..., time, channels); time is axis -2.
"""

from __future__ import annotations

import math

import torch

RECURRENCE_IMPLEMENTATIONS = ("chunked", "sequential")


def _sequential(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
  """Forward in time from h = 0, one frame per step."""
  state = torch.zeros_like(drive[..., 0, :])
  states = []
  for decay_t, drive_t in zip(decay.unbind(-2), drive.unbind(-2)):
    state = decay_t * state + drive_t
    states.append(state)
  return torch.stack(states, dim=-2)


def _chunked(decay: torch.Tensor, drive: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
  """Forward in time from h = 0, in chunks of `chunk` frames (default ceil(sqrt(time)))."""
  *lead, time, channels = decay.shape
  if time == 0:
    return drive.clone()
  chunk = max(1, min(chunk or math.isqrt(time - 1) + 1, time))
  count = -(-time // chunk)
  pad = count * chunk - time
  if pad:  # Trailing frames of a forward recurrence never reach earlier ones.
    decay = torch.nn.functional.pad(decay, (0, 0, 0, pad), value=1.0)
    drive = torch.nn.functional.pad(drive, (0, 0, 0, pad))
  # (chunk, ..., count, channels): each position of the chunks is one contiguous slice.
  decay = decay.reshape(*lead, count, chunk, channels).movedim(-2, 0).contiguous()
  drive = drive.reshape(*lead, count, chunk, channels).movedim(-2, 0).contiguous()
  # Within each chunk, all chunks at once: the state from zero and the decay from the start.
  local = torch.zeros_like(drive[0])
  product = torch.ones_like(decay[0])
  locals_, products = [], []
  for decay_i, drive_i in zip(decay.unbind(0), drive.unbind(0)):
    local = decay_i * local + drive_i
    product = product * decay_i
    locals_.append(local)
    products.append(product)
  # Across chunks: the state before chunk k, start_k = total_(k-1) start_(k-1) + end_(k-1).
  ends, totals = local.movedim(-2, 0).unbind(0), product.movedim(-2, 0).unbind(0)
  start = torch.zeros_like(ends[0])
  starts = []
  for k in range(count):
    starts.append(start)
    start = totals[k] * start + ends[k]
  local = torch.stack(locals_, dim=-2)  # (..., count, chunk, channels)
  product = torch.stack(products, dim=-2)
  state = local + product * torch.stack(starts, dim=-2)[..., None, :]
  return state.reshape(*lead, count * chunk, channels)[..., :time, :]


def linear_recurrence(decay: torch.Tensor, drive: torch.Tensor, reverse: bool = False,
                      implementation: str = "chunked", chunk: int | None = None
                      ) -> torch.Tensor:
  """h_t = decay_t * h_{t-1} + drive_t from h = 0 (reverse: from the end, with h_{t+1}).

  decay, drive: (..., time, channels); returns the states, the same shape.
  """
  if implementation not in RECURRENCE_IMPLEMENTATIONS:
    raise ValueError(f"recurrence implementation must be one of {RECURRENCE_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if reverse:
    return linear_recurrence(decay.flip(-2), drive.flip(-2), False, implementation,
                             chunk).flip(-2)
  if implementation == "sequential":
    return _sequential(decay, drive)
  return _chunked(decay, drive, chunk)


def bidirectional_recurrence(decay: torch.Tensor, drive: torch.Tensor,
                             implementation: str = "chunked", chunk: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
  """(forward, backward) recurrences of the same (..., time, channels) inputs, run as one
  recurrence over the two directions stacked, the second flipped in time."""
  both = linear_recurrence(torch.stack([decay, decay.flip(-2)]),
                           torch.stack([drive, drive.flip(-2)]),
                           implementation=implementation, chunk=chunk)
  return both[0], both[1].flip(-2)
