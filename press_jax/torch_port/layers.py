"""PRESS-Net's building blocks in PyTorch, mirroring press_jax/models/layers.py.

Every parameter carries the name it has in the JAX model's Flax tree (`kernel`, `bias`,
`scale`, `skip`) under modules named as the Flax modules are, so that a module's
`named_parameters()` are exactly the flat safetensors names of press_jax.export.params.
Dense kernels are (in, out): y = x @ kernel + bias, as Flax's nn.Dense.

GELU is the tanh approximation (flax.linen.gelu's default); RMSNorm is Flax's: x *
(rsqrt(mean(x^2) + 1e-6) * scale).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from press_jax.torch_port import recurrence as recurrence_lib

RMS_NORM_EPSILON = 1e-6  # flax.linen.RMSNorm's default.


def gelu(x: torch.Tensor) -> torch.Tensor:
  """flax.linen.gelu / jax.nn.gelu with approximate=True (the default there)."""
  return F.gelu(x, approximate="tanh")


class Dense(nn.Module):
  """y = x @ kernel + bias with a (in, out) kernel; initialised as Flax's (LeCun normal, 0)."""

  def __init__(self, features_in: int, features_out: int, use_bias: bool = True):
    super().__init__()
    std = math.sqrt(1.0 / features_in) / 0.87962566103423978  # truncated at 2 std, as Flax
    self.kernel = nn.Parameter(torch.empty(features_in, features_out))
    nn.init.trunc_normal_(self.kernel, std=std, a=-2 * std, b=2 * std)
    self.bias = nn.Parameter(torch.zeros(features_out)) if use_bias else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = x @ self.kernel
    return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
  """Flax's RMSNorm over the last axis: x * (rsqrt(mean(x^2) + eps) * scale)."""

  def __init__(self, features: int):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(features))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    mean_square = x.square().mean(-1, keepdim=True)
    return x * (torch.rsqrt(mean_square + RMS_NORM_EPSILON) * self.scale)


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch."""

  def __init__(self, features: int, init_value: float = 1e-5):
    super().__init__()
    self.scale = nn.Parameter(torch.full((features,), float(init_value)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.scale


class GatedFeedForward(nn.Module):
  """GLU feed-forward: Dense(2F) -> GELU(a) * b -> Dense(D)."""

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.expand = Dense(width, 2 * hidden)
    self.contract = Dense(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    value, gate = self.expand(x).chunk(2, dim=-1)
    return self.contract(gelu(value) * gate)


class LinearRNNMixer(nn.Module):
  """Bidirectional minGRU-style gated linear recurrence with a skip term and a self-gated output.

  z = sigmoid(W_z x), c = W_c x, h_t = (1 - z_t) h_{t-1} + z_t c_t, forward and time-reversed
  with shared weights; y = (h_fwd + h_bwd + d * c) * GELU(W_g x); out = W_o y. Frames where
  `frame_mask` is 0 reset the state (decay = drive = 0).
  """

  def __init__(self, width: int, hidden: int, recurrence: str = "chunked"):
    super().__init__()
    self.in_projection = Dense(width, 3 * hidden)
    self.skip = nn.Parameter(torch.ones(hidden))
    self.out_projection = Dense(hidden, width)
    self.recurrence = recurrence

  def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """x: (batch, time, width), frame_mask: (batch, time) -> (batch, time, width)."""
    update_logit, candidate, gate = self.in_projection(x).chunk(3, dim=-1)
    update = torch.sigmoid(update_logit)
    keep = frame_mask[..., None].to(x.dtype)
    decay = (1.0 - update) * keep
    drive = update * candidate * keep
    forward, backward = recurrence_lib.bidirectional_recurrence(
        decay, drive, implementation=self.recurrence)
    mixed = (forward + backward + self.skip * candidate) * gelu(gate)
    return self.out_projection(mixed)


class SpeakerAttention(nn.Module):
  """Multi-head self-attention across the speaker streams at each frame (no mixing in time)."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = Dense(width, 3 * width)
    self.out_projection = Dense(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: (batch, speakers, time, width) -> the same shape."""
    width = x.shape[-1]
    head_width = width // self.heads
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.heads, head_width)
    query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    logits = torch.einsum("bsfhd,btfhd->bfhst", query, key)
    weights = torch.softmax(logits / math.sqrt(head_width), dim=-1)
    attended = torch.einsum("bfhst,btfhd->bsfhd", weights, value)
    return self.out_projection(attended.reshape(*x.shape[:-1], width))


class RecurrentBlock(nn.Module):
  """Pre-norm residual linear-RNN mixer then GLU feed-forward, each with LayerScale."""

  def __init__(self, width: int, rnn_hidden: int, ffn_hidden: int, layer_scale_init: float,
               recurrence: str = "chunked"):
    super().__init__()
    self.mixer_norm = RMSNorm(width)
    self.mixer = LinearRNNMixer(width, rnn_hidden, recurrence)
    self.mixer_scale = LayerScale(width, layer_scale_init)
    self.feed_forward_norm = RMSNorm(width)
    self.feed_forward = GatedFeedForward(width, ffn_hidden)
    self.feed_forward_scale = LayerScale(width, layer_scale_init)

  def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """x: (..., time, width); frame_mask broadcastable to (..., time)."""
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    flat_mask = torch.broadcast_to(frame_mask, lead + frame_mask.shape[-1:]).reshape(
        -1, frame_mask.shape[-1])
    flat = flat + self.mixer_scale(self.mixer(self.mixer_norm(flat), flat_mask))
    flat = flat + self.feed_forward_scale(self.feed_forward(self.feed_forward_norm(flat)))
    return flat.reshape(x.shape)


class AttentionBlock(nn.Module):
  """Pre-norm residual speaker attention then GLU feed-forward, each with LayerScale."""

  def __init__(self, width: int, heads: int, ffn_hidden: int, layer_scale_init: float):
    super().__init__()
    self.attention_norm = RMSNorm(width)
    self.attention = SpeakerAttention(width, heads)
    self.attention_scale = LayerScale(width, layer_scale_init)
    self.feed_forward_norm = RMSNorm(width)
    self.feed_forward = GatedFeedForward(width, ffn_hidden)
    self.feed_forward_scale = LayerScale(width, layer_scale_init)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: (batch, speakers, time, width) -> the same shape."""
    x = x + self.attention_scale(self.attention(self.attention_norm(x)))
    return x + self.feed_forward_scale(self.feed_forward(self.feed_forward_norm(x)))
