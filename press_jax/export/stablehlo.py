"""StableHLO graphs of a PRESS-Net (`jax.export`), symbolic in batch and length.

Two kinds of graph, both with the parameters embedded as constants and the inputs

    mixture  float32 (batch, samples)
    mask     float32 (batch, samples): 1 on valid samples, 0 on padding at the end (all ones
             for unpadded audio)

- every exit (`export_all_exits`): PressNet itself; returns mean (exits, batch, speakers,
  samples), log_var and log_alpha (exits, batch, speakers, blocks);
- one exit (`export_exit`): `forward.forward_through_exit`, which runs the encoder, the blocks
  up to exit k and exit k's heads only; returns mean (batch, speakers, samples), log_var and log_alpha (batch, speakers,
  blocks).

blocks = ceil(samples / block_length); `batch` and `samples` are free symbolic dimensions (any
value >= 1). The associative and chunked recurrences cannot take a symbolic length on CPU (jax:
"associative scan over axis of non-constant size"), so graphs are traced with
`recurrence='two_pass'` (same values to float rounding; `forward.export_model`): two `while`
loops over the frames of a chunk, every chunk at once, and the doubling kernel's rounds across
the chunk states.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.export
import jax.numpy as jnp
import numpy as np

from press_jax.config import PressConfig
from press_jax.export import forward
from press_jax.models import press_net

ALL_EXITS_FILE = "press_all_exits.stablehlo"
INPUT_NAMES = forward.INPUT_NAMES
OUTPUT_NAMES = forward.OUTPUT_NAMES
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
EXPORT_RECURRENCE = forward.EXPORT_RECURRENCE
export_model = forward.export_model
input_specs = forward.input_specs


def exit_file(exit_number: int) -> str:
  """File name of exit `exit_number`'s graph (1-based)."""
  return f"press_exit{exit_number}.stablehlo"


# --- tracing and lowering ---------------------------------------------------------------------
def _lower(function: Callable, platforms) -> jax.export.Exported:
  return jax.export.export(jax.jit(function), platforms=platforms)(*input_specs())


def check_platforms(platforms) -> tuple[str, ...] | None:
  """None (jax's default export platform) or a tuple of names from PLATFORMS."""
  if platforms is None:
    return None
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if not platforms or unknown:
    raise ValueError(f"platforms must be a non-empty subset of {PLATFORMS}, got {platforms}")
  return platforms


def export_all_exits(model: press_net.PressNet, params: Any,
                     platforms=None) -> jax.export.Exported:
  """Every exit: (mixture, mask) -> mean (E, b, S, L), log_var, log_alpha (E, b, S, blocks)."""
  return _lower(forward.graph_function(model, params), check_platforms(platforms))


def export_exit(model: press_net.PressNet, params: Any, exit_number: int,
                platforms=None) -> jax.export.Exported:
  """Exit k only: (mixture, mask) -> mean (b, S, L), log_var, log_alpha (b, S, blocks)."""
  exit_number = forward.check_exit_number(model.config, exit_number)
  return _lower(forward.graph_function(model, params, exit_number), check_platforms(platforms))


# --- files ------------------------------------------------------------------------------------
def save(path: str, exported: jax.export.Exported) -> int:
  """Writes `exported.serialize()` to `path`; returns the byte count."""
  data = exported.serialize()
  with open(path, "wb") as handle:
    handle.write(data)
  return len(data)


def load(path: str) -> jax.export.Exported:
  """An Exported from a file `save` wrote (within jax's compatibility window)."""
  with open(path, "rb") as handle:
    return jax.export.deserialize(bytearray(handle.read()))


def call(exported: jax.export.Exported, mixture, mask=None) -> tuple[jax.Array, ...]:
  """Runs a loaded graph: (mean, log_var, log_alpha); `mask` defaults to all ones."""
  mixture = jnp.asarray(mixture, jnp.float32)
  mask = jnp.ones_like(mixture) if mask is None else jnp.asarray(mask, jnp.float32)
  return tuple(exported.call(mixture, mask))


def describe(exported: jax.export.Exported) -> dict[str, Any]:
  """Inputs and outputs with their (symbolic) shapes, for press_config.json."""
  def entry(name, aval):
    return {"name": name, "dtype": str(aval.dtype), "shape": [str(d) for d in aval.shape]}

  return {"inputs": [entry(n, a) for n, a in zip(INPUT_NAMES, exported.in_avals)],
          "outputs": [entry(n, a) for n, a in zip(OUTPUT_NAMES, exported.out_avals)],
          "platforms": list(exported.platforms),
          "calling_convention_version": exported.calling_convention_version}
