"""PRESS-Net: encoder, speaker split, scanned decoder stages with probabilistic exits (SPEC §6).

    mixture (batch, samples)
      -> Encoder -> encoder RecurrentBlocks (scanned)           (batch, frames, width)
      -> SpeakerSplit                                           (batch, speakers, frames, width)
      -> StageGroups (scanned, stacked parameters); each stage ends in an exit:
           WaveformHead -> mean                                 (batch, speakers, samples)
           (or MaskHead: a mask on the encoder's frames, decoded; PressConfig.waveform_head)
           VarianceHead -> log_var, log_alpha per block         (batch, speakers, blocks)
    -> ExitOutputs with a leading exit axis.

`PressConfig.dtype` is the compute dtype of the matmuls; parameters, the residual stream, norms,
recurrence, softmax, the variance heads and all outputs stay float32 (docs/model.md,
"Precision"): every module here returns float32.

Use `create(preset)` for a model, `init_params(model, key)` for parameters and `load(directory)`
for a saved model.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from press_jax import config as config_lib
from press_jax.models.dense import Dense
from press_jax.models.layers import AttentionBlock, RecurrentBlock
from press_jax.types import ExitOutputs

PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"
_RMS_EPSILON = 1e-8  # Added to the mixture power before normalising; only guards silence.


def compute_dtype(config: config_lib.PressConfig) -> jnp.dtype:
  """The matmuls' dtype: `config.dtype`, with 'auto' resolved for the platform running it."""
  return jnp.dtype(config_lib.resolve_dtype(config.dtype))


# --- framing --------------------------------------------------------------------------------
def ceil_div(numerator: int, denominator: int) -> int:
  """ceil(numerator / denominator) for numerator >= 0, denominator > 0.

  Written as a floor division of a non-negative numerator, not as -(-n // d): at a symbolic
  length the two are different dimension expressions, and jax2onnx lowers `floordiv` to ONNX
  integer `Div`, which truncates, so only this form is right for every length in an ONNX graph.
  """
  return (numerator + denominator - 1) // denominator


def num_frames(samples: int, kernel: int, stride: int) -> int:
  """Encoder frames for `samples` samples: ceil(samples / stride) + kernel / stride - 1."""
  return ceil_div(samples, stride) + kernel // stride - 1


def num_blocks(samples: int, block_length: int) -> int:
  """Likelihood / exit blocks: ceil(samples / block_length); the last one may be ragged."""
  return ceil_div(samples, block_length)


def frame_signal(signal: Float[Array, "batch samples"], kernel: int, stride: int):
  """Overlapping frames of a zero-padded signal, (batch, frames, kernel); a strided Conv1d input."""
  overlap = kernel // stride
  samples = signal.shape[-1]
  segments = ceil_div(samples, stride) + 2 * overlap - 2
  left = (overlap - 1) * stride
  # Zero padding of a constant width, cropped to whole segments: the same values as padding by
  # `segments * stride - samples - left` on the right, but with static pad widths when `samples`
  # is symbolic (jax.export; jax2onnx takes only constant pads).
  padded = jnp.pad(signal, ((0, 0), (left, (2 * overlap - 1) * stride - 1 - left)))
  pieces = padded[:, :segments * stride].reshape(signal.shape[0], segments, stride)
  frames = segments - overlap + 1
  return jnp.concatenate([pieces[:, k:k + frames] for k in range(overlap)], axis=-1)


def overlap_add(frames: Float[Array, "... frames kernel"], stride: int, samples: int):
  """Inverse of `frame_signal`'s layout: sum overlapping frames, crop to `samples`.

  Its gradient is written out (`_overlap_add_transpose`): autodiff's transpose of the pad-and-sum
  below writes `overlap` zero-padded copies of the whole frame tensor and sums them, the
  largest element-wise pass of a mask head's backward on XLA:CPU (README, "Speed"); the
  transpose is a framing of the cotangent, one pass.
  """

  @jax.custom_vjp
  def summed(x):
    return _overlap_add(x, stride, samples)

  def forward(x):
    return _overlap_add(x, stride, samples), None

  def backward(_, cotangent):
    return (_overlap_add_transpose(cotangent, frames.shape[-2], frames.shape[-1], stride),)

  summed.defvjp(forward, backward)
  return summed(frames)


