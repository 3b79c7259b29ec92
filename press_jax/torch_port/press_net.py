"""PRESS-Net in PyTorch, mirroring press_jax/models/press_net.py (SPEC §6).

    mixture (batch, samples) [, mask (batch, samples)]
      -> Encoder -> encoder RecurrentBlocks                     (batch, frames, width)
      -> SpeakerSplit                                           (batch, speakers, frames, width)
      -> exit1 .. exitE, each a stage of blocks ending in an exit:
           WaveformHead or MaskHead -> mean                     (batch, speakers, samples)
           VarianceHead -> log_var, log_alpha per block         (batch, speakers, blocks)
    -> ExitOutputs with a leading exit axis, as the JAX model's.

The JAX model scans over groups of stages with stacked parameters; here each exit is its own
module `exit<e>` (e = 1..exits) holding its blocks `rnn<r>` / `attention<a>` (counted inside the
stage) and its heads, so that `named_parameters()` are the flat names of the safetensors export
(press_jax.export.params). Build one from a PressConfig (`PressNet(config)`, parameters
initialised as Flax would) or from an export directory (`press_jax.torch_port.load`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from press_jax import config as config_lib
from press_jax.torch_port import layers
from press_jax.torch_port.recurrence import RECURRENCE_IMPLEMENTATIONS

_RMS_EPSILON = 1e-8  # Added to the mixture power before normalising (press_net._RMS_EPSILON).


class ExitOutputs(NamedTuple):
  """Every exit's outputs on a leading exit axis (press_jax.types.ExitOutputs).

  mean: (exits, batch, speakers, samples); log_var = log(beta / alpha) and
  log_alpha = log(alpha): (exits, batch, speakers, blocks).
  """

  mean: torch.Tensor
  log_var: torch.Tensor
  log_alpha: torch.Tensor


# --- framing --------------------------------------------------------------------------------
def num_frames(samples: int, kernel: int, stride: int) -> int:
  """Encoder frames for `samples` samples: ceil(samples / stride) + kernel / stride - 1."""
  return -(-samples // stride) + kernel // stride - 1


def num_blocks(samples: int, block_length: int) -> int:
  """Likelihood / exit blocks: ceil(samples / block_length); the last one may be ragged."""
  return -(-samples // block_length)


def frame_signal(signal: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
  """(batch, samples) -> overlapping frames of the zero-padded signal, (batch, frames, kernel).

  Frame f covers samples [(f - (kernel / stride - 1)) * stride, ... + kernel), zeros outside.
  """
  overlap = kernel // stride
  samples = signal.shape[-1]
  segments = -(-samples // stride) + 2 * overlap - 2
  left = (overlap - 1) * stride
  padded = F.pad(signal, (left, segments * stride - samples - left))
  return padded.unfold(-1, kernel, stride)


def overlap_add(frames: torch.Tensor, stride: int, samples: int) -> torch.Tensor:
  """(..., frames, kernel) -> (..., samples): overlapping frames summed, cropped (frame_signal's
  layout)."""
  count, kernel = frames.shape[-2:]
  overlap = kernel // stride
  lead = frames.shape[:-2]
  pieces = frames.reshape(*lead, count, overlap, stride)
  total = frames.new_zeros(*lead, count + overlap - 1, stride)
  for k in range(overlap):
    total = total + F.pad(pieces[..., k, :], (0, 0, k, overlap - 1 - k))
  left = (overlap - 1) * stride
  return total.reshape(*lead, (count + overlap - 1) * stride)[..., left:left + samples]


def frame_context(config: config_lib.PressConfig, lengths: torch.Tensor, samples: int):
  """Per-frame validity, block index and pooling weight, each (batch, frames).

  lengths: (batch,) valid samples. A frame is valid if it starts before the end; its block is
  that of its centre (clipped to the last valid sample); its weight is 1 / (valid frames of
  its block), 0 when invalid.
  """
  frames = num_frames(samples, config.encoder_kernel, config.encoder_stride)
  device = lengths.device
  start = ((torch.arange(frames, device=device)
            - (config.encoder_kernel // config.encoder_stride - 1)) * config.encoder_stride)
  centre = (start + config.encoder_kernel // 2)[None, :]
  last_valid = torch.clamp(lengths - 1, min=0).to(torch.int64)[:, None]
  frame_mask = (start[None, :] < lengths[:, None]).to(torch.float32)
  frame_block = torch.minimum(torch.clamp(centre, min=0), last_valid) // config.block_length
  blocks = num_blocks(samples, config.block_length)
  counts = frame_mask.new_zeros(frame_mask.shape[0], blocks).scatter_add(1, frame_block,
                                                                         frame_mask)
  frame_weight = frame_mask / torch.clamp(torch.gather(counts, 1, frame_block), min=1.0)
  return frame_mask, frame_block, frame_weight


def pool_blocks(features: torch.Tensor, frame_block: torch.Tensor, frame_weight: torch.Tensor,
                blocks: int) -> torch.Tensor:
  """(batch, speakers, frames, width) -> (batch, speakers, blocks, width): each block's frames
  summed with their weights."""
  pooling = frame_weight[..., None] * F.one_hot(frame_block, blocks).to(features.dtype)
  return torch.einsum("bsfd,bfk->bskd", features, pooling)


# --- modules ----------------------------------------------------------------------------------
class Encoder(nn.Module):
  """Conv1d(1 -> channels, kernel, stride, no bias) -> GELU -> RMSNorm -> Dense(width).

  Returns (latent (batch, frames, width), basis (batch, frames, channels)): the basis is the
  representation before the projection, which mask heads mask and decode.
  """

  def __init__(self, config: config_lib.PressConfig):
    super().__init__()
    self.kernel, self.stride = config.encoder_kernel, config.encoder_stride
    self.conv = layers.Dense(config.encoder_kernel, config.encoder_channels, use_bias=False)
    self.norm = layers.RMSNorm(config.encoder_channels) if config.frame_norm else None
    self.projection = layers.Dense(config.encoder_channels, config.width)

  def forward(self, mixture: torch.Tensor):
    hidden = layers.gelu(self.conv(frame_signal(mixture, self.kernel, self.stride)))
    if self.norm is not None:
      hidden = self.norm(hidden)
    return self.projection(hidden), hidden


class EncoderBlock(nn.Module):
  """One encoder block, a RecurrentBlock named `block` (the Flax scan body's name)."""

  def __init__(self, config: config_lib.PressConfig, recurrence: str):
    super().__init__()
    self.block = layers.RecurrentBlock(config.width, config.rnn_hidden, config.ffn_hidden,
                                       config.layer_scale_init, recurrence)

  def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    return self.block(x, frame_mask)


class SpeakerSplit(nn.Module):
  """Dense(D -> 2SD) -> GLU -> Dense(SD) -> S streams -> RMSNorm."""

  def __init__(self, config: config_lib.PressConfig):
    super().__init__()
    width, speakers = config.width, config.speakers
    self.speakers = speakers
    self.expand = layers.Dense(width, 2 * speakers * width)
    self.mix = layers.Dense(speakers * width, speakers * width)
    self.norm = layers.RMSNorm(width) if config.frame_norm else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(batch, frames, width) -> (batch, speakers, frames, width)."""
    batch, frames, width = x.shape
    value, gate = self.expand(x).chunk(2, dim=-1)
    streams = self.mix(value * torch.sigmoid(gate))
    streams = streams.reshape(batch, frames, self.speakers, width).permute(0, 2, 1, 3)
    return self.norm(streams) if self.norm is not None else streams


class WaveformHead(nn.Module):
  """RMSNorm -> GLU -> transposed Conv1d(kernel, stride) to one waveform per stream."""

  def __init__(self, config: config_lib.PressConfig):
    super().__init__()
    width = config.width
    self.stride = config.encoder_stride
    self.norm = layers.RMSNorm(width) if config.frame_norm else None
    self.glu = layers.Dense(width, 2 * width)
    self.transposed_conv = layers.Dense(width, config.encoder_kernel)

  def forward(self, streams: torch.Tensor, basis: torch.Tensor, samples: int) -> torch.Tensor:
    """(batch, speakers, frames, width) -> (batch, speakers, samples); `basis` is unused."""
    hidden = self.norm(streams) if self.norm is not None else streams
    value, gate = self.glu(hidden).chunk(2, dim=-1)
    return overlap_add(self.transposed_conv(value * torch.sigmoid(gate)), self.stride, samples)


class MaskHead(nn.Module):
  """RMSNorm -> GLU -> Dense(channels) -> sigmoid mask on the encoder's basis -> transposed Conv1d
  (`waveform_head = "mask"`)."""

  def __init__(self, config: config_lib.PressConfig):
    super().__init__()
    width, channels = config.width, config.encoder_channels
    self.stride = config.encoder_stride
    self.norm = layers.RMSNorm(width) if config.frame_norm else None
    self.glu = layers.Dense(width, 2 * width)
    self.mask = layers.Dense(width, channels)
    self.transposed_conv = layers.Dense(channels, config.encoder_kernel, use_bias=False)

  def forward(self, streams: torch.Tensor, basis: torch.Tensor, samples: int) -> torch.Tensor:
    """streams (batch, speakers, frames, width), basis (batch, frames, channels) ->
    (batch, speakers, samples)."""
    hidden = self.norm(streams) if self.norm is not None else streams
    value, gate = self.glu(hidden).chunk(2, dim=-1)
    mask = torch.sigmoid(self.mask(value * torch.sigmoid(gate)))
    return overlap_add(self.transposed_conv(mask * basis[:, None]), self.stride, samples)


class VarianceHead(nn.Module):
  """Pool frames over each block -> MLP -> softplus -> (log_var, log_alpha) per block."""

  def __init__(self, config: config_lib.PressConfig):
    super().__init__()
    self.alpha_floor, self.variance_floor = config.alpha_floor, config.variance_floor
    self.norm = layers.RMSNorm(config.width)
    self.hidden = layers.Dense(config.width, config.variance_width)
    self.output = layers.Dense(config.variance_width, 2)

  def forward(self, streams, frame_block, frame_weight, blocks: int):
    """streams (batch, speakers, frames, width) -> two (batch, speakers, blocks)."""
    pooled = pool_blocks(self.norm(streams), frame_block, frame_weight, blocks)
    raw = self.output(layers.gelu(self.hidden(pooled)))
    variance = self.variance_floor + F.softplus(raw[..., 0])
    alpha = self.alpha_floor + F.softplus(raw[..., 1])
    return torch.log(variance), torch.log(alpha)


class Stage(nn.Module):
  """One decoder stage: its blocks (the layout of its position in a Flax stage group), then its
  exit's heads."""

  def __init__(self, config: config_lib.PressConfig, position: int, recurrence: str):
    super().__init__()
    self.block_names = []
    rnn_count = attention_count = 0
    for kind in config.stage_layout(position):
      if kind == "rnn":
        name = f"rnn{rnn_count}"
        block = layers.RecurrentBlock(config.width, config.rnn_hidden, config.ffn_hidden,
                                      config.layer_scale_init, recurrence)
        rnn_count += 1
      else:
        name = f"attention{attention_count}"
        block = layers.AttentionBlock(config.width, config.attention_heads,
                                      config.attention_ffn_hidden, config.layer_scale_init)
        attention_count += 1
      self.add_module(name, block)
      self.block_names.append((kind, name))
    head = MaskHead if config.waveform_head == "mask" else WaveformHead
    self.waveform_head = head(config)
    self.variance_head = VarianceHead(config)

  def forward(self, streams, frame_mask, frame_block, frame_weight, basis, samples: int,
              blocks: int):
    """streams (batch, speakers, frames, width) -> (streams, (mean, log_var, log_alpha))."""
    for kind, name in self.block_names:
      block = getattr(self, name)
      streams = block(streams, frame_mask[:, None, :]) if kind == "rnn" else block(streams)
    mean = self.waveform_head(streams, basis, samples)
    log_var, log_alpha = self.variance_head(streams, frame_block, frame_weight, blocks)
    return streams, (mean, log_var, log_alpha)


class PressNet(nn.Module):
  """PRESS-Net; `forward(mixture, mask=None)` returns every exit's ExitOutputs.

  `mask` marks valid samples (1) and padding at the end of each utterance (0); outputs on the
  valid samples do not depend on the padding, as for the JAX model. `recurrence` picks the
  kernel of the linear recurrence ('chunked' or 'sequential'; the same values).
  """

  def __init__(self, config: config_lib.PressConfig, recurrence: str = "chunked"):
    super().__init__()
    check_config(config)
    if recurrence not in RECURRENCE_IMPLEMENTATIONS:
      raise ValueError(f"recurrence must be one of {RECURRENCE_IMPLEMENTATIONS}, "
                       f"got {recurrence!r}")
    self.config = config
    self.encoder = Encoder(config)
    self.encoder_blocks = nn.ModuleList(
        [EncoderBlock(config, recurrence) for _ in range(config.encoder_blocks)])
    self.speaker_split = SpeakerSplit(config)
    for exit_number in range(1, config.exits + 1):
      self.add_module(f"exit{exit_number}",
                      Stage(config, (exit_number - 1) % config.stages_per_group, recurrence))

  def set_recurrence(self, recurrence: str) -> "PressNet":
    """Switches every mixer to the recurrence kernel `recurrence`; returns self."""
    if recurrence not in RECURRENCE_IMPLEMENTATIONS:
      raise ValueError(f"recurrence must be one of {RECURRENCE_IMPLEMENTATIONS}, "
                       f"got {recurrence!r}")
    for module in self.modules():
      if isinstance(module, layers.LinearRNNMixer):
        module.recurrence = recurrence
    return self

  def forward(self, mixture: torch.Tensor, mask: torch.Tensor | None = None,
              max_exit: int | None = None) -> ExitOutputs:
    """mixture, mask: (batch, samples) -> ExitOutputs (mean (exits, batch, speakers, samples),
    log_var and log_alpha (exits, batch, speakers, blocks)).

    `max_exit`: compute the exits 1..max_exit only (the later stages are not run); the exit
    axis then has max_exit entries, equal to the first max_exit of a full forward pass.
    """
    config = self.config
    last = config.exits if max_exit is None else int(max_exit)
    if not 1 <= last <= config.exits:
      raise ValueError(f"max_exit must be in 1..{config.exits}, got {max_exit!r}")
    dtype = self.encoder.projection.kernel.dtype
    mixture = torch.as_tensor(mixture).to(dtype)
    if mixture.ndim != 2:
      raise ValueError(f"mixture must be (batch, samples), got shape {tuple(mixture.shape)}")
    if mask is not None:
      mask = torch.as_tensor(mask).to(dtype)
      if mask.shape != mixture.shape:
        raise ValueError(f"mask must be (batch, samples) = {tuple(mixture.shape)}, got "
                         f"{tuple(mask.shape)}")
    samples = mixture.shape[-1]
    normalised, mask, scale, lengths = prepare_input(config, mixture, mask)
    latent, basis = self.encoder(normalised)
    frame_mask, frame_block, frame_weight = frame_context(config, lengths, samples)
    for block in self.encoder_blocks:
      latent = block(latent, frame_mask)
    streams = self.speaker_split(latent)
    blocks = num_blocks(samples, config.block_length)
    exits = []
    for exit_number in range(1, last + 1):
      streams, outputs = getattr(self, f"exit{exit_number}")(
          streams, frame_mask, frame_block, frame_weight, basis, samples, blocks)
      exits.append(outputs)
    mean, log_var, log_alpha = (torch.stack(xs) for xs in zip(*exits))
    if config.cumulative_exits:
      log_var, log_alpha = cumulative_exit_parameters(log_var, log_alpha)
    if config.mixture_consistency:
      mean = mixture_consistent(mean, normalised)
    mean = mean * scale[None, :, None, None] * mask[None, :, None, :]
    log_var = log_var + 2.0 * torch.log(scale)[None, :, None, None]
    return ExitOutputs(mean=mean, log_var=log_var, log_alpha=log_alpha)


def check_config(config: config_lib.PressConfig) -> None:
  """ValueError for a PressConfig the port does not run as the JAX model does."""
  if config.dtype != "float32":
    raise ValueError(f"PressConfig.dtype {config.dtype!r}: the PyTorch port computes in "
                     "float32 only (re-create the config with dtype='float32' to run it so)")


def prepare_input(config: config_lib.PressConfig, mixture: torch.Tensor,
                  mask: torch.Tensor | None):
  """(normalised mixture, mask, scale (batch,), lengths (batch,)): the masked mixture scaled to
  unit RMS over its valid samples (with normalize_input)."""
  mask = torch.ones_like(mixture) if mask is None else mask
  mixture = mixture * mask
  lengths = mask.sum(-1)
  if config.normalize_input:
    power = (mixture ** 2).sum(-1) / torch.clamp(lengths, min=1.0)
    scale = torch.sqrt(power + _RMS_EPSILON)
  else:
    scale = mixture.new_ones(mixture.shape[0])
  return mixture / scale[:, None], mask, scale, lengths


def mixture_consistent(mean: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
  """(exits, batch, speakers, samples) estimates shifted by an equal share of the residual."""
  residual = mixture[None] - mean.sum(2)
  return mean + residual[:, :, None, :] / mean.shape[2]


def cumulative_exit_parameters(log_var: torch.Tensor, log_alpha: torch.Tensor):
  """The 'cumulative' exits: alpha_e = sum_{k<=e} alpha_k, 1/beta_e = sum_{k<=e} 1/beta_k."""
  log_beta = log_alpha + log_var
  log_alpha_cumulative = torch.log(torch.cumsum(torch.exp(log_alpha), dim=0))
  log_beta_cumulative = -torch.log(torch.cumsum(torch.exp(-log_beta), dim=0))
  return log_beta_cumulative - log_alpha_cumulative, log_alpha_cumulative
