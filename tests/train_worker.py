"""Subprocess driver for the data-parallel training tests (see tests/worker_util.py).

    python tests/train_worker.py MODE SPEC.json

The device count comes from XLA_FLAGS (set by the parent before this interpreter starts).
Modes:
  steps    pmap vs shard_map of the per-device train_step, and non-finite batches, on one
           process (writes flattened states to spec['out'] npz files).
  train    one or more press_jax.train.train runs in sequence (spec['runs']); optional
           multi-process start-up through press_jax.distributed (spec['distributed']).
  evaluate press_jax.evaluation.Evaluator on splits of mock utterances (spec['splits']: their
           sizes) whose last batch is partly filler; optional multi-process start-up. Writes
           each split's summary, and per-utterance arrays and block statistics to
           spec['out'] + f'{split}_process{i}.npz'.
Each mode writes a JSON summary to spec['result'].
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import traceback

import jax
import numpy as np

from press_jax import distributed
from tests import mock_data
from tests.model_util import SMALL

# One model, one optimiser and one audio shape for every test: the step programs are then shared
# through the compilation cache.  total_steps equals the runs' length (TrainConfig requires <=).
# The model: the tiny preset at width 16 with one encoder block (tests/model_util.py SMALL):
# every kind of block, and ~40 % less compilation than the tiny preset itself.
MODEL = dict(SMALL)
SAMPLES = 2000
GLOBAL_BATCH = 4
STEPS = 10
OPTIMIZER = dict(peak_learning_rate=1e-3, warmup_steps=2, total_steps=STEPS)


def flatten(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save_tree(path: str, tree) -> None:
  np.savez(path, **flatten(tree))


# --- mode: steps ------------------------------------------------------------------------------
def run_steps(spec):
  """pmap and jit(shard_map) from the same initial state on the same batches; then NaN/Inf."""
  from press_jax import likelihoods, optim
  from press_jax import train_step as step_lib
  from press_jax.models import press_net

  devices = jax.device_count()
  per_device = GLOBAL_BATCH // devices
  model = press_net.create("tiny", **MODEL)
  optimizer = optim.make_optimizer(optim.OptimizerConfig(**OPTIMIZER))
  loss_config = likelihoods.LossConfig(block_length=model.config.block_length)
  kwargs = dict(model=model, loss_config=loss_config, optimizer=optimizer)
  initial = jax.device_get(step_lib.create_train_state(model, optimizer, seed=0))
  batches = [mock_data.global_batch(i, devices, per_device, SAMPLES)
             for i in range(spec["steps"])]
  out, result = spec["out"], {"devices": devices}
  save_tree(out + "initial.npz", initial)

  # shard_map under jit, exactly as train() runs it.
  mesh = step_lib.data_mesh()
  shard_step = step_lib.parallel_train_step(mesh, **kwargs)
  state = jax.device_put(initial, step_lib.replicated(mesh))
  losses = []
  started = time.perf_counter()
  for batch in batches:
    state, metrics = shard_step(state, step_lib.global_batch(mesh, batch))
    losses.append(float(metrics["loss"]))
  result["shard_map_losses"], result["shard_map_s"] = losses, time.perf_counter() - started
  save_tree(out + "shard_map.npz", state)

  # The same per-device function under pmap, state with a leading device axis.
  pmap_step = step_lib.pmap_train_step(**kwargs)
  pstate = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (devices,) + np.shape(x)),
                                  initial)
  losses = []
  started = time.perf_counter()
  for batch in batches:
    pstate, metrics = pmap_step(pstate, batch)
    losses.append(np.asarray(metrics["loss"]).tolist())
  result["pmap_losses"], result["pmap_s"] = losses, time.perf_counter() - started
  replicas = [flatten(jax.tree_util.tree_map(lambda x, i=i: x[i], pstate))
              for i in range(devices)]
  result["pmap_replicas_identical"] = all(
      all(np.array_equal(replicas[0][k], other[k]) for k in replicas[0])
      for other in replicas[1:])
  save_tree(out + "pmap.npz", jax.tree_util.tree_map(lambda x: x[0], pstate))

  # A NaN in one device's shard (shard_map), then an Inf in another's (pmap), then finite.
  nan_batch = mock_data.global_batch(100, devices, per_device, SAMPLES)
  nan_batch["mixture"][devices - 1, 0, 123] = np.nan
  before = jax.device_get(state)
  save_tree(out + "before_nan.npz", before)
  state, metrics = shard_step(state, step_lib.global_batch(mesh, nan_batch))
  save_tree(out + "after_nan.npz", state)
  result["nan_metrics"] = {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
  result["nan_rng_changed"] = not np.array_equal(before.rng, jax.device_get(state.rng))
  state, metrics = shard_step(state, step_lib.global_batch(
      mesh, mock_data.global_batch(101, devices, per_device, SAMPLES)))
  save_tree(out + "after_recovery.npz", state)
  result["recovery_metrics"] = {k: np.asarray(v).tolist()
                                for k, v in jax.device_get(metrics).items()}

  inf_batch = mock_data.global_batch(102, devices, per_device, SAMPLES)
  inf_batch["sources"][min(1, devices - 1), 0, 1, 7] = np.inf
  pbefore = jax.tree_util.tree_map(lambda x: x[0], jax.device_get(pstate))
  pstate, metrics = pmap_step(pstate, inf_batch)
  pafter = jax.tree_util.tree_map(lambda x: x[0], jax.device_get(pstate))
  save_tree(out + "pmap_before_inf.npz", pbefore)
  save_tree(out + "pmap_after_inf.npz", pafter)
  result["inf_metrics"] = {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
  return result


# --- mode: train ------------------------------------------------------------------------------
def train_config(run):
  from press_jax import optim
  from press_jax import train as train_lib

  values = dict(model="tiny", model_overrides=dict(MODEL), steps=STEPS, log_every=1,
                eval_every=0, checkpoint_every=3, keep_checkpoints=3,
                batch_size_per_device=GLOBAL_BATCH // jax.device_count())
  values.update(run.get("config", {}))
  values["optimizer"] = optim.OptimizerConfig(**dict(OPTIMIZER, **values.get("optimizer", {})))
  return train_lib.TrainConfig(**values)


def restore_check(run, config, result):
  """Restore the latest checkpoint onto this process's mesh and compare with a saved tree."""
  from press_jax import checkpointing, optim
  from press_jax import train_step as step_lib
  from press_jax.models import press_net

  mesh = step_lib.data_mesh()
  model = press_net.PressNet(config.model_config())
  optimizer = optim.make_optimizer(config.optimizer)
  template = jax.eval_shape(lambda: step_lib.create_train_state(model, optimizer, config.seed))
  manager = checkpointing.make_manager(run["workdir"], config.keep_checkpoints)
  state, iterator_state, meta = checkpointing.restore(manager, template, mesh=mesh)
  leaves = jax.tree_util.tree_leaves(state)
  result["restored_step"] = int(state.step)
  result["restored_iterator_state"] = iterator_state
  result["restored_meta_sample_rate"] = meta["sample_rate"]
  result["restored_replicated_on"] = sorted({len(x.sharding.device_set) for x in leaves})
  result["restored_fully_replicated"] = all(x.sharding.is_fully_replicated for x in leaves)
  save_tree(run["out"] + "restored.npz", state)


