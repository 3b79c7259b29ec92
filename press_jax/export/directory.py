"""An export directory: parameters, graphs, the numpy exit rule and press_config.json.

`write_export` writes everything into a temporary sibling directory and renames it to the
output directory at the end, so a directory with that name is always complete. Layout
(docs/export.md):

  press_config.json             the PressConfig, rates and sizes, post-calibration, versions,
                                the files with what each is (and their sha256)
  press_params.safetensors      every parameter under a flat name (export.params)
  press_exit_rule.py            the exit rule in numpy + scipy (export.exit_rule_numpy)
  press_all_exits.stablehlo     --format stablehlo: every exit (export.stablehlo)
  press_exit<k>.stablehlo       --format stablehlo: exit k alone, for each chosen k
  press_all_exits.onnx          --format onnx: every exit (export.onnx_graphs)
  press_exit<k>.onnx            --format onnx: exit k alone, for each chosen k
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import jax
import numpy as np

import press_jax
from press_jax.export import exit_rule_numpy, forward, onnx_graphs, params as params_lib, stablehlo

FORMATS = ("safetensors", "stablehlo", "onnx")
GRAPH_FORMATS = ("stablehlo", "onnx")  # The formats with graphs (--exits, --no-verify).
RULE_FILE = "press_exit_rule.py"
FORMAT_VERSION = 1
# The exit rule's defaults, as press-separate has them.
RULE_DEFAULTS = {"target_db": 10.0, "confidence": 0.9, "crossfade_ms": 10.0,
                 "conditions": list(exit_rule_numpy.CONDITIONS), "method": "approximate"}
VERIFY_TOLERANCE = 1e-4  # Relative to max(1, max |reference|), per output.


class ExportError(ValueError):
  """An export that cannot be written; `status` 2 for a bad request (output directory, format,
  exits), 1 for a failed self-check."""

  def __init__(self, message: str, status: int = 2):
    super().__init__(message)
    self.status = status


def output_dir_problem(path: str, overwrite: bool) -> str | None:
  """Why `path` cannot be the output directory (None if it can)."""
  if os.path.exists(path) and not os.path.isdir(path):
    return f"{path}: exists and is not a directory"
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    return f"{path}: exists and is not empty (pass --overwrite to replace it)"
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    return f"{path}: the parent directory {parent} does not exist"
  if not os.access(parent, os.W_OK):
    return f"{path}: the parent directory {parent} is not writable"
  return None


def check_exits(requested: Sequence[int] | None, exits: int) -> list[int]:
  """The chosen 1-based exits (default all), sorted, each in 1..exits, else ExportError."""
  if requested is None:
    return list(range(1, exits + 1))
  chosen = sorted(set(int(k) for k in requested))
  wrong = [k for k in chosen if not 1 <= k <= exits]
  if not chosen or wrong:
    raise ExportError(f"--exits {','.join(map(str, requested))}: the model has {exits} exits, "
                      f"expected numbers in 1..{exits}")
  return chosen


def _file_entry(directory: str, name: str, description: str, **extra) -> dict[str, Any]:
  with open(os.path.join(directory, name), "rb") as handle:
    data = handle.read()
  return {"name": name, "description": description, "bytes": len(data),
          "sha256": hashlib.sha256(data).hexdigest(), **extra}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _publish_permissions(directory: str) -> None:
  """The modes a plain mkdir / open would have given (mkdtemp and safetensors use 0700 / 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _replace_directory(temporary: str, out_dir: str) -> None:
  """Renames `temporary` to `out_dir`, first moving an existing `out_dir` aside."""
  if not os.path.exists(out_dir):
    os.rename(temporary, out_dir)
    return
  parent, name = os.path.split(os.path.abspath(out_dir))
  old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
  os.rmdir(old)
  os.rename(out_dir, old)
  os.rename(temporary, out_dir)
  shutil.rmtree(old, ignore_errors=True)


# --- self-check -------------------------------------------------------------------------------
def verification_inputs(config, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """A random (batch, 2 blocks + 37 samples) mixture whose later items end earlier (mask)."""
  samples = 2 * config.block_length + 37
  rng = np.random.default_rng(0)
  mixture = rng.standard_normal((batch, samples)).astype(np.float32)
  mask = np.ones((batch, samples), np.float32)
  for item in range(1, batch):
    mask[item, samples - item * (config.block_length // 2 + 11):] = 0.0
  return mixture, mask


def max_abs_differences(got, expected) -> tuple[dict[str, float], bool]:
  """{output: max |got - expected|} and whether each is within VERIFY_TOLERANCE (relative)."""
  differences, within = {}, True
  for name, a, b in zip(forward.OUTPUT_NAMES, got, expected):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    differences[name] = float(np.max(np.abs(a - b))) if a.size else 0.0
    within &= a.shape == b.shape and differences[name] <= VERIFY_TOLERANCE * max(
        1.0, float(np.max(np.abs(b))) if b.size else 1.0)
  return differences, within


# --- the export -------------------------------------------------------------------------------
def unavailable(fmt: str) -> str | None:
  """Why `fmt` cannot be written on this installation (onnx without its extra), else None."""
  if fmt == "onnx":
    problem = onnx_graphs.missing_extra()
    return f"--format onnx: {problem}" if problem else None
  return None


def write_export(
    loaded,
    out_dir: str,
    *,
    fmt: str,
    exits: Sequence[int] | None = None,
    overwrite: bool = False,
    platforms: Sequence[str] | None = None,
    opset: int = onnx_graphs.OPSET,
    verify: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
  """Writes the export of `loaded` (a model_dir.LoadedModel) to `out_dir`; returns the manifest.

  fmt 'safetensors': parameters, exit rule, press_config.json; 'stablehlo' / 'onnx': the same
  plus the all-exits graph and the graphs of `exits` (1-based, default all). `platforms` applies
  to StableHLO, `opset` to ONNX. `verify` runs each graph once as written (StableHLO
  deserialised where lowered for this machine's platform; ONNX in onnxruntime) against
  `model.apply` on a random padded batch and raises ExportError if it differs by more than
  VERIFY_TOLERANCE; the differences go into press_config.json.
  """
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
  problem = unavailable(fmt) or output_dir_problem(out_dir, overwrite)
  if problem:
    raise ExportError(problem)
  model, params = loaded.model, loaded.params
  config = model.config
  chosen = check_exits(exits, config.exits) if fmt in GRAPH_FORMATS else []
  platforms = stablehlo.check_platforms(platforms)
  try:
    opset = onnx_graphs.check_opset(opset)
  except ValueError as error:
    raise ExportError(f"--opset {opset}: {error}") from None
  parent, name = os.path.split(os.path.abspath(out_dir))
  temporary = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
  try:
    files = [_file_entry(temporary, os.path.basename(params_lib.save_safetensors(
        temporary, model, params)), "every parameter under a flat name (docs/export.md)")]
    shutil.copyfile(exit_rule_numpy.__file__, os.path.join(temporary, RULE_FILE))
    files.append(_file_entry(temporary, RULE_FILE,
                             "the exit rule in numpy + scipy, stand-alone (no JAX)"))
    graphs = None
    if fmt == "stablehlo":
      graphs = _write_graphs(_StableHLO(platforms), temporary, model, params, chosen, verify,
                             files, log)
    elif fmt == "onnx":
      graphs = _write_graphs(_ONNX(opset), temporary, model, params, chosen, verify, files, log)
    manifest = _manifest(loaded, params, files, fmt, graphs)
    with open(os.path.join(temporary, params_lib.CONFIG_FILE), "w") as handle:
      json.dump(manifest, handle, indent=1)
    _publish_permissions(temporary)
    _replace_directory(temporary, out_dir)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  return manifest


class _StableHLO:
  """How the StableHLO graphs are built, written, run and described (export.stablehlo)."""

  def __init__(self, platforms):
    self.platforms = platforms
    self.all_exits_file, self.exit_file = stablehlo.ALL_EXITS_FILE, stablehlo.exit_file
    self.what = "StableHLO (jax.export, serialised)"
    self.runtime = "jax.export.deserialize + Exported.call"

  def can_verify(self) -> bool:
    return self.platforms is None or jax.default_backend() in self.platforms

  def build(self, model, params, exit_number):
    if exit_number is None:
      return stablehlo.export_all_exits(model, params, self.platforms)
    return stablehlo.export_exit(model, params, exit_number, self.platforms)

  save, describe = staticmethod(stablehlo.save), staticmethod(stablehlo.describe)

  def run(self, path, mixture, mask):
    return stablehlo.call(stablehlo.load(path), mixture, mask)

  def section(self, described, model):
    return {"symbolic_dimensions": {"batch": "any >= 1", "samples": "any >= 1",
                                    "blocks": f"ceil(samples / {model.config.block_length})"},
            "platforms": described["platforms"],
            "calling_convention_version": described["calling_convention_version"],
            "compatibility": "jax.export: loadable by jax releases within 6 months after the one "
                             "that wrote it (1 month before); keep press_params.safetensors for "
                             "later"}


class _ONNX:
  """How the ONNX graphs are built, written, run and described (export.onnx_graphs)."""

  def __init__(self, opset):
    self.opset = opset
    self.all_exits_file, self.exit_file = onnx_graphs.ALL_EXITS_FILE, onnx_graphs.exit_file
    self.what = f"ONNX (opset {opset}, jax2onnx)"
    self.runtime = "onnxruntime CPUExecutionProvider"

  def can_verify(self) -> bool:
    return True

  def build(self, model, params, exit_number):
    if exit_number is None:
      return onnx_graphs.export_all_exits(model, params, self.opset)
    return onnx_graphs.export_exit(model, params, exit_number, self.opset)

  save, describe = staticmethod(onnx_graphs.save), staticmethod(onnx_graphs.describe)

  def run(self, path, mixture, mask):
    return onnx_graphs.call(onnx_graphs.load(path), mixture, mask)

  def section(self, described, model):
    block_length = model.config.block_length
    return {"dynamic_dimensions": {
                "batch": "any >= 1", "samples": "any >= 1",
                f"floordiv(samples + {block_length - 1}, {block_length})":
                    f"blocks = ceil(samples / {block_length})"},
            "opset": described["opset"], "converter": onnx_graphs.versions(),
            "tracing": "jax.make_jaxpr at symbolic (batch, samples), then jax2onnx.to_onnx of "
                       "jax.extend.core.jaxpr_as_fun (docs/export.md)"}


def _write_graphs(backend, directory, model, params, chosen, verify, files, log):
  """Builds, writes and (optionally) checks the graphs; returns press_config.json's section."""
  checking = verify and backend.can_verify()
  if checking:
    mixture, mask = verification_inputs(model.config)
    reference = jax.jit(model.apply)({"params": params}, mixture, mask)
    reference = (reference.mean, reference.log_var, reference.log_alpha)
  targets = [(backend.all_exits_file, None)] + [(backend.exit_file(k), k) for k in chosen]
  described, differences = {}, {}
  for file_name, exit_number in targets:
    what = "every exit" if exit_number is None else f"exit {exit_number}"
    log(f"converting {what} -> {file_name}")
    graph = backend.build(model, params, exit_number)
    path = os.path.join(directory, file_name)
    backend.save(path, graph)
    description = described[file_name] = backend.describe(graph)
    files.append(_file_entry(directory, file_name, f"{backend.what} of {what}",
                             inputs=description["inputs"], outputs=description["outputs"]))
    if checking:
      got = backend.run(path, mixture, mask)
      expected = reference if exit_number is None else tuple(
          r[exit_number - 1] for r in reference)
      differences[file_name], within = max_abs_differences(got, expected)
      if not within:
        raise ExportError(f"{file_name}: the exported graph differs from model.apply by "
                          f"{differences[file_name]} (tolerance {VERIFY_TOLERANCE} relative)",
                          status=1)
  first = described[backend.all_exits_file]
  return {
      "inputs": first["inputs"],
      **backend.section(first, model),
      "recurrence": forward.EXPORT_RECURRENCE,
      "per_exit_graphs": chosen,
      "verification": ({"inputs": "random mixture, batch 2, 2 blocks + 37 samples, item 2 "
                                  "padded at the end",
                        "reference": "jax.jit(model.apply) on " + jax.default_backend(),
                        "runtime": backend.runtime,
                        "max_abs_difference": differences} if checking else None),
  }


def _manifest(loaded, params, files, fmt, graphs) -> dict[str, Any]:
  config = loaded.model.config
  count = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
  files = files + [{"name": params_lib.CONFIG_FILE,
                    "description": "this file: configuration, versions, file list"}]
  manifest = {
      "format": "press_jax export", "format_version": FORMAT_VERSION,
      "press_jax_version": press_jax.__version__, "jax_version": jax.__version__,
      "jaxlib_version": _version("jaxlib"), "safetensors_version": _version("safetensors"),
      "source": {"model_dir": os.path.abspath(loaded.directory), "kind": loaded.kind},
      "config": config.to_dict(),
      "sample_rate": config.sample_rate, "exits": config.exits,
      "block_length": config.block_length, "speakers": config.speakers,
      "stages_per_group": config.stages_per_group, "groups": config.groups,
      "post_calibration": (loaded.calibration.to_dict() if loaded.calibration is not None
                           else None),
      "parameters": {"file": params_lib.PARAMS_FILE, "naming_version": params_lib.NAMING_VERSION,
                     "tensors": len(params_lib.flatten_params(config, params)), "count": count,
                     "layout": "Dense kernels (in, out); scanned axes unstacked into exit<e>. "
                               "and encoder_blocks.<i>. names (docs/export.md)"},
      "exit_rule": {"file": RULE_FILE, "defaults": RULE_DEFAULTS},
      "files": files,
  }
  if graphs is not None:
    manifest[fmt] = graphs
  return manifest
