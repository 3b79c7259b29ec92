"""Building blocks of PRESS-Net: the linear-RNN mixer, speaker attention, GLU feed-forward.

All pointwise maps are `Dense` (`nn.Dense` with a written-out kernel gradient, dense.py), never
1x1 convolutions: on XLA:CPU the latter are much slower inside scanned bodies (ENV_NOTES).

Precision (docs/model.md, "Precision"): `dtype` is the compute dtype of the matmuls (Dense,
attention) and of the elementwise maps between them; parameters are float32 (Flax's default
`param_dtype`). The residual stream, the norms, the recurrence, the softmax and every block's
output are float32 (`residual_dtype`): a block takes and returns float32 whatever `dtype` is.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from press_jax.models.dense import Dense

# The recurrence kernels live in their own module; re-exported here for the blocks' users.
from press_jax.models.recurrence import (  # noqa: F401
    RECURRENCE_IMPLEMENTATIONS, bidirectional_by_chunk_position, bidirectional_recurrence,
    from_chunk_positions, linear_recurrence, resolve_implementation, to_chunk_positions)


def residual_dtype(x) -> jnp.dtype:
  """The dtype the residual stream and the norms keep: x's, but at least float32."""
  return jnp.promote_types(x.dtype, jnp.float32)


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch, initialised small (1e-5)."""

  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: Float[Array, "... width"]) -> Float[Array, "... width"]:
    """x (a branch's output, any dtype) times the float32 scale, in at least float32."""
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x.astype(residual_dtype(x)) * scale


class GatedFeedForward(nn.Module):
  """GLU feed-forward: Dense(2F) -> GELU(a) * b -> Dense(D)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    value, gate = jnp.split(Dense(2 * self.hidden, dtype=self.dtype, name="expand")(x), 2, -1)
    return Dense(width, dtype=self.dtype, name="contract")(nn.gelu(value) * gate)


class LinearRNNMixer(nn.Module):
  """Bidirectional minGRU-style gated linear recurrence with a skip term and a self-gated output.

  z = sigmoid(W_z x), c = W_c x, h_t = (1 - z_t) h_{t-1} + z_t c_t, run forward and time-reversed
  with shared weights; y = (h_fwd + h_bwd + d * c) * GELU(W_g x); out = W_o y.
  Frames where `frame_mask` is 0 reset the state (decay = drive = 0), so padding at the end of
  an utterance never reaches its valid frames in the reverse pass.
  """

  hidden: int
  dtype: Any = jnp.float32
  recurrence: str = "associative"  # A name of recurrence.RECURRENCE_IMPLEMENTATIONS or 'auto'.
  recurrence_chunk: int = 16

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "batch time width"],
      frame_mask: Float[Array, "batch time"],
  ) -> Float[Array, "batch time width"]:
    width, time = x.shape[-1], x.shape[-2]
    keep = frame_mask[..., None].astype(jnp.float32)
    # The two-pass kernel works in the chunk-position layout: rearrange the D-wide input and
    # output once, not the H-wide decays and drives (recurrence.py, "the chunk-position
    # layout"). Every other operation here acts frame by frame, so the layout changes nothing.
    by_position = resolve_implementation(self.recurrence) == "two_pass"
    if by_position:
      x = to_chunk_positions(x, self.recurrence_chunk)
      keep = to_chunk_positions(keep, self.recurrence_chunk)  # Frames after the end: 0.
    projected = Dense(3 * self.hidden, dtype=self.dtype, name="in_projection")(x)
    update_logit, candidate, gate = jnp.split(projected.astype(jnp.float32), 3, axis=-1)
    update = jax.nn.sigmoid(update_logit)
    decay = (1.0 - update) * keep
    drive = update * candidate * keep
    if by_position:
      forward, backward = bidirectional_by_chunk_position(decay, drive)
    else:
      forward, backward = bidirectional_recurrence(
          decay, drive, implementation=self.recurrence, chunk=self.recurrence_chunk)
    skip = self.param("skip", nn.initializers.ones, (self.hidden,))
    mixed = (forward + backward + skip * candidate) * nn.gelu(gate)
    out = Dense(width, dtype=self.dtype, name="out_projection")(mixed.astype(self.dtype))
    return from_chunk_positions(out, time) if by_position else out


class SpeakerAttention(nn.Module):
  """Multi-head self-attention across the speaker streams at each frame (no mixing in time)."""

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "batch speakers time width"]):
    width = x.shape[-1]
    head_width = width // self.heads
    qkv = Dense(3 * width, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(*x.shape[:-1], 3, self.heads, head_width)
    query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    # Logits accumulated in float32 (not rounded to `dtype` first), softmax in float32; the
    # weights go back to `dtype` for the second matmul.
    logits = jnp.einsum("bsfhd,btfhd->bfhst", query, key,
                        preferred_element_type=jnp.float32).astype(jnp.float32)
    weights = jax.nn.softmax(logits / jnp.sqrt(head_width), axis=-1).astype(value.dtype)
    attended = jnp.einsum("bfhst,btfhd->bsfhd", weights, value)
    attended = attended.reshape(*x.shape[:-1], width)
    return Dense(width, dtype=self.dtype, name="out_projection")(attended)


class RecurrentBlock(nn.Module):
  """Pre-norm residual linear-RNN mixer then GLU feed-forward, each with LayerScale."""

  rnn_hidden: int
  ffn_hidden: int
  layer_scale_init: float = 1e-5
  dtype: Any = jnp.float32
  recurrence: str = "associative"
  recurrence_chunk: int = 16

  @nn.compact
  def __call__(
      self,
      x: Float[Array, "... time width"],
      frame_mask: Float[Array, "... time"],
  ) -> Float[Array, "... time width"]:
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:]).astype(residual_dtype(x))  # The residual stream.
    flat_mask = jnp.broadcast_to(frame_mask, lead + frame_mask.shape[-1:]).reshape(
        -1, frame_mask.shape[-1])
    mixed = LinearRNNMixer(self.rnn_hidden, self.dtype, self.recurrence, self.recurrence_chunk,
                           name="mixer")(
        nn.RMSNorm(name="mixer_norm")(flat), flat_mask)
    flat = flat + LayerScale(self.layer_scale_init, name="mixer_scale")(mixed)
    fed = GatedFeedForward(self.ffn_hidden, self.dtype, name="feed_forward")(
        nn.RMSNorm(name="feed_forward_norm")(flat))
    flat = flat + LayerScale(self.layer_scale_init, name="feed_forward_scale")(fed)
    return flat.reshape(x.shape)


class AttentionBlock(nn.Module):
  """Pre-norm residual speaker attention then GLU feed-forward, each with LayerScale."""

  heads: int
  ffn_hidden: int
  layer_scale_init: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x: Float[Array, "batch speakers time width"]
  ) -> Float[Array, "batch speakers time width"]:
    x = x.astype(residual_dtype(x))  # The residual stream.
    attended = SpeakerAttention(self.heads, self.dtype, name="attention")(
        nn.RMSNorm(name="attention_norm")(x))
    x = x + LayerScale(self.layer_scale_init, name="attention_scale")(attended)
    fed = GatedFeedForward(self.ffn_hidden, self.dtype, name="feed_forward")(
        nn.RMSNorm(name="feed_forward_norm")(x))
    return x + LayerScale(self.layer_scale_init, name="feed_forward_scale")(fed)
