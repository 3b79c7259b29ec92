"""Building blocks of PRESS-Net: the linear-RNN mixer, speaker attention, GLU feed-forward.

All pointwise maps are `nn.Dense` (einsum), never 1x1 convolutions: on XLA:CPU the latter are
much slower inside scanned bodies (ENV_NOTES).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _associative_recurrence(decay, drive, reverse=False):
  """h_t = decay_t * h_{t-1} + drive_t over axis -2 by jax.lax.associative_scan."""

  def combine(earlier, later):
    decay_earlier, drive_earlier = earlier
    decay_later, drive_later = later
    return decay_earlier * decay_later, decay_later * drive_earlier + drive_later

  _, state = jax.lax.associative_scan(
      combine, (decay, drive), axis=decay.ndim - 2, reverse=reverse)
  return state


@jax.custom_vjp
def _forward_recurrence(decay, drive):
  return _associative_recurrence(decay, drive)


def _forward_recurrence_fwd(decay, drive):
  state = _associative_recurrence(decay, drive)
  return state, (decay, state)


def _forward_recurrence_bwd(residuals, state_cotangent):
  """The adjoint of a linear recurrence is the same recurrence run backwards in time."""
  decay, state = residuals
  zeros = jnp.zeros_like(decay[..., :1, :])
  next_decay = jnp.concatenate([decay[..., 1:, :], zeros], axis=-2)
  adjoint = _associative_recurrence(next_decay, state_cotangent, reverse=True)
  previous_state = jnp.concatenate([zeros, state[..., :-1, :]], axis=-2)
  return adjoint * previous_state, adjoint


_forward_recurrence.defvjp(_forward_recurrence_fwd, _forward_recurrence_bwd)


def linear_recurrence(
    decay: Float[Array, "... time channels"],
    drive: Float[Array, "... time channels"],
    reverse: bool = False,
) -> Float[Array, "... time channels"]:
  """h_t = decay_t * h_{t-1} + drive_t from h = 0 (reverse: from the end), in parallel.

  The gradient is written out (one reverse associative scan) rather than differentiated
  through the scan's levels: same values, a third of the compile time.
  """
  if reverse:
    flip = lambda x: jnp.flip(x, axis=-2)  # noqa: E731
    return flip(_forward_recurrence(flip(decay), flip(drive)))
  return _forward_recurrence(decay, drive)


def bidirectional_recurrence(decay, drive):
  """(forward, backward) recurrences of the same inputs, computed in one stacked scan."""
  flip = lambda x: jnp.flip(x, axis=-2)  # noqa: E731
  both = _forward_recurrence(jnp.stack([decay, flip(decay)]), jnp.stack([drive, flip(drive)]))
  return both[0], flip(both[1])


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch, initialised small (1e-5)."""

  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale.astype(x.dtype)


class GatedFeedForward(nn.Module):
  """GLU feed-forward: Dense(2F) -> GELU(a) * b -> Dense(D)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    value, gate = jnp.split(nn.Dense(2 * self.hidden, dtype=self.dtype, name="expand")(x), 2, -1)
    return nn.Dense(width, dtype=self.dtype, name="contract")(nn.gelu(value) * gate)


class LinearRNNMixer(nn.Module):
  """Bidirectional minGRU-style gated linear recurrence with a skip term and a self-gated output.

  z = sigmoid(W_z x), c = W_c x, h_t = (1 - z_t) h_{t-1} + z_t c_t, run forward and time-reversed
  with shared weights; y = (h_fwd + h_bwd + d * c) * GELU(W_g x); out = W_o y.
  Frames where `frame_mask` is 0 reset the state (decay = drive = 0), so padding at the end of
  an utterance never reaches its valid frames in the reverse pass.
  """

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "batch time width"],
      frame_mask: Float[Array, "batch time"],
  ) -> Float[Array, "batch time width"]:
    width = x.shape[-1]
    projected = nn.Dense(3 * self.hidden, dtype=self.dtype, name="in_projection")(x)
    update_logit, candidate, gate = jnp.split(projected.astype(jnp.float32), 3, axis=-1)
    update = jax.nn.sigmoid(update_logit)
    keep = frame_mask[..., None].astype(jnp.float32)
    decay = (1.0 - update) * keep
    drive = update * candidate * keep
    forward, backward = bidirectional_recurrence(decay, drive)
    skip = self.param("skip", nn.initializers.ones, (self.hidden,))
    mixed = (forward + backward + skip * candidate) * nn.gelu(gate)
    return nn.Dense(width, dtype=self.dtype, name="out_projection")(mixed.astype(self.dtype))


class SpeakerAttention(nn.Module):
  """Multi-head self-attention across the speaker streams at each frame (no mixing in time)."""

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "batch speakers time width"]):
    width = x.shape[-1]
    head_width = width // self.heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(*x.shape[:-1], 3, self.heads, head_width)
    query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    logits = jnp.einsum("bsfhd,btfhd->bfhst", query, key).astype(jnp.float32)
    weights = jax.nn.softmax(logits / jnp.sqrt(head_width), axis=-1).astype(value.dtype)
    attended = jnp.einsum("bfhst,btfhd->bsfhd", weights, value)
    attended = attended.reshape(*x.shape[:-1], width)
    return nn.Dense(width, dtype=self.dtype, name="out_projection")(attended)


class RecurrentBlock(nn.Module):
  """Pre-norm residual linear-RNN mixer then GLU feed-forward, each with LayerScale."""

  rnn_hidden: int
  ffn_hidden: int
  layer_scale_init: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "... time width"],
      frame_mask: Float[Array, "... time"],
  ) -> Float[Array, "... time width"]:
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    flat_mask = jnp.broadcast_to(frame_mask, lead + frame_mask.shape[-1:]).reshape(
        -1, frame_mask.shape[-1])
    mixed = LinearRNNMixer(self.rnn_hidden, self.dtype, name="mixer")(
        nn.RMSNorm(name="mixer_norm")(flat), flat_mask)
    flat = flat + LayerScale(self.layer_scale_init, name="mixer_scale")(mixed.astype(flat.dtype))
    fed = GatedFeedForward(self.ffn_hidden, self.dtype, name="feed_forward")(
        nn.RMSNorm(name="feed_forward_norm")(flat))
    flat = flat + LayerScale(self.layer_scale_init, name="feed_forward_scale")(
        fed.astype(flat.dtype))
    return flat.reshape(x.shape)


class AttentionBlock(nn.Module):
  """Pre-norm residual speaker attention then GLU feed-forward, each with LayerScale."""

  heads: int
  ffn_hidden: int
  layer_scale_init: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "batch speakers time width"]):
    attended = SpeakerAttention(self.heads, self.dtype, name="attention")(
        nn.RMSNorm(name="attention_norm")(x))
    x = x + LayerScale(self.layer_scale_init, name="attention_scale")(attended.astype(x.dtype))
    fed = GatedFeedForward(self.ffn_hidden, self.dtype, name="feed_forward")(
        nn.RMSNorm(name="feed_forward_norm")(x))
    return x + LayerScale(self.layer_scale_init, name="feed_forward_scale")(fed.astype(x.dtype))
