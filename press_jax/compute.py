"""Parameters and compute (GMAC per second of audio) for every exit of a PRESS-Net.

Definitions (SPEC §4, §6):
- `params` of exit e: every parameter a network truncated after exit e stores: encoder, encoder
  blocks, speaker split, the decoder stages 1..e and their exit heads.
- `gmac_per_s` of exit e: multiply-accumulates per second of audio of everything needed to
  produce exit e: encoder, blocks up to it, and its own head (earlier heads are not counted).
  Dense layers, attention products and the recurrences (one MAC per state element and
  direction) are counted; activations, norms and softmax are not.
- `gmac_per_s_all_heads`: the same with the heads of exits 1..e included, which is what a
  compiled truncated network computes; `xla_gmac_per_s` cross-checks it against XLA's cost
  analysis of that compiled forward pass.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from press_jax.config import PressConfig
from press_jax.models import press_net


@dataclasses.dataclass(frozen=True)
class ExitCost:
  """Size and compute of one exit."""

  exit: int  # 1-based.
  params: int
  gmac_per_s: float
  gmac_per_s_all_heads: float


# --- analytic MACs per frame ------------------------------------------------------------------
def recurrent_block_macs(config: PressConfig) -> float:
  """MACs per frame of one stream through a RecurrentBlock."""
  width, hidden, ffn = config.width, config.rnn_hidden, config.ffn_hidden
  mixer = width * 3 * hidden + hidden * width + 2 * hidden  # projections + two recurrences
  return mixer + 3 * ffn * width


def attention_block_macs(config: PressConfig) -> float:
  """MACs per frame and stream through an AttentionBlock (speakers attend to each other)."""
  width, ffn = config.width, config.attention_ffn_hidden
  products = 2 * config.speakers * width  # logits and weighted sum, per query stream
  return 4 * width * width + products + 3 * ffn * width


def waveform_head_macs(config: PressConfig) -> float:
  """MACs per frame and stream of a WaveformHead (GLU + transposed conv) or a MaskHead."""
  glu = config.width * 2 * config.width
  if config.waveform_head == "mask":
    channels = config.encoder_channels
    return glu + config.width * channels + channels + channels * config.encoder_kernel
  return glu + config.width * config.encoder_kernel


def variance_head_macs(config: PressConfig) -> float:
  """MACs per frame and stream of a VarianceHead (pooling + MLP once per block)."""
  frames_per_block = config.block_length / config.encoder_stride
  mlp = config.width * config.variance_width + config.variance_width * 2
  return config.width + mlp / frames_per_block


def shared_macs(config: PressConfig) -> float:
  """MACs per frame of the encoder, encoder blocks and speaker split."""
  width, speakers = config.width, config.speakers
  encoder = config.encoder_kernel * config.encoder_channels + config.encoder_channels * width
  split = width * 2 * speakers * width + speakers * width * speakers * width
  return encoder + config.encoder_blocks * recurrent_block_macs(config) + split


def stage_macs(config: PressConfig, stage: int) -> float:
  """MACs per frame and stream of the blocks of exit `stage` (0-based), without its head."""
  layout = config.stage_layout(stage % config.stages_per_group)
  return sum(recurrent_block_macs(config) if kind == "rnn" else attention_block_macs(config)
             for kind in layout)


def head_macs(config: PressConfig) -> float:
  return waveform_head_macs(config) + variance_head_macs(config)


def gmac_per_second(config: PressConfig, exit_number: int, all_heads: bool = False) -> float:
  """GMAC per second of audio to produce exit `exit_number` (1-based)."""
  heads = exit_number if all_heads else 1
  return gmac_per_second_run(config, exit_number, waveform_heads=heads, variance_heads=heads)


def gmac_per_second_run(config: PressConfig, stages: int, waveform_heads: int,
                        variance_heads: int) -> float:
  """GMAC per second of audio of a run that computed decoder stages 1..`stages` and that many
  waveform and variance heads (what `dynamic.DynamicSelection` counts)."""
  per_stream = sum(stage_macs(config, s) for s in range(stages))
  per_stream += (waveform_head_macs(config) * waveform_heads
                 + variance_head_macs(config) * variance_heads)
  per_frame = shared_macs(config) + config.speakers * per_stream
  return per_frame * config.frames_per_second / 1e9


# --- parameters -------------------------------------------------------------------------------
parameter_shapes = press_net.parameter_shapes  # The parameter tree's shapes (not allocated).


def params_per_exit(config: PressConfig) -> list[int]:
  """Parameter count of the network truncated after each exit (1-based order)."""
  shapes = parameter_shapes(config)
  shared = sum(leaf.size for name, sub in shapes.items() if name != "stages"
               for leaf in jax.tree_util.tree_leaves(sub))
  per_stage = [0] * config.stages_per_group
  for name, sub in shapes["stages"].items():
    stage = int(name.split("_")[0].removeprefix("stage"))
    per_stage[stage] += sum(leaf.size for leaf in jax.tree_util.tree_leaves(sub)) // config.groups
  counts, total = [], shared
  for exit_index in range(config.exits):
    total += per_stage[exit_index % config.stages_per_group]
    counts.append(total)
  return counts


def exit_costs(config: PressConfig) -> list[ExitCost]:
  """Parameters and GMAC/s for every exit."""
  return [
      ExitCost(exit=e + 1, params=p, gmac_per_s=gmac_per_second(config, e + 1),
               gmac_per_s_all_heads=gmac_per_second(config, e + 1, all_heads=True))
      for e, p in enumerate(params_per_exit(config))]


# --- XLA cross-check --------------------------------------------------------------------------
def truncated(config: PressConfig, exit_number: int) -> PressConfig:
  """The same network cut after exit `exit_number` (a multiple of the scan group size)."""
  if exit_number % config.stages_per_group:
    raise ValueError(f"truncated: exit {exit_number} is not a multiple of the stage group size "
                     f"{config.stages_per_group}")
  blocks = [config.rnn_blocks_of_stage(s % config.stages_per_group) for s in range(exit_number)]
  return config.replace(exits=exit_number, decoder_blocks=sum(blocks),
                        stage_blocks=tuple(blocks) if config.stage_blocks else ())


def xla_gmac_per_second(config: PressConfig, exit_number: int, seconds: float = 1.0) -> float:
  """Half of XLA's flop count of the compiled forward truncated after `exit_number`, per second."""
  cut = truncated(config, exit_number)
  model = press_net.PressNet(cut, scan_unroll=True)
  samples = int(round(seconds * config.sample_rate))
  params = parameter_shapes(cut)
  mixture = jax.ShapeDtypeStruct((1, samples), jnp.float32)
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, mixture).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"]) / 2.0 / seconds / 1e9


def preset_summary(config: PressConfig) -> dict[str, float]:
  """Headline numbers for docs: total params and last-exit GMAC/s."""
  costs = exit_costs(config)
  return {"params": costs[-1].params, "gmac_per_s": costs[-1].gmac_per_s,
          "frames_per_second": config.frames_per_second,
          "receptive_field": math.inf}
