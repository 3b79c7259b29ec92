"""One exit's forward pass, stage by stage, from the pieces PressNet itself is built of.

`PressNet.__call__` runs every stage (nn.scan over stage groups). An exported per-exit graph
must compute only what exit k needs (SPEC §4: encoder, the blocks up to exit k, its head), and
`compute.truncated` cuts whole scan groups, which is not exit k when a group holds several
stages (`PressConfig.stages_per_group > 1`). `forward_through_exit` runs the stages one at a
time as press_jax/dynamic.py does: `press_net.StageGroup(..., positions=(position,))` on the
group's parameters sliced from the stacked scan parameters, between the shared pieces
`encode_and_split` (everything before the stages), `cumulative_exit_parameters` and
`finish_exits`. No layer is written again here. The stages before exit k run without their
waveform heads (`heads='none'`, or `'variance'` with cumulative exits, which need them).

The exported graphs' contract, shared by the StableHLO and ONNX exports (docs/export.md):
`graph_function` is what both trace, `input_specs` their symbolic inputs, `export_model` the
network they trace (the two-pass recurrence: two sweeps of chunks at a symbolic length).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.export
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from press_jax.models import press_net
from press_jax.types import ExitOutputs

INPUT_NAMES = ("mixture", "mask")
OUTPUT_NAMES = ("mean", "log_var", "log_alpha")
EXPORT_RECURRENCE = "two_pass"
# Frames per chunk of the export's two-pass kernel: of 8-256 measured in onnxruntime, 32 was the
# fastest or within 5 % of it on both the demo's (2, 2000, 32) and S's (1, 20000, 256)
# recurrences, 10 s of audio (docs/export.md, "Speed").
EXPORT_RECURRENCE_CHUNK = 32


def check_exit_number(config, exit_number: int) -> int:
  """`exit_number` as an int in 1..config.exits, else ValueError."""
  if isinstance(exit_number, bool) or int(exit_number) != exit_number \
      or not 1 <= int(exit_number) <= config.exits:
    raise ValueError(f"exit_number must be an integer in 1..{config.exits} (the model's exits), "
                     f"got {exit_number!r}")
  return int(exit_number)


def stage_position(config, exit_number: int) -> tuple[int, int]:
  """(scan group, stage inside the group) of 1-based exit `exit_number`."""
  return divmod(exit_number - 1, config.stages_per_group)


def group_params(params: Any, group: int) -> Any:
  """One scan group's stage parameters: `params['stages']` sliced on its leading axis.

  Concrete arrays are sliced at once (in numpy), so that a graph traced with the parameters as
  constants embeds only the groups it uses, not the whole stack; traced ones are sliced in the
  graph.
  """
  def take(leaf):
    if isinstance(leaf, jax.core.Tracer):
      return leaf[group]
    return np.asarray(leaf)[group]

  return jax.tree_util.tree_map(take, params["stages"])


def forward_through_exit(
    model: press_net.PressNet,
    params: Any,
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None = None,
    *,
    exit_number: int,
) -> ExitOutputs:
  """Exit `exit_number` (1-based) of `model.apply({'params': params}, mixture, mask)`.

  Returns ExitOutputs with a leading exit axis of length 1: mean (1, batch, speakers, samples),
  log_var and log_alpha (1, batch, speakers, blocks). Runs the encoder, the encoder blocks, the
  speaker split and the decoder stages 1..exit_number, nothing after.
  """
  config = model.config
  exit_number = check_exit_number(config, exit_number)
  samples = mixture.shape[-1]
  prepared, context, streams = press_net.encode_and_split(config, params, mixture, mask)
  blocks = press_net.num_blocks(samples, config.block_length)
  variances = []  # Every stage's (log_var, log_alpha), each (1, batch, speakers, blocks).
  for exit_index in range(1, exit_number + 1):
    group, position = stage_position(config, exit_index)
    # Earlier stages feed exit k their streams, and with cumulative exits their variances.
    heads = ("all" if exit_index == exit_number
             else "variance" if config.cumulative_exits else "none")
    stage = press_net.StageGroup(config, samples, blocks, positions=(position,), heads=heads)
    streams, (mean, log_var, log_alpha) = stage.apply(
        {"params": group_params(params, group)}, streams, context)
    if log_var is not None:
      variances.append((log_var, log_alpha))
  if config.cumulative_exits:
    log_var, log_alpha = press_net.cumulative_exit_parameters(
        jnp.concatenate([v for v, _ in variances]), jnp.concatenate([a for _, a in variances]))
    log_var, log_alpha = log_var[-1:], log_alpha[-1:]
  return press_net.finish_exits(config, prepared, mean, log_var, log_alpha)


# --- the exported graphs' contract ------------------------------------------------------------
def export_model(model: press_net.PressNet) -> press_net.PressNet:
  """The network the graphs are traced with: the same one with the two-pass recurrence.

  The associative and chunked kernels cannot take a symbolic length (jax: "associative scan over
  axis of non-constant size"); the sequential one can, but as a loop of T iterations (an ONNX
  `Loop` that onnxruntime ran at ~75 us per frame, 17-33x slower than JAX: docs/export.md). The
  two-pass kernel sweeps chunks of 32 frames twice, all chunks at once (two `Loop`s of 32
  steps), and combines the T / 32 chunk states with the doubling kernel's rounds (a `Loop` of
  log2(T / 2048) of them beyond its static ones); exact at every length and the same
  operations as the jitted model with that kernel. Same values as the other kernels to float
  rounding. (The doubling kernel, the exports' until 2026-12-06, ran 1.3-2x slower in
  onnxruntime.)
  """
  return press_net.PressNet(model.config.replace(recurrence=EXPORT_RECURRENCE,
                                                 recurrence_chunk=EXPORT_RECURRENCE_CHUNK))


def input_specs() -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """(mixture, mask) specs, float32 (batch, samples) with shared symbolic dimensions."""
  batch, samples = jax.export.symbolic_shape("batch, samples")
  spec = jax.ShapeDtypeStruct((batch, samples), jnp.float32)
  return spec, spec


def graph_function(model: press_net.PressNet, params: Any, exit_number: int | None = None):
  """The function an exported graph computes, the parameters closed over as constants.

  (mixture, mask), each float32 (batch, samples), -> (mean, log_var, log_alpha):
  every exit (exit_number None, `PressNet.apply`): mean (exits, batch, speakers, samples),
  log_var and log_alpha (exits, batch, speakers, blocks); exit k alone
  (`forward_through_exit`): the same without the exit axis. Traced with `export_model(model)`.
  """
  traced = export_model(model)
  if exit_number is not None:
    exit_number = check_exit_number(model.config, exit_number)
  params = jax.tree_util.tree_map(jnp.asarray, params)

  def all_exits(mixture, mask):
    outputs = traced.apply({"params": params}, mixture, mask)
    return outputs.mean, outputs.log_var, outputs.log_alpha

  def one_exit(mixture, mask):
    outputs = forward_through_exit(traced, params, mixture, mask, exit_number=exit_number)
    return outputs.mean[0], outputs.log_var[0], outputs.log_alpha[0]

  return all_exits if exit_number is None else one_exit
