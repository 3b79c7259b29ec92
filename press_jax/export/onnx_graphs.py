"""ONNX graphs of a PRESS-Net (jax2onnx), symbolic in batch and length.

The same two graphs as press_jax/export/stablehlo.py, with the parameters embedded as
initializers and the same inputs and outputs (`forward.graph_function`):

    mixture  float32 (batch, samples)
    mask     float32 (batch, samples): 1 on valid samples, 0 on padding at the end (all ones
             for unpadded audio)

- every exit (`export_all_exits`): mean (exits, batch, speakers, samples), log_var and
  log_alpha (exits, batch, speakers, blocks);
- one exit (`export_exit`): exit k alone, computing only what it needs; the same without the
  exit axis.

`batch` and `samples` are ONNX dimension parameters (any value >= 1); the outputs' block axis is
named `floordiv(samples + T - 1, T)` (= ceil(samples / T), T = block_length). Opset 17 by default
(`OPSET`; jax2onnx accepts up to 23).

How: `forward.graph_function` is traced to a closed jaxpr by `jax.make_jaxpr` at the symbolic
(batch, samples) of `forward.input_specs`, and jax2onnx converts `jax.extend.core.jaxpr_as_fun`
of that jaxpr at the same symbolic shapes. Tracing first is needed because jax2onnx traces the
function it is given with its Flax plugins patched into Linen, which `nn.scan` (the stacked
encoder blocks and stage groups) does not survive; the jaxpr holds lax primitives only.

What the conversion needs, with jax2onnx 0.17 (docs/export.md, "ONNX graphs"):
- its lowerings of `rem`, `select_n`, `clamp`, `pad` and `copy` build onnx_ir shapes straight
  from jax's abstract values, and onnx_ir calls int() on every dimension, which raises for a
  symbolic one: `_symbolic_dims_as_names` lets onnx_ir name such a dimension by its expression
  while a conversion runs (a scoped replacement of one onnx_ir helper, restored afterwards);
- its graph pass `remove_redundant_reshape_pairs` treats symbolic dimensions as wildcards and
  folds away reshapes that change the shape: `_without_unsafe_passes` leaves it out;
- shape arithmetic `floordiv` becomes ONNX integer `Div`, which truncates: the model writes its
  ceil divisions with non-negative numerators (`press_net.ceil_div`);
- pad widths must be constants, and the scatter of `segment_sum` is not converted: the model
  frames with constant pads and counts frames per block with one-hot contractions;
- `lax.scan(reverse=True)` is not converted, and neither is `associative_scan` (interior
  padding): the graphs run the two-pass recurrence (`forward.EXPORT_RECURRENCE`): two sweeps
  over the 32 frames of a chunk, every chunk at once (ONNX `Scan`s after
  press_jax/export/onnx_rewrites.py; jax2onnx writes `Loop`s), and the doubling kernel's rounds
  over the chunk states (the sequential kernel's per-frame `Loop` made onnxruntime 17-76x
  slower than JAX; the doubling kernel alone, the exports' until 2026-12-06, ran S's graphs
  ~1.25x slower);
- it cannot broadcast to a symbolic shape computed inside a loop ("no origin recorded for
  symbolic dim"): the kernels build their zeros and fill frames arithmetically from inputs.

jax2onnx, onnx and onnxruntime are the optional extra `onnx` (setup.cfg); `missing_extra()`
says what is missing, and nothing here imports them before a conversion or a run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
from typing import Any, Iterator, Sequence

import jax
import jax.export
import jax.extend
import numpy as np

import press_jax
from press_jax.export import forward
from press_jax.export import onnx_rewrites
from press_jax.models import press_net

ALL_EXITS_FILE = "press_all_exits.onnx"
INPUT_NAMES = forward.INPUT_NAMES
OUTPUT_NAMES = forward.OUTPUT_NAMES
OPSET = 17
MIN_OPSET, MAX_OPSET = 17, 23
EXTRA_PACKAGES = ("jax2onnx", "onnx", "onnxruntime")
INSTALL_HINT = "pip install -e '.[onnx]' (or pip install 'press_jax[onnx]')"


def exit_file(exit_number: int) -> str:
  """File name of exit `exit_number`'s graph (1-based)."""
  return f"press_exit{exit_number}.onnx"


