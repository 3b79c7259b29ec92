"""`load(export_dir)`: the PyTorch PRESS-Net of a `press-export ... --format safetensors` directory.

Reads `press_config.json` (its `config`; the safetensors metadata when the file is absent) and
`press_params.safetensors`. The tensors are checked by press_jax.export.params.unflatten_params,
the same check (and naming) `load_safetensors` applies for JAX, so a missing, extra or
misshapen tensor is the same one-line ValueError naming the file and the tensor. The port's
own parameter names are then required to be exactly those flat names.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from press_jax import config as config_lib
from press_jax.torch_port import press_net


def _read_config(directory: str) -> tuple[config_lib.PressConfig, dict[str, Any] | None]:
  """(PressConfig, the manifest or None) of an export directory; one-line errors."""
  from press_jax.export import params as params_lib

  config_path = os.path.join(directory, params_lib.CONFIG_FILE)
  if not os.path.isfile(config_path):
    try:
      return params_lib.read_config(directory), None  # the safetensors metadata
    except Exception as error:  # noqa: BLE001 - reported with the file it came from
      raise ValueError(f"{directory}: no {params_lib.CONFIG_FILE}, and the config in "
                       f"{params_lib.PARAMS_FILE}'s metadata is unusable: {error}") from None
  try:
    with open(config_path) as handle:
      manifest = json.load(handle)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"{config_path}: not readable JSON ({error})") from None
  if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
    raise ValueError(f"{config_path}: expected a JSON object with a 'config' object (every "
                     "PressConfig field), as press-export writes it")
  naming = (manifest.get("parameters") or {}).get("naming_version", params_lib.NAMING_VERSION)
  if str(naming) != params_lib.NAMING_VERSION:
    raise ValueError(f"{config_path}: parameter naming version {naming!r}, this port reads "
                     f"version {params_lib.NAMING_VERSION}")
  try:
    config = config_lib.PressConfig.from_dict(manifest["config"])
  except (TypeError, ValueError) as error:
    raise ValueError(f"{config_path}: 'config' is not a valid PressConfig: {error}") from None
  return config, manifest


def _read_tensors(path: str) -> dict[str, Any]:
  """{name: numpy array} of a safetensors file; one-line errors."""
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
    raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def load(export_dir: str | os.PathLike, recurrence: str = "chunked") -> press_net.PressNet:
  """The PyTorch PressNet of `export_dir` (written by `press-export DIR --format safetensors`,
  or any format: every export has the safetensors), in eval mode, on the CPU.

  `recurrence`: 'chunked' (default) or 'sequential', the kernel of the linear recurrence (same
  values). The module's `export_manifest` is press_config.json (None if it was absent), which
  holds e.g. the post-calibration. FileNotFoundError for a missing directory or parameter file,
  ValueError (one line, naming the file and what was expected) for anything else.
  """
  from press_jax.export import params as params_lib
  from press_jax.models import press_net as jax_press_net

  directory = os.fspath(export_dir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such export directory (expected the output of "
                            "press-export MODEL_DIR --format safetensors --out DIR)")
  params_path = os.path.join(directory, params_lib.PARAMS_FILE)
  if not os.path.isfile(params_path):
    raise FileNotFoundError(f"{params_path}: not found (every press-export directory has it)")
  config, manifest = _read_config(directory)
  try:
    press_net.check_config(config)
  except ValueError as error:
    raise ValueError(f"{directory}: {error}") from None
  flat = _read_tensors(params_path)
  # Names, shapes and dtypes against the config, with the export's own naming and messages.
  params_lib.unflatten_params(jax_press_net.PressNet(config), flat, source=params_path)
  model = press_net.PressNet(config, recurrence=recurrence)
  expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
  stored = {name: tuple(value.shape) for name, value in flat.items()}
  if expected != stored:  # the port is out of step with press_jax.export.params
    different = sorted(set(expected) ^ set(stored)) or sorted(
        name for name in expected if expected[name] != stored[name])
    raise RuntimeError(f"{params_path}: the PyTorch port's parameters differ from the export's "
                       f"naming at {different[0]!r} (a bug in press_jax.torch_port)")
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      parameter.copy_(torch.tensor(flat[name]))
  model.export_manifest = manifest
  return model.eval()