def run_train(spec):
  from press_jax import checkpointing
  from press_jax import train as train_lib

  joined = distributed.initialize_from_flags_or_environment(**spec.get("distributed", {}))
  process_index, process_count = jax.process_index(), jax.process_count()
  results = []
  for run in spec["runs"]:
    config = train_config(run)
    result = {"process_index": process_index, "process_count": process_count,
              "joined_distributed": joined, "local_devices": jax.local_device_count(),
              "global_devices": jax.device_count()}
    results.append(result)
    if run.get("restore_check"):
      restore_check(run, config, result)
    # From the directory listing: a CheckpointManager here would run a cross-process barrier
    # on one process and not the other (the directory may or may not exist yet), and mismatched
    # collectives deadlock or cross-talk.
    directory = checkpointing.checkpoint_directory(run["workdir"])
    steps = [int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else ())
             if n.isdigit()]
    manager_step = max(steps) if steps else None
    result["resumed_from"] = manager_step
    if run.get("progress_file"):  # For the SIGKILL test: where this (re)start begins.
      with open(run["progress_file"] + ".start", "w") as handle:
        json.dump({"resumed_from": manager_step}, handle)
    iterator = mock_data.MockIterator(
        jax.device_count(), config.batch_size_per_device, SAMPLES,
        process_index=process_index, process_count=process_count,
        nan_batches=run.get("nan_batches", ()), nan_device=run.get("nan_device", 0),
        progress_file=run.get("progress_file"))
    make_eval = None
    if config.eval_every:
      def make_eval():
        return mock_data.eval_iterator(jax.device_count(), config.batch_size_per_device,
                                       SAMPLES, process_index=process_index,
                                       process_count=process_count)
    started = time.perf_counter()
    try:
      trained = train_lib.train(config, run["workdir"], iterator, make_eval,
                                sample_rate=mock_data.SAMPLE_RATE)
    except train_lib.NonFiniteTrainingError as error:
      result["error"] = {"type": type(error).__name__, "message": str(error)}
      result["iterator_index"] = iterator.index
      continue
    result["seconds"] = time.perf_counter() - started
    result["history"] = trained.history
    result["final_step"] = int(trained.state.step)
    result["nonfinite_steps"] = int(trained.state.nonfinite_steps)
    result["iterator_index"] = iterator.index
    result["checkpoint_dirs"] = sorted(
        os.listdir(checkpointing.checkpoint_directory(run["workdir"])))
    if run.get("out"):
      save_tree(run["out"] + f"process{process_index}.npz", trained.state)
  return results