def missing_extra() -> str | None:
  """Why the ONNX export cannot run here (a missing package of the `onnx` extra), else None."""
  def absent(name):
    try:
      return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # e.g. sys.modules[name] is None (an import blocked)
      return True

  missing = [name for name in EXTRA_PACKAGES if absent(name)]
  if missing:
    return (f"ONNX export needs the optional 'onnx' extra ({', '.join(missing)} not installed): "
            f"{INSTALL_HINT}")
  return None


def versions() -> dict[str, str | None]:
  """Installed versions of the converter, onnx, onnx-ir and onnxruntime."""
  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {name: version(name) for name in ("jax2onnx", "onnx", "onnx-ir", "onnxruntime")}


def check_opset(opset: int) -> int:
  """`opset` as an int in MIN_OPSET..MAX_OPSET, else ValueError."""
  if isinstance(opset, bool) or int(opset) != opset or not MIN_OPSET <= int(opset) <= MAX_OPSET:
    raise ValueError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
  return int(opset)


# --- conversion -------------------------------------------------------------------------------
@contextlib.contextmanager
def _symbolic_dims_as_names() -> Iterator[None]:
  """While active, onnx_ir turns a symbolic jax dimension into a SymbolicDim named by it.

  onnx_ir's `_maybe_convert_to_symbolic_dim` (what `onnx_ir.Shape` applies to every dimension)
  calls int() on anything with `__int__`; a jax dimension expression has one that raises for a
  non-constant dimension. jax2onnx 0.17 passes such dimensions for the outputs of `rem`,
  `select_n`, `clamp`, `pad` and `copy`. Nothing is replaced if onnx_ir has no such helper.
  """
  core = importlib.import_module("onnx_ir._core")
  original = getattr(core, "_maybe_convert_to_symbolic_dim", None)
  if original is None:
    yield
    return

  def convert(dim):
    if jax.export.is_symbolic_dim(dim):
      return core.SymbolicDim(str(dim))
    return original(dim)

  core._maybe_convert_to_symbolic_dim = convert
  try:
    yield
  finally:
    core._maybe_convert_to_symbolic_dim = original


# jax2onnx graph passes that are wrong at symbolic shapes: remove_redundant_reshape_pairs drops
# Reshape -> (elementwise ->) Reshape when the outer shapes are "compatible", treating every
# symbolic dimension as a wildcard, so (batch, 2, frames) -> (2*batch, frames) -> (2*batch,
# frames, 1) was folded away (the per-exit graphs' RNN blocks then failed in onnxruntime with
# "invalid expand shape"). Skipping a pass only leaves an optimisation out.
UNSAFE_PASSES = ("remove_redundant_reshape_pairs",)


@contextlib.contextmanager
def _without_unsafe_passes() -> Iterator[None]:
  """While active, jax2onnx's graph optimiser runs without UNSAFE_PASSES."""
  optimizations = importlib.import_module("jax2onnx.converter.ir_optimizations")
  passes = getattr(optimizations, "_OPTIMIZER_PASSES", None)
  if passes is None:
    yield
    return
  optimizations._OPTIMIZER_PASSES = tuple(
      p for p in passes if getattr(p, "name", None) not in UNSAFE_PASSES)
  try:
    yield
  finally:
    optimizations._OPTIMIZER_PASSES = passes