def _overlap_add_transpose(cotangent: Float[Array, "... samples"], count: int, kernel: int,
                           stride: int) -> Float[Array, "... frames kernel"]:
  """The adjoint of `_overlap_add`: frame k of the result is the cotangent's samples under it."""
  overlap = kernel // stride
  lead = cotangent.shape[:-1]
  left = (overlap - 1) * stride
  total = (count + overlap - 1) * stride
  padded = jnp.pad(cotangent, [(0, 0)] * len(lead) + [(left, total - left - cotangent.shape[-1])])
  pieces = padded.reshape(*lead, count + overlap - 1, stride)
  return jnp.concatenate([pieces[..., k:k + count, :] for k in range(overlap)], axis=-1)


def _overlap_add(frames, stride: int, samples: int):
  count, kernel = frames.shape[-2:]
  overlap = kernel // stride
  lead = frames.shape[:-2]
  pieces = frames.reshape(*lead, count, overlap, stride)
  no_pad = [(0, 0)] * len(lead)
  total = sum(
      jnp.pad(pieces[..., k, :], no_pad + [(k, overlap - 1 - k), (0, 0)])
      for k in range(overlap))
  flat = total.reshape(*lead, (count + overlap - 1) * stride)
  left = (overlap - 1) * stride
  return flat[..., left:left + samples]


# --- modules ----------------------------------------------------------------------------------
class Encoder(nn.Module):
  """Conv1d(1 -> channels, kernel, stride, no bias) -> GELU -> RMSNorm -> Dense(width).

  With `with_basis` it returns (latent, basis): the (batch, frames, channels) representation
  before the projection too, which mask heads (`MaskHead`) mask and decode. Both float32 (the
  matmuls run in `dtype`).
  """

  channels: int
  kernel: int
  stride: int
  width: int
  dtype: Any = jnp.float32
  frame_norm: bool = True  # False: no RMSNorm, each frame keeps its level (PressConfig).
  with_basis: bool = False

  @nn.compact
  def __call__(self, mixture: Float[Array, "batch samples"]):
    frames = frame_signal(mixture, self.kernel, self.stride)
    hidden = nn.gelu(Dense(self.channels, use_bias=False, dtype=self.dtype, name="conv")(frames))
    hidden = hidden.astype(jnp.float32)  # The norm (and the mask heads' basis) in float32.
    if self.frame_norm:
      hidden = nn.RMSNorm(name="norm")(hidden)
    latent = Dense(self.width, dtype=self.dtype, name="projection")(hidden)
    latent = latent.astype(jnp.float32)
    return (latent, hidden) if self.with_basis else latent


class SpeakerSplit(nn.Module):
  """Dense(D -> 2SD) -> GLU -> Dense(SD) -> S streams -> RMSNorm; float32 streams."""

  speakers: int
  dtype: Any = jnp.float32
  frame_norm: bool = True

  @nn.compact
  def __call__(self, x: Float[Array, "batch frames width"]):
    batch, frames, width = x.shape
    value, gate = jnp.split(
        Dense(2 * self.speakers * width, dtype=self.dtype, name="expand")(x), 2, axis=-1)
    streams = Dense(self.speakers * width, dtype=self.dtype, name="mix")(
        value * jax.nn.sigmoid(gate))
    streams = streams.reshape(batch, frames, self.speakers, width).transpose(0, 2, 1, 3)
    streams = streams.astype(jnp.float32)  # (batch, speakers, frames, width)
    return nn.RMSNorm(name="norm")(streams) if self.frame_norm else streams