# --- mode: evaluate ---------------------------------------------------------------------------
def evaluation_split(size: int, global_devices: int, per_device_batch: int, samples: int,
                     seed: int = 777):
  """A split of `size` mock utterances in global batches; the last batch's slots beyond `size`
  are filler (example_mask 0) holding garbage with a full sample mask, which must not count.

  Yields the global batches (global_devices, per_device_batch, ...); utterance u depends only
  on (seed, u // global batch, u % global batch).
  """
  global_size = global_devices * per_device_batch
  for index in range(-(-size // global_size)):
    batch = mock_data.global_batch(index, global_devices, per_device_batch, samples, seed)
    slots = index * global_size + np.arange(global_size)
    example_mask = (slots < size).astype(np.float32).reshape(global_devices, per_device_batch)
    filler = example_mask == 0
    rng = np.random.default_rng([seed, index, 1])
    for name in ("mixture", "sources"):
      batch[name][filler] = rng.standard_normal(batch[name][filler].shape).astype(np.float32)
    batch["mask"][filler] = 1.0
    batch["example_mask"] = example_mask
    yield batch


def run_evaluate(spec):
  from press_jax import evaluation
  from press_jax.models import press_net

  joined = distributed.initialize_from_flags_or_environment(**spec.get("distributed", {}))
  process_index, process_count = jax.process_index(), jax.process_count()
  devices, local = jax.device_count(), jax.local_device_count()
  per_device = spec["global_batch"] // devices
  model = press_net.create("tiny", **MODEL)
  # Perturbed initial parameters (numpy noise: the same on every process), so exits differ.
  params = jax.device_get(press_net.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda p: (p + 0.2 * rng.standard_normal(p.shape)).astype(p.dtype), params)
  policy = evaluation.PolicySettings(**spec.get("policy", {}))
  evaluator = evaluation.Evaluator(model, params, policy=policy, with_sdr=True)
  result = {"process_index": process_index, "process_count": process_count,
            "joined_distributed": joined, "local_devices": local, "global_devices": devices,
            "summaries": {}}
  for size in spec["splits"]:
    started = time.perf_counter()
    local_rows = slice(process_index * local, (process_index + 1) * local)
    batches = ({name: value[local_rows] for name, value in batch.items()}
               for batch in evaluation_split(size, devices, per_device, SAMPLES))
    summary = evaluator.run(batches)
    per_utterance = evaluator.per_utterance()
    statistics = evaluator.block_statistics()
    result["summaries"][str(size)] = summary
    result[f"seconds_{size}"] = time.perf_counter() - started
    np.savez(spec["out"] + f"{size}_process{process_index}.npz",
             **{"utterance." + k: v for k, v in per_utterance.items()},
             **{"block." + k: v for k, v in statistics.items()})
  return result


def main():
  if os.environ.get("PRESS_JAX_TEST_XLA_CACHE"):  # Shared by the workers of a test session.
    jax.config.update("jax_compilation_cache_dir", os.environ["PRESS_JAX_TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  faulthandler.register(signal.SIGUSR1)  # A test that times out asks for the stacks first.
  mode, spec_path = sys.argv[1], sys.argv[2]
  with open(spec_path) as handle:
    spec = json.load(handle)
  started = time.perf_counter()
  try:
    result = {"steps": run_steps, "train": run_train, "evaluate": run_evaluate}[mode](spec)
  except Exception:
    traceback.print_exc()
    sys.exit(1)
  result_path = spec["result"]
  if jax.process_count() > 1:
    result_path = result_path.replace(".json", f".process{jax.process_index()}.json")
  with open(result_path, "w") as handle:
    json.dump({"result": result, "seconds": time.perf_counter() - started}, handle)


if __name__ == "__main__":
  main()