@contextlib.contextmanager
def _quiet(names: Sequence[str] = ("onnx_ir", "jax2onnx")) -> Iterator[None]:
  """Errors only from these loggers (onnx_ir warns once per intermediate value it has no dtype
  for, hundreds of lines per graph, none of them about the graph's inputs or outputs)."""
  loggers = [logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _convert(function, model: press_net.PressNet, description: str, opset: int,
             rewrite: bool = True):
  """`function` (a `forward.graph_function`) as an onnx.ModelProto, symbolic batch and length;
  `rewrite` applies `onnx_rewrites.rewrite` (exact; False: jax2onnx's graph as converted)."""
  problem = missing_extra()
  if problem:
    raise ImportError(problem)
  import jax2onnx  # noqa: PLC0415 (the optional extra)

  opset = check_opset(opset)
  specs = forward.input_specs()
  closed = jax.make_jaxpr(function)(*specs)
  with _symbolic_dims_as_names(), _without_unsafe_passes(), _quiet():
    proto = jax2onnx.to_onnx(
        jax.extend.core.jaxpr_as_fun(closed), list(specs), model_name="press_net", opset=opset,
        input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES))
  rewrites = onnx_rewrites.rewrite(proto) if rewrite else {
      name: 0 for name in onnx_rewrites.ONNX_REWRITES}
  config = model.config
  proto.producer_name, proto.producer_version = "press_jax", press_jax.__version__
  proto.doc_string = (f"PRESS-Net, {description}: (mixture, mask) float32 (batch, samples) -> "
                      "mean, log_var, log_alpha (docs/export.md)")
  metadata = {"graph": description, "exits": config.exits, "speakers": config.speakers,
              "sample_rate": config.sample_rate, "block_length": config.block_length,
              "recurrence": forward.EXPORT_RECURRENCE, "press_jax_version": press_jax.__version__,
              "jax_version": jax.__version__, "jax2onnx_version": versions()["jax2onnx"],
              "rewrites": ", ".join(f"{name} {count}" for name, count in rewrites.items())}
  for key, value in metadata.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, str(value)
  return proto


def export_all_exits(model: press_net.PressNet, params: Any, opset: int = OPSET,
                     rewrite: bool = True):
  """Every exit: (mixture, mask) -> mean (E, b, S, L), log_var, log_alpha (E, b, S, blocks)."""
  return _convert(forward.graph_function(model, params), model, "every exit", opset, rewrite)


def export_exit(model: press_net.PressNet, params: Any, exit_number: int, opset: int = OPSET,
                rewrite: bool = True):
  """Exit k only: (mixture, mask) -> mean (b, S, L), log_var, log_alpha (b, S, blocks)."""
  exit_number = forward.check_exit_number(model.config, exit_number)
  return _convert(forward.graph_function(model, params, exit_number), model,
                  f"exit {exit_number}", opset, rewrite)


# --- files and running ------------------------------------------------------------------------
def save(path: str, proto) -> int:
  """Writes the model (one file, initializers inside) to `path`; returns the byte count."""
  data = proto.SerializeToString()
  with open(path, "wb") as handle:
    handle.write(data)
  return len(data)


def load(path: str, threads: int = 0):
  """An onnxruntime InferenceSession (CPU) of a saved graph; `threads` 0 lets it choose."""
  import onnxruntime  # noqa: PLC0415 (the optional extra)

  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Not the unused-initializer notes of the Loop bodies.
  options.intra_op_num_threads = int(threads)
  return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def call(session, mixture, mask=None) -> tuple[np.ndarray, ...]:
  """Runs a loaded graph: (mean, log_var, log_alpha); `mask` defaults to all ones."""
  mixture = np.asarray(mixture, np.float32)
  mask = np.ones_like(mixture) if mask is None else np.asarray(mask, np.float32)
  return tuple(session.run(list(OUTPUT_NAMES), {"mixture": mixture, "mask": mask}))


def describe(proto) -> dict[str, Any]:
  """Inputs and outputs with their shapes (dimension names or sizes), opset, for the manifest."""
  import onnx  # noqa: PLC0415 (the optional extra)

  def dims(value):
    return [d.dim_param if d.dim_param else str(d.dim_value)
            for d in value.type.tensor_type.shape.dim]

  def entry(value):
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return {"name": value.name, "dtype": str(dtype), "shape": dims(value)}

  return {"inputs": [entry(v) for v in proto.graph.input],
          "outputs": [entry(v) for v in proto.graph.output],
          "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}