class WaveformHead(nn.Module):
  """RMSNorm -> GLU -> transposed Conv1d(kernel, stride) to one waveform per stream."""

  kernel: int
  stride: int
  dtype: Any = jnp.float32
  frame_norm: bool = True

  @nn.compact
  def __call__(self, streams: Float[Array, "batch speakers frames width"], samples: int):
    width = streams.shape[-1]
    hidden = nn.RMSNorm(name="norm")(streams) if self.frame_norm else streams
    value, gate = jnp.split(Dense(2 * width, dtype=self.dtype, name="glu")(hidden), 2, -1)
    frames = Dense(self.kernel, dtype=self.dtype, name="transposed_conv")(
        value * jax.nn.sigmoid(gate))
    return overlap_add(frames.astype(jnp.float32), self.stride, samples)


class MaskHead(nn.Module):
  """RMSNorm -> GLU -> Dense(channels) -> sigmoid mask on the encoder's basis -> transposed Conv1d.

  The TasNet decoder (`PressConfig.waveform_head = "mask"`, beyond the paper): each stream
  masks the encoder's (batch, frames, channels) representation of the mixture, and a transposed
  convolution of this exit's own weights turns the masked frames into a waveform.
  """

  kernel: int
  stride: int
  dtype: Any = jnp.float32
  frame_norm: bool = True

  @nn.compact
  def __call__(self, streams: Float[Array, "batch speakers frames width"],
               basis: Float[Array, "batch frames channels"], samples: int):
    width, channels = streams.shape[-1], basis.shape[-1]
    hidden = nn.RMSNorm(name="norm")(streams) if self.frame_norm else streams
    value, gate = jnp.split(Dense(2 * width, dtype=self.dtype, name="glu")(hidden), 2, -1)
    mask = jax.nn.sigmoid(Dense(channels, dtype=self.dtype, name="mask")(
        value * jax.nn.sigmoid(gate)))
    # One product per stream, stacked, rather than a broadcast over the speaker axis: the same
    # values, but the basis gradient becomes a sum of products instead of a reduction, which
    # XLA:CPU fused into a slow YNNPACK reduce (README, "Speed").
    basis = basis.astype(mask.dtype)
    masked = jnp.stack([mask[:, s] * basis for s in range(mask.shape[1])], axis=1)
    frames = Dense(self.kernel, use_bias=False, dtype=self.dtype, name="transposed_conv")(masked)
    return overlap_add(frames.astype(jnp.float32), self.stride, samples)


class VarianceHead(nn.Module):
  """Pool frames over each block -> MLP -> softplus -> (log_var, log_alpha) per block.

  Entirely float32 whatever `PressConfig.dtype` is: it is small (one row per block, not per
  frame), and its outputs (logs of the variance and of alpha) are what the exit rule thresholds.
  """

  hidden: int
  alpha_floor: float
  variance_floor: float

  @nn.compact
  def __call__(
      self,
      streams: Float[Array, "batch speakers frames width"],
      frame_block: Int[Array, "batch frames"],
      frame_weight: Float[Array, "batch frames"],
      blocks: int,
  ):
    hidden = nn.RMSNorm(name="norm")(streams.astype(jnp.float32)).astype(jnp.float32)
    pooled = pool_blocks(hidden, frame_block, frame_weight, blocks)
    hidden = nn.gelu(Dense(self.hidden, dtype=jnp.float32, name="hidden")(pooled))
    raw = Dense(2, dtype=jnp.float32, name="output")(hidden)
    variance = self.variance_floor + jax.nn.softplus(raw[..., 0])
    alpha = self.alpha_floor + jax.nn.softplus(raw[..., 1])
    return jnp.log(variance), jnp.log(alpha)


def pool_blocks(
    features: Float[Array, "batch speakers frames width"],
    frame_block: Int[Array, "batch frames"],
    frame_weight: Float[Array, "batch frames"],
    blocks: int,
) -> Float[Array, "batch speakers blocks width"]:
  """Weighted sum of each block's frames, as one contraction with a (frames, blocks) matrix.

  A matmul rather than a scatter (segment_sum), whose backward is a slow gather on CPU.
  """
  pooling = frame_weight[..., None] * jax.nn.one_hot(frame_block, blocks, dtype=features.dtype)
  return jnp.einsum("bsfd,bfk->bskd", features, pooling)


