"""Flat, stable parameter names for safetensors, and the way back to the Flax tree.

The Flax tree stacks scanned parameters on a leading axis; the flat names unstack them
(docs/export.md, "Parameter names"):

  encoder.<path>                      the encoder (conv, norm, projection)
  encoder_blocks.<i>.<path>           encoder block i = 0..encoder_blocks-1 (scan axis unstacked)
  speaker_split.<path>                the speaker split
  exit<e>.<path>                      decoder stage e = 1..exits: its blocks (rnn<r>,
                                      attention<a>, counted inside the stage) and its heads
                                      (waveform_head, variance_head)

<path> is the Flax module path joined with '.', ending in the parameter (kernel, bias, scale,
skip). Exit e lives in scan group (e-1) // stages_per_group as the Flax module
`stage{(e-1) % stages_per_group}_<name>`. Dense kernels are (in, out); arrays are stored as the
model keeps them (float32).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np

from press_jax.config import PressConfig
from press_jax.models import press_net

PARAMS_FILE = "press_params.safetensors"
CONFIG_FILE = "press_config.json"
NAMING_VERSION = "1"
_STAGE_MODULE = re.compile(r"stage(\d+)_(.+)")


def _path_names(path) -> list[str]:
  return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def leaf_names(config: PressConfig, path: list[str]) -> list[tuple[str, int | None]]:
  """(flat name, index on the leading axis or None) of every slice of the leaf at `path`."""
  head, rest = path[0], path[1:]
  if head == "encoder_blocks":
    return [(".".join([head, str(i), *rest]), i) for i in range(config.encoder_blocks)]
  if head == "stages":
    match = _STAGE_MODULE.fullmatch(rest[0])
    if match is None:
      raise ValueError(f"unexpected stage module {rest[0]!r} (expected stage<k>_<name>)")
    position, local = int(match.group(1)), match.group(2)
    return [(".".join([f"exit{group * config.stages_per_group + position + 1}", local,
                       *rest[1:]]), group) for group in range(config.groups)]
  return [(".".join(path), None)]


def flatten_params(config: PressConfig, params: Any) -> dict[str, np.ndarray]:
  """{flat name: contiguous numpy array}, the scanned axes unstacked (module docstring)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    leaf = np.asarray(leaf)
    for name, index in leaf_names(config, _path_names(path)):
      if name in flat:
        raise ValueError(f"two parameters share the flat name {name!r}")
      flat[name] = np.ascontiguousarray(leaf if index is None else leaf[index])
  return flat


def parameter_template(model: press_net.PressNet) -> Any:
  """The model's parameter tree as ShapeDtypeStructs (nothing computed)."""
  return press_net.parameter_shapes(model)


def unflatten_params(model: press_net.PressNet, flat: dict[str, np.ndarray],
                     source: str = "the flat parameters") -> Any:
  """The Flax parameter tree from `flatten_params`' names (scanned axes restacked).

  ValueError naming `source` and the parameter if a name is missing or left over, or a shape or
  dtype does not fit the model's config.
  """
  template = parameter_template(model)
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  used, leaves = set(), []
  for path, spec in paths:
    names = leaf_names(model.config, _path_names(path))
    for name, _ in names:
      if name not in flat:
        raise ValueError(f"{source}: parameter {name!r} is missing")
      used.add(name)
    slices = [np.asarray(flat[name]) for name, _ in names]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
      raise ValueError(f"{source}: the slices {names[0][0]!r}... have shapes {sorted(shapes)}")
    value = slices[0] if names[0][1] is None else np.stack(slices)
    if value.shape != tuple(spec.shape) or value.dtype != spec.dtype:
      shown = spec.shape if names[0][1] is None else spec.shape[1:]
      raise ValueError(f"{source}: parameter {names[0][0]!r} is {slices[0].dtype}"
                       f"{list(slices[0].shape)}, the config needs {np.dtype(spec.dtype)}"
                       f"{list(shown)}")
    leaves.append(value)
  extra = sorted(set(flat) - used)
  if extra:
    raise ValueError(f"{source}: {len(extra)} parameters the config does not have, e.g. "
                     f"{extra[0]!r}")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def save_safetensors(directory: str, model: press_net.PressNet, params: Any) -> str:
  """Writes `directory/press_params.safetensors` (config JSON in its metadata); returns the path."""
  from safetensors.numpy import save_file

  path = os.path.join(directory, PARAMS_FILE)
  metadata = {"format": "press_jax", "naming_version": NAMING_VERSION,
              "press_config": model.config.to_json()}
  save_file(flatten_params(model.config, params), path, metadata=metadata)
  return path


def read_config(directory: str) -> PressConfig:
  """The PressConfig of an export directory: press_config.json, else the safetensors metadata."""
  config_path = os.path.join(directory, CONFIG_FILE)
  if os.path.isfile(config_path):
    with open(config_path) as handle:
      return PressConfig.from_dict(json.load(handle)["config"])
  from safetensors import safe_open

  with safe_open(os.path.join(directory, PARAMS_FILE), framework="numpy") as handle:
    metadata = handle.metadata() or {}
  if "press_config" not in metadata:
    raise ValueError(f"{directory}: no {CONFIG_FILE} and no press_config in the metadata of "
                     f"{PARAMS_FILE}")
  return PressConfig.from_dict(json.loads(metadata["press_config"]))


def load_safetensors(directory: str) -> tuple[press_net.PressNet, Any]:
  """(model, params) from an export directory: the exact Flax tree `press_net.load` gives."""
  from safetensors.numpy import load_file

  path = os.path.join(directory, PARAMS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found (written by press-export)")
  model = press_net.PressNet(read_config(directory))
  return model, unflatten_params(model, load_file(path), source=path)
