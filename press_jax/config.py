"""PRESS-Net configuration and the named presets (SPEC §6).

The block internals (recurrence width, feed-forward width, attention placement) are not
published. The presets below were chosen so that the parameter counts and GMAC/s land within
the tolerances of the paper's table; `python -m experiments.model_table` prints them, and
docs/model.md records how the choice was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class PressConfig:
  """Everything that defines a PRESS-Net; frozen so it can be a static jit argument."""

  # Signal.
  sample_rate: int = 8000
  speakers: int = 2
  block_length: int = 2000  # T: samples per likelihood / exit-decision block (250 ms at 8 kHz).

  # Encoder: Conv1d(1 -> encoder_channels, kernel, stride) -> GELU -> RMSNorm -> Dense(width).
  encoder_channels: int = 256
  encoder_kernel: int = 16
  encoder_stride: int = 4

  # Separator.
  width: int = 64  # D
  encoder_blocks: int = 8  # N_enc: linear-RNN blocks on the mixture stream.
  decoder_blocks: int = 12  # N_dec: linear-RNN blocks on the speaker streams.
  exits: int = 4  # E: an exit after every decoder_blocks / exits linear-RNN blocks.
  # Beyond the paper: linear-RNN blocks before each exit, in order (len == exits, summing to
  # decoder_blocks), e.g. (1, 1, 2) for a deeper last stage; () is decoder_blocks / exits each.
  # Unequal depths put every stage in one scan step (stages_per_group == exits).
  stage_blocks: tuple[int, ...] = ()
  attention_every: int = 3  # A speaker-attention block after every k-th decoder RNN block; 0: none.
  attention_heads: int = 4
  rnn_expansion: float = 4.0  # Recurrence width H = rnn_expansion * D.
  ffn_expansion: float = 6.0  # GLU feed-forward width F = ffn_expansion * D (recurrent blocks).
  attention_ffn_expansion: float = 6.0  # Same, inside speaker-attention blocks.
  variance_hidden: int = 0  # Hidden width of the variance head's MLP; 0 means D.
  layer_scale_init: float = 1e-5

  # Exit outputs.
  alpha_floor: float = 1e-2  # alpha = alpha_floor + softplus(.), keeps the Student-t proper.
  variance_floor: float = 1e-10  # normalised variance = variance_floor + softplus(.).
  cumulative_exits: bool = False  # alpha_e = sum_k<=e alpha~_k, 1/beta_e = sum_k<=e 1/beta~_k.
  normalize_input: bool = True  # Run on the mixture scaled to unit RMS, rescale the outputs.
  # Beyond the paper: add (mixture - sum of the exit's estimates) / speakers to every estimate,
  # so each exit's sources sum to the mixture (rules out a silent output stream).
  mixture_consistency: bool = False
  # Per-frame RMSNorm on the main path: after the encoder and the speaker split (SPEC §6) and at
  # each waveform head's input. False (beyond the paper) drops these three, so the residual
  # stream keeps every frame's level instead of normalising it away (the blocks' pre-norms stay).
  frame_norm: bool = True
  # How an exit turns its streams into waveforms. 'mapping' (SPEC §6): GLU -> transposed conv
  # of the stream. 'mask' (beyond the paper; TasNet's decoder): each stream predicts a sigmoid
  # mask over the encoder's channels, and the exit's transposed conv decodes the masked frames.
  waveform_head: str = "mapping"

  # Compute dtype of the matmuls (Dense, attention, encoder/decoder convolutions, mask heads);
  # parameters, norms, recurrence, softmax, variance heads and outputs stay float32
  # (docs/model.md, "Precision"). 'auto': 'bfloat16' on an accelerator, 'float32' on CPU
  # (`resolve_dtype`), resolved by the trainer before it builds the model (`resolved()`, so the
  # saved config records what ran) or else when the model is traced; building a config never
  # touches the JAX backend.
  dtype: str = "float32"
  # Kernel of the linear recurrence (press_jax/models/recurrence.py): 'associative', 'chunked',
  # 'sequential', 'doubling', 'two_pass', or 'auto' (the one measured fastest on the platform the
  # model runs on).
  # Same values either way; only speed differs.
  recurrence: str = "auto"
  recurrence_chunk: int = 16  # C, frames per chunk of the 'chunked' and 'two_pass' kernels.

  def __post_init__(self):
    # JSON and ml_collections hand sequences back as lists; the config stays hashable.
    object.__setattr__(self, "stage_blocks", tuple(self.stage_blocks))
    self.validate()

  # --- derived sizes -------------------------------------------------------------------------
  @property
  def blocks_per_stage(self) -> int:
    """Decoder RNN blocks between two exits (stages of equal depth; `rnn_blocks_of_stage`)."""
    if not self.uniform_stages:
      raise ValueError(f"PressConfig: stages of unequal depth (stage_blocks="
                       f"{self.stage_blocks}) have no single blocks_per_stage")
    return self.decoder_blocks // self.exits

  @property
  def uniform_stages(self) -> bool:
    """Every exit has the same number of RNN blocks before it."""
    return len(set(self.stage_blocks)) <= 1

  def rnn_blocks_of_stage(self, stage_in_group: int) -> int:
    """Linear-RNN blocks of one stage inside a group."""
    if self.stage_blocks:
      return self.stage_blocks[stage_in_group]
    return self.decoder_blocks // self.exits

  @property
  def rnn_hidden(self) -> int:
    return int(round(self.rnn_expansion * self.width))

  @property
  def ffn_hidden(self) -> int:
    return int(round(self.ffn_expansion * self.width))

  @property
  def attention_ffn_hidden(self) -> int:
    return int(round(self.attention_ffn_expansion * self.width))

  @property
  def variance_width(self) -> int:
    return self.variance_hidden or self.width

  @property
  def frames_per_second(self) -> float:
    return self.sample_rate / self.encoder_stride

  @property
  def stages_per_group(self) -> int:
    """Exits per scan step: the shortest run of stages whose block layout repeats."""
    if not self.uniform_stages:
      return self.exits
    if not self.attention_every:
      return 1
    period = math.lcm(self.blocks_per_stage, self.attention_every)
    return period // self.blocks_per_stage

  @property
  def groups(self) -> int:
    """Scan length over stage groups."""
    return self.exits // self.stages_per_group

  def stage_layout(self, stage_in_group: int) -> tuple[str, ...]:
    """Block kinds of one stage inside a group: 'rnn' or 'attention', in order."""
    layout = []
    start = sum(self.rnn_blocks_of_stage(s) for s in range(stage_in_group))
    for k in range(self.rnn_blocks_of_stage(stage_in_group)):
      index = start + k + 1  # 1-based RNN index in the group.
      layout.append("rnn")
      if self.attention_every and index % self.attention_every == 0:
        layout.append("attention")
    return tuple(layout)

  def validate(self) -> None:
    """Raise ValueError naming the field when the configuration is inconsistent."""
    def need(condition, message):
      if not condition:
        raise ValueError(f"PressConfig: {message}")

    need(self.sample_rate > 0, f"sample_rate must be positive, got {self.sample_rate}")
    need(self.speakers >= 1, f"speakers must be >= 1, got {self.speakers}")
    need(self.encoder_stride > 0 and self.encoder_kernel % self.encoder_stride == 0,
         f"encoder_kernel ({self.encoder_kernel}) must be a positive multiple of encoder_stride "
         f"({self.encoder_stride})")
    need(self.block_length > 0 and self.block_length % self.encoder_stride == 0,
         f"block_length ({self.block_length}) must be a positive multiple of encoder_stride "
         f"({self.encoder_stride})")
    need(self.width > 0, f"width must be positive, got {self.width}")
    need(self.waveform_head in ("mapping", "mask"),
         f"waveform_head must be 'mapping' or 'mask', got {self.waveform_head!r}")
    need(self.encoder_blocks >= 0, f"encoder_blocks must be >= 0, got {self.encoder_blocks}")
    need(self.exits >= 1, f"exits must be >= 1, got {self.exits}")
    if self.stage_blocks:
      need(len(self.stage_blocks) == self.exits
           and all(isinstance(b, int) and b >= 1 for b in self.stage_blocks)
           and sum(self.stage_blocks) == self.decoder_blocks,
           f"stage_blocks {self.stage_blocks} must hold one positive int per exit ({self.exits}) "
           f"summing to decoder_blocks ({self.decoder_blocks})")
    else:
      need(self.decoder_blocks >= self.exits and self.decoder_blocks % self.exits == 0,
           f"decoder_blocks ({self.decoder_blocks}) must be a positive multiple of exits "
           f"({self.exits})")
    need(self.attention_every >= 0, f"attention_every must be >= 0, got {self.attention_every}")
    if self.attention_every and self.uniform_stages:
      period = math.lcm(self.blocks_per_stage, self.attention_every)
      need(self.decoder_blocks % period == 0,
           f"decoder_blocks ({self.decoder_blocks}) must be a multiple of "
           f"lcm(decoder_blocks/exits={self.blocks_per_stage}, attention_every="
           f"{self.attention_every}) = {period} so that the scanned stage groups are identical")
    if self.attention_every:
      need(self.width % self.attention_heads == 0,
           f"width ({self.width}) must be divisible by attention_heads ({self.attention_heads})")
    need(self.alpha_floor > 0, f"alpha_floor must be positive, got {self.alpha_floor}")
    need(self.recurrence in RECURRENCES,
         f"recurrence must be one of {', '.join(map(repr, RECURRENCES))}, got "
         f"{self.recurrence!r}")
    need(self.recurrence_chunk >= 1,
         f"recurrence_chunk must be >= 1, got {self.recurrence_chunk}")
    need(self.dtype == "auto" or self.dtype in DTYPES,
         f"dtype must be 'auto', float32, bfloat16 or float16, got {self.dtype!r}")

  # --- conversions ---------------------------------------------------------------------------
  def resolved(self, platform: str | None = None) -> "PressConfig":
    """This config with dtype 'auto' resolved for `platform` (`resolve_dtype`); else itself."""
    dtype = resolve_dtype(self.dtype, platform)
    return self if dtype == self.dtype else self.replace(dtype=dtype)

  def replace(self, **changes: Any) -> "PressConfig":
    """A copy with fields changed (validated)."""
    return dataclasses.replace(self, **changes)

  def with_sample_rate(self, sample_rate: int) -> "PressConfig":
    """The same network for another rate: stride, kernel and block length scale with it."""
    factor = sample_rate / self.sample_rate
    if factor != int(factor) and 1 / factor != int(1 / factor):
      raise ValueError(f"with_sample_rate: {sample_rate} Hz is not an integer ratio of "
                       f"{self.sample_rate} Hz")
    return self.replace(
        sample_rate=sample_rate,
        encoder_stride=int(round(self.encoder_stride * factor)),
        encoder_kernel=int(round(self.encoder_kernel * factor)),
        block_length=int(round(self.block_length * factor)))

  def to_dict(self) -> dict[str, Any]:
    """Every field, JSON-native (stage_blocks as a list, as it reads back from a JSON file)."""
    values = dataclasses.asdict(self)
    values["stage_blocks"] = list(self.stage_blocks)
    return values

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "PressConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"PressConfig: unknown fields {unknown}; known fields are {sorted(known)}")
    return cls(**values)


DTYPES = ("float32", "bfloat16", "float16")
# The names press_jax/models/recurrence.py's RECURRENCE_IMPLEMENTATIONS takes, and 'auto'
# (tests/test_recurrence.py checks that the two agree; the config module stays free of JAX).
RECURRENCES = ("auto", "associative", "chunked", "sequential", "doubling", "two_pass")
AUTO_DTYPE_ON_CPU = "float32"  # XLA:CPU emulates bfloat16 matmuls: slower, not faster.
AUTO_DTYPE_ON_ACCELERATORS = "bfloat16"  # GPU tensor cores, TPU MXU: native bfloat16 matmuls.


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
  """`dtype`, with 'auto' resolved for `platform` (default: `jax.default_backend()`).

  'auto' is 'float32' on 'cpu' and 'bfloat16' on any other platform (gpu, cuda, rocm, tpu).
  Without `platform` this queries (and so initialises) the JAX backend: in a multi-host run
  call it only after `jax.distributed.initialize` (the trainer and the model do, at run time).
  """
  if dtype != "auto":
    return dtype
  if platform is None:
    import jax  # Here, not at the top: the config module is otherwise free of JAX.
    platform = jax.default_backend()
  return AUTO_DTYPE_ON_CPU if platform == "cpu" else AUTO_DTYPE_ON_ACCELERATORS


# The paper's table (SPEC §6): S = PRESS-4, M = PRESS-12. Internals chosen by
# experiments/model_table.py --search (see docs/model.md).
PRESETS: dict[str, PressConfig] = {
    "tiny": PressConfig(
        width=32, encoder_blocks=1, decoder_blocks=2, exits=2, attention_every=2,
        attention_heads=2, rnn_expansion=1.0, ffn_expansion=2.0, attention_ffn_expansion=2.0,
        encoder_channels=64),  # T = 2000: with T = 1000 one output stream dies (docs/model.md).
    "S": PressConfig(
        width=64, encoder_blocks=8, decoder_blocks=12, exits=4, attention_every=3,
        attention_heads=4, rnn_expansion=4.0, ffn_expansion=6.5, attention_ffn_expansion=6.5),
    "M": PressConfig(
        width=128, encoder_blocks=4, decoder_blocks=24, exits=12, attention_every=2,
        attention_heads=8, rnn_expansion=4.0, ffn_expansion=6.5, attention_ffn_expansion=6.5),
}

PRESET_ALIASES = {
    "press-4": "S", "press4": "S", "press-4 (s)": "S", "s": "S", "small": "S",
    "press-12": "M", "press12": "M", "press-12 (m)": "M", "m": "M", "medium": "M",
    "tiny": "tiny",
}


def preset(name: str, **overrides: Any) -> PressConfig:
  """The named preset ('tiny', 'S' / 'PRESS-4', 'M' / 'PRESS-12'), with fields overridden."""
  key = PRESET_ALIASES.get(name.strip().lower(), name)
  if key not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} "
                     f"(aliases: {sorted(PRESET_ALIASES)})")
  config = PRESETS[key]
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(PressConfig)})
  if unknown:
    raise ValueError(f"PressConfig has no field {unknown[0]!r} (overrides of preset {name!r})")
  sample_rate = overrides.pop("sample_rate", None)
  if sample_rate is not None and sample_rate != config.sample_rate:
    config = config.with_sample_rate(sample_rate)
  return config.replace(**overrides) if overrides else config