def make_waveform_head(config: config_lib.PressConfig, **kwargs) -> nn.Module:
  """An exit's waveform head as `PressConfig.waveform_head` says: MaskHead or WaveformHead."""
  head = MaskHead if config.waveform_head == "mask" else WaveformHead
  return head(config.encoder_kernel, config.encoder_stride, compute_dtype(config),
              config.frame_norm, **kwargs)


def waveform_head_inputs(head: nn.Module, streams, basis, samples: int) -> tuple:
  """The call arguments of `head`: (streams, basis, samples) for a MaskHead, else (streams,
  samples)."""
  return (streams, basis, samples) if isinstance(head, MaskHead) else (streams, samples)


class StageGroup(nn.Module):
  """One scan step: `stages_per_group` stages, each a run of blocks followed by its exit."""

  config: config_lib.PressConfig
  samples: int
  blocks: int
  # Which of the group's stages to run (the dynamic path runs them one at a time, each on the
  # previous one's streams); None runs them all. Parameter names do not depend on it.
  positions: tuple[int, ...] | None = None
  # Which exit heads to run: 'all'; 'variance' (no waveform head: mean is None), for stages
  # whose streams and variances feed a later exit; 'none' (only the streams).
  heads: str = "all"

  @nn.compact
  def __call__(self, streams, context):
    config = self.config
    frame_mask, frame_block, frame_weight, basis = context
    dtype = compute_dtype(config)
    exits = []
    positions = range(config.stages_per_group) if self.positions is None else self.positions
    for stage in positions:
      rnn_count = attention_count = 0
      for kind in config.stage_layout(stage):
        if kind == "rnn":
          streams = RecurrentBlock(
              config.rnn_hidden, config.ffn_hidden, config.layer_scale_init, dtype,
              config.recurrence, config.recurrence_chunk,
              name=f"stage{stage}_rnn{rnn_count}")(streams, frame_mask[:, None, :])
          rnn_count += 1
        else:
          streams = AttentionBlock(
              config.attention_heads, config.attention_ffn_hidden, config.layer_scale_init,
              dtype, name=f"stage{stage}_attention{attention_count}")(streams)
          attention_count += 1
      mean = log_var = log_alpha = None
      if self.heads == "all":
        head = make_waveform_head(config, name=f"stage{stage}_waveform_head")
        mean = head(*waveform_head_inputs(head, streams, basis, self.samples))
      if self.heads in ("all", "variance"):
        log_var, log_alpha = VarianceHead(
            config.variance_width, config.alpha_floor, config.variance_floor,
            name=f"stage{stage}_variance_head")(streams, frame_block, frame_weight, self.blocks)
      exits.append((mean, log_var, log_alpha))
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *exits)
    return streams, stacked


class EncoderBlock(nn.Module):
  """A RecurrentBlock in scan-step form (carry, frame_mask) -> (carry, None)."""

  config: config_lib.PressConfig

  @nn.compact
  def __call__(self, x, frame_mask):
    config = self.config
    x = RecurrentBlock(config.rnn_hidden, config.ffn_hidden, config.layer_scale_init,
                       compute_dtype(config), config.recurrence, config.recurrence_chunk,
                       name="block")(x, frame_mask)
    return x, None


