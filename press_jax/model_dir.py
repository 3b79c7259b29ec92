"""One loader for every kind of model directory, above the model and the checkpoints.

`press_net.load` reads parameter files only (config.json + params.msgpack); this module knows
the directories that hold them or their checkpoints:

  a saved model        config.json + params.msgpack (press_net.save; the main job writes one
                       to <workdir>/model when it finishes)
  a training work dir  checkpoints/<step>/... (press_jax.train; the latest step is loaded)
  a main-job work dir  model/ (preferred), else finetune/ or train/ (their checkpoints)

A post-calibration (`calibration.save_post_calibration`) stored beside the parameters as
`post_calibration.json` is loaded with them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from press_jax import calibration as calibration_lib
from press_jax import checkpointing
from press_jax.models import press_net

POST_CALIBRATION_FILE = "post_calibration.json"
# Sub-directories of a main-job work directory, in the order they are tried.
RUN_STAGES = ("model", "finetune", "train")


class ModelDirError(ValueError):
  """A model directory that is missing, of no known kind, corrupt or incompatible."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  model: press_net.PressNet
  params: Any
  calibration: calibration_lib.PostCalibration | None
  directory: str  # The directory the parameters were read from.
  kind: str  # 'saved', 'checkpoint'


def _is_saved_model(directory: str) -> bool:
  return all(os.path.isfile(os.path.join(directory, name))
             for name in (press_net.CONFIG_FILE, press_net.PARAMS_FILE))


def resolve(path: str) -> tuple[str, str]:
  """(directory, kind) of the parameters `path` points at; ModelDirError if none."""
  if not os.path.exists(path):
    raise ModelDirError(f"{path}: no such model directory")
  if not os.path.isdir(path):
    raise ModelDirError(f"{path}: expected a model directory (config.json + params.msgpack, or a "
                        "training work directory with checkpoints/), got a file")
  if _is_saved_model(path):
    return path, "saved"
  if os.path.isdir(checkpointing.checkpoint_directory(path)):
    return path, "checkpoint"
  for stage in RUN_STAGES:
    candidate = os.path.join(path, stage)
    if _is_saved_model(candidate):
      return candidate, "saved"
    if os.path.isdir(checkpointing.checkpoint_directory(candidate)):
      return candidate, "checkpoint"
  raise ModelDirError(
      f"{path}: holds no model (expected {press_net.CONFIG_FILE} + {press_net.PARAMS_FILE}, a "
      f"checkpoints/ directory, or one of the sub-directories {', '.join(RUN_STAGES)})")


def load(path: str) -> LoadedModel:
  """The model, its parameters and its post-calibration (if stored) from any model directory."""
  directory, kind = resolve(path)
  try:
    if kind == "saved":
      model, params = press_net.load(directory)
    else:
      if not checkpointing.has_checkpoint(directory):
        raise ModelDirError(f"{directory}: checkpoints/ holds no finished checkpoint")
      model, params = checkpointing.load_model(directory)
  except ModelDirError:
    raise
  except Exception as error:  # Corrupt files and incompatible configs, from flax or orbax.
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ModelDirError(f"{directory}: cannot load the model ({type(error).__name__}: "
                        f"{message[:300]})") from error
  calibration_path = os.path.join(directory, POST_CALIBRATION_FILE)
  calibration = None
  if os.path.isfile(calibration_path):
    try:
      calibration = calibration_lib.load_post_calibration(calibration_path)
    except Exception as error:
      raise ModelDirError(f"{calibration_path}: not a post-calibration file ({error})") from error
  return LoadedModel(model=model, params=params, calibration=calibration,
                     directory=directory, kind=kind)
