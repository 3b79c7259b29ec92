"""Orbax checkpoints of a training run: state, data-iterator state and run metadata.

Layout of a work directory:
    checkpoints/<step>/state     TrainState (params, optimiser state, step, RNG, skip counters)
    checkpoints/<step>/data      every process's training-iterator state (JSON list, by process)
    checkpoints/<step>/meta      train config, model config, sample rate (JSON)
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from press_jax import config as config_lib
from press_jax.models import press_net

CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger(__name__)


def checkpoint_directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` checkpoints under workdir/checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(checkpoint_directory(workdir), options=options,
                               item_names=("state", "data", "meta"))


def has_checkpoint(workdir: str) -> bool:
  directory = checkpoint_directory(workdir)
  if not os.path.isdir(directory):
    return False
  return make_manager(workdir).latest_step() is not None


def encode_iterator_state(state: Any) -> Any:
  """Iterator states as JSON: bytes become {'base64': ...}."""
  if isinstance(state, bytes):
    return {"base64": base64.b64encode(state).decode("ascii")}
  return state


def decode_iterator_state(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"base64"}:
    return base64.b64decode(state["base64"])
  return state


def gather_from_processes(value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order (a collective: all must call)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  encoded = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8).astype(np.int32)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size)))
  padded = np.zeros(int(lengths.max()), np.int32)  # Same shape on every process.
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(length)].astype(np.uint8)).decode("utf-8"))
          for row, length in zip(gathered, np.asarray(lengths))]


def save(manager: ocp.CheckpointManager, state, iterator_state: Any,
         meta: dict[str, Any]) -> None:
  """Save one checkpoint at `state.step` (asynchronous; call manager.wait_until_finished()).

  Every process passes its own `iterator_state` (hosts read different shards); they are gathered
  and written together by the lead process, and `restore` hands each process its own back.
  """
  step = int(jax.device_get(state.step))
  iterators = gather_from_processes(encode_iterator_state(iterator_state))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"iterators": iterators, "process_count": len(iterators)}),
      meta=ocp.args.JsonSave(meta)), force=True)


def iterator_state_of_process(data: dict[str, Any], where: str = "checkpoint") -> Any:
  """This process's iterator state from a checkpoint's data item (None if it cannot be used).

  A checkpoint written by a different number of processes holds states for other data shards:
  they are not restored (the iterators start afresh from their seed) and a warning says so.
  Checkpoints of earlier versions hold one state, {"iterator": ...}, written by one process.
  """
  if "iterators" not in data:
    data = {"iterators": [data["iterator"]], "process_count": 1}
  saved_count = int(data["process_count"])
  if saved_count != jax.process_count():
    log.warning(
        "%s: the data-iterator states were saved by %d processes, this run has %d; the "
        "iterators restart from their seed (parameters and optimiser state are restored)",
        where, saved_count, jax.process_count())
    return None
  return decode_iterator_state(data["iterators"][jax.process_index()])


def abstract_like(state, sharding=None):
  """Shapes and dtypes of `state` placed with `sharding` (default: the first device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def restore(manager: ocp.CheckpointManager, template_state, step: int | None = None,
            mesh=None):
  """(state, iterator_state, meta) of `step` (default latest), replicated over `mesh`.

  The saved arrays are full (replicated) values, so a checkpoint written on N devices restores
  onto any other number of devices.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"restore: no checkpoint under {manager.directory}")
  sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_like(template_state, sharding)),
      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return (restored["state"],
          iterator_state_of_process(restored["data"], f"{manager.directory}/{step}"),
          restored["meta"])


def read_meta(workdir: str, step: int | None = None) -> dict[str, Any]:
  """The run metadata (configs, sample rate) of a checkpoint, without loading arrays."""
  manager = make_manager(workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"read_meta: no checkpoint under {checkpoint_directory(workdir)}")
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_params(workdir: str, step: int | None = None):
  """(model config, params) of the latest (or given) checkpoint of a training work directory."""
  meta = read_meta(workdir, step)
  config = config_lib.PressConfig.from_dict(meta["model"])
  manager = make_manager(workdir)
  step = manager.latest_step() if step is None else step
  # Restore host numpy arrays: the saved shardings name the devices of the run that wrote the
  # checkpoint, which this process may not have (trained on 4 devices, loaded on 1).
  reader = ocp.CheckpointManager(checkpoint_directory(workdir), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler()})
  metadata = reader.item_metadata(step)["state"]
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        getattr(metadata, "tree", metadata))
  restored = reader.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=restore_args)))["state"]
  reader.close()
  params = restored["params"]
  template = press_net.parameter_shapes(config)
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(template),
      jax.tree_util.tree_leaves(params, is_leaf=lambda x: hasattr(x, "shape")))
  return config, params


def load_model(workdir: str, step: int | None = None):
  """(PressNet, params) from a training work directory."""
  config, params = load_params(workdir, step)
  return press_net.PressNet(config), params