class PressNet(nn.Module):
  """PRESS-Net; returns every exit's (mean, log_var, log_alpha) stacked on a leading exit axis.

  `mask` marks valid samples (1) and padding at the end of each utterance (0); outputs on the
  valid samples do not depend on the padding. `scan_unroll` and `remat` change how the stages are
  compiled, not what they compute.
  """

  config: config_lib.PressConfig
  scan_unroll: int | bool = 1
  remat: bool = False

  @nn.compact
  def __call__(
      self,
      mixture: Float[Array, "batch samples"],
      mask: Float[Array, "batch samples"] | None = None,
  ) -> ExitOutputs:
    config = self.config
    batch, samples = mixture.shape
    prepared = prepare_input(config, mixture, mask)
    latent, basis = encode(config, make_encoder(config, name="encoder")(prepared.normalised))
    context = stage_context(config, prepared.lengths, samples, basis)
    frame_mask = context[0]

    if config.encoder_blocks:
      latent, _ = make_encoder_stack(config, self.scan_unroll, self.remat,
                                     name="encoder_blocks")(latent, frame_mask)
    streams = make_speaker_split(config, name="speaker_split")(latent)

    blocks = num_blocks(samples, config.block_length)
    group = nn.remat(StageGroup) if self.remat else StageGroup
    stages = nn.scan(
        group, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=nn.broadcast, length=config.groups, unroll=self.scan_unroll)
    _, (mean, log_var, log_alpha) = stages(config, samples, blocks, name="stages")(
        streams, context)

    def exits_first(x):  # (groups, stages_per_group, ...) -> (exits, ...)
      return x.reshape(config.exits, *x.shape[2:])

    mean, log_var, log_alpha = map(exits_first, (mean, log_var, log_alpha))
    if config.cumulative_exits:
      log_var, log_alpha = cumulative_exit_parameters(log_var, log_alpha)
    return finish_exits(config, prepared, mean, log_var, log_alpha)


# --- the pieces of the forward pass, shared by PressNet and the dynamic path (dynamic.py) -----
@flax.struct.dataclass
class PreparedInput:
  """The masked mixture scaled to unit RMS, its mask, scale and valid lengths."""

  normalised: Float[Array, "batch samples"]
  mask: Float[Array, "batch samples"]
  scale: Float[Array, "batch"]
  lengths: Float[Array, "batch"]


def prepare_input(config: config_lib.PressConfig, mixture, mask=None) -> PreparedInput:
  """Masks the mixture and (with normalize_input) scales each one to unit RMS."""
  batch = mixture.shape[0]
  mask = jnp.ones_like(mixture) if mask is None else mask.astype(mixture.dtype)
  mixture = mixture * mask
  lengths = mask.sum(-1)  # (batch,)
  if config.normalize_input:
    power = (mixture ** 2).sum(-1) / jnp.maximum(lengths, 1.0)
    scale = jnp.sqrt(power + _RMS_EPSILON)
  else:
    scale = jnp.ones((batch,), mixture.dtype)
  return PreparedInput(normalised=mixture / scale[:, None], mask=mask, scale=scale,
                       lengths=lengths)


def finish_exits(config: config_lib.PressConfig, prepared: PreparedInput,
                 mean: Float[Array, "exits batch speakers samples"], log_var, log_alpha
                 ) -> ExitOutputs:
  """Mixture consistency, then back to the input's scale (any number of exits); `mean` None
  (no waveform head run) stays None."""
  if mean is not None:
    mean = finish_estimates(config, prepared, mean)
  log_var = log_var + 2.0 * jnp.log(prepared.scale)[None, :, None, None]
  return ExitOutputs(mean=mean, log_var=log_var, log_alpha=log_alpha)


def finish_estimates(config: config_lib.PressConfig, prepared: PreparedInput,
                     mean: Float[Array, "exits batch speakers samples"]):
  """finish_exits' estimates alone: mixture consistency, then the input's scale and mask."""
  if config.mixture_consistency:
    mean = mixture_consistent(mean, prepared.normalised)
  return mean * prepared.scale[None, :, None, None] * prepared.mask[None, :, None, :]


def make_encoder(config: config_lib.PressConfig, **kwargs) -> Encoder:
  return Encoder(config.encoder_channels, config.encoder_kernel, config.encoder_stride,
                 config.width, compute_dtype(config), config.frame_norm,
                 with_basis=config.waveform_head == "mask", **kwargs)


def encode(config: config_lib.PressConfig, encoded):
  """(latent, basis or None) from `make_encoder(config)`'s output."""
  return encoded if config.waveform_head == "mask" else (encoded, None)


def stage_context(config: config_lib.PressConfig, lengths, samples: int, basis):
  """What every StageGroup reads besides the streams: `frame_context`'s three + the basis."""
  return (*frame_context(config, lengths, samples), basis)


def encode_and_split(config: config_lib.PressConfig, params, mixture, mask=None):
  """Everything before the decoder stages, from a parameter tree (paths that run stages alone).

  Returns (prepared input, stage context, streams (batch, speakers, frames, width)), the same
  values PressNet computes before its scan over stage groups.
  """
  prepared = prepare_input(config, mixture, mask)
  latent, basis = encode(config, make_encoder(config).apply({"params": params["encoder"]},
                                                            prepared.normalised))
  context = stage_context(config, prepared.lengths, mixture.shape[-1], basis)
  if config.encoder_blocks:
    latent, _ = make_encoder_stack(config).apply({"params": params["encoder_blocks"]}, latent,
                                                 context[0])
  streams = make_speaker_split(config).apply({"params": params["speaker_split"]}, latent)
  return prepared, context, streams


def make_encoder_stack(config: config_lib.PressConfig, scan_unroll=1, remat=False, **kwargs):
  """The scanned encoder blocks as one module: (latent, frame_mask) -> (latent, None)."""
  block = nn.remat(EncoderBlock) if remat else EncoderBlock
  stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                  in_axes=nn.broadcast, length=config.encoder_blocks, unroll=scan_unroll)
  return stack(config, **kwargs)


def make_speaker_split(config: config_lib.PressConfig, **kwargs) -> SpeakerSplit:
  return SpeakerSplit(config.speakers, compute_dtype(config), config.frame_norm, **kwargs)


def frame_context(config: config_lib.PressConfig, lengths, samples: int):
  """Per-frame validity, block index and pooling weight, each (batch, frames)."""
  frames = num_frames(samples, config.encoder_kernel, config.encoder_stride)
  # jnp.arange, so that `samples` may be a symbolic dimension (jax.export, press_jax/export).
  start = (jnp.arange(frames, dtype=jnp.int32)
           - (config.encoder_kernel // config.encoder_stride - 1)) * config.encoder_stride
  centre = (start + config.encoder_kernel // 2)[None, :]
  last_valid = jnp.maximum(lengths - 1, 0).astype(jnp.int32)[:, None]
  frame_mask = (start[None, :] < lengths[:, None]).astype(jnp.float32)
  frame_block = jnp.clip(centre, 0, last_valid) // config.block_length
  blocks = num_blocks(samples, config.block_length)
  # Valid frames per block as a one-hot contraction rather than a scatter (segment_sum): the
  # same integer counts, and jax2onnx does not convert the scatter (press_jax/export/onnx_graphs).
  counts = jnp.einsum("bf,bfk->bk", frame_mask,
                      jax.nn.one_hot(frame_block, blocks, dtype=jnp.float32))
  frame_weight = frame_mask / jnp.maximum(jnp.take_along_axis(counts, frame_block, 1), 1.0)
  return frame_mask, frame_block, frame_weight


def mixture_consistent(
    mean: Float[Array, "exits batch speakers samples"],
    mixture: Float[Array, "batch samples"],
) -> Float[Array, "exits batch speakers samples"]:
  """Estimates shifted by an equal share of the residual, so they sum to the mixture."""
  # The streams added one by one, not jnp.sum over the speaker axis: the same values (for two
  # streams the same single addition), and XLA:CPU fuses a reduction over this short middle
  # axis into a slow YNNPACK reduce (README, "Speed").
  residual = mixture[None, :, :] - functools.reduce(
      jnp.add, [mean[:, :, s] for s in range(mean.shape[2])])
  return mean + residual[:, :, None, :] / mean.shape[2]


def cumulative_exit_parameters(log_var, log_alpha):
  """The 'cumulative' exits: alpha_e = sum_{k<=e} alpha_k, 1/beta_e = sum_{k<=e} 1/beta_k."""
  log_beta = log_alpha + log_var
  log_alpha_cumulative = jnp.log(jnp.cumsum(jnp.exp(log_alpha), axis=0))
  log_beta_cumulative = -jnp.log(jnp.cumsum(jnp.exp(-log_beta), axis=0))
  return log_beta_cumulative - log_alpha_cumulative, log_alpha_cumulative


# --- constructors -----------------------------------------------------------------------------
def create(preset: str | config_lib.PressConfig = "S", **overrides) -> PressNet:
  """A PressNet from a preset name ('tiny', 'S', 'M') or a PressConfig, with fields overridden."""
  if isinstance(preset, config_lib.PressConfig):
    return PressNet(preset.replace(**overrides) if overrides else preset)
  return PressNet(config_lib.preset(preset, **overrides))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: PressNet, key: jax.Array, samples: int):
  return model.init(key, jnp.zeros((1, samples), jnp.float32))["params"]


def init_params(model: PressNet, key: jax.Array, samples: int | None = None):
  """Initial parameters; `samples` only sets the dummy input length (default: one block).

  One jitted init per (model, samples), traced once per process: a new `jax.jit(model.init)`
  per call traced the whole network again (~2 s for the tiny preset).
  """
  return _init(model, key, samples or model.config.block_length)


@functools.lru_cache(maxsize=64)
def _parameter_shapes(config: config_lib.PressConfig):
  return jax.eval_shape(lambda: init_params(PressNet(config), jax.random.key(0)))


def parameter_shapes(model_or_config: PressNet | config_lib.PressConfig):
  """The parameter tree as ShapeDtypeStructs, without computing it (cached per config).

  Tracing `init` takes ~0.3 s even for the tiny preset, and loaders, GMAC counts, checkpoint
  restores and exports all need the tree's structure: one traced template per config, and each
  caller gets its own copy of the containers.
  """
  config = getattr(model_or_config, "config", model_or_config)
  try:
    shapes = _parameter_shapes(config)
  except TypeError:  # A config with an unhashable field value: traced each time.
    shapes = _parameter_shapes.__wrapped__(config)
  return jax.tree_util.tree_map(lambda leaf: leaf, shapes)


def save(directory: str, model: PressNet, params) -> None:
  """Write `config.json` and `params.msgpack` (flax serialization) into `directory`."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
    handle.write(model.config.to_json())
  params = jax.device_get(params)
  temporary = os.path.join(directory, PARAMS_FILE + ".tmp")
  with open(temporary, "wb") as handle:
    handle.write(flax.serialization.to_bytes(params))
  os.replace(temporary, os.path.join(directory, PARAMS_FILE))


def load(directory: str) -> tuple[PressNet, Any]:
  """(model, params) from the parameter files `save` writes: config.json + params.msgpack.

  Only parameter files: training work directories and run directories are read by
  `press_jax.model_dir.load`, which sits above the model.
  """
  config_path = os.path.join(directory, CONFIG_FILE)
  params_path = os.path.join(directory, PARAMS_FILE)
  for path in (config_path, params_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"load: {path} not found (a saved model is {CONFIG_FILE} + {PARAMS_FILE}, written by "
          "press_jax.models.press_net.save; for training work directories use "
          "press_jax.model_dir.load)")
  with open(config_path) as handle:
    config = config_lib.PressConfig.from_dict(json.load(handle))
  model = PressNet(config)
  target = parameter_shapes(config)
  target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), target)
  with open(params_path, "rb") as handle:
    params = flax.serialization.from_bytes(target, handle.read())
  # from_bytes takes the stored arrays as they are: check them against the config's shapes.
  expected = dict(jax.tree_util.tree_flatten_with_path(target)[0])
  stored = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, value in stored:
    if path not in expected or np.shape(value) != np.shape(expected[path]):
      name = jax.tree_util.keystr(path)
      want = np.shape(expected[path]) if path in expected else "no such parameter"
      raise ValueError(f"load: {params_path} does not fit {config_path}: parameter {name} has "
                       f"shape {np.shape(value)}, the config needs {want}")
  if len(stored) != len(expected):
    raise ValueError(f"load: {params_path} holds {len(stored)} arrays, {config_path} needs "
                     f"{len(expected)}")
  return model, params
