"""Multi-host launch as SLURM starts it: 2 local processes with SLURM's variables only.

`srun` gives every task of a job step SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
SLURM_PROCID and SLURM_LOCALID; press_jax.distributed then calls jax.distributed.initialize()
with no arguments, and JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) takes the
coordinator from the first node of SLURM_STEP_NODELIST on port SLURM_JOB_ID % 4096 + 61440, the
process count from SLURM_NTASKS and the process id from SLURM_PROCID. Here the node list is
`localhost` and the job id is chosen so that the derived port is free. No coordinator address,
process count or process id is passed to the workers (tests/train_worker.py, mode train, without
a 'distributed' entry): if the SLURM detection did not happen, each would train alone on its 2
devices and the checks below fail.
"""

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from press_jax import checkpointing
from tests import train_worker, worker_util

# train_worker's run length (its optimiser schedule; the step programs are then shared with
# tests/test_multihost.py through the compilation cache); one checkpoint, at the end.
STEPS = train_worker.STEPS
PORT_BASE = 65535 - 2**12 + 1  # JAX: port = job id % 4096 + PORT_BASE.


def slurm_job_id_with_free_port() -> int:
  for _ in range(100):
    job_id = random.randrange(10**5, 10**6)
    with socket.socket() as sock:
      try:
        sock.bind(("localhost", job_id % 2**12 + PORT_BASE))
      except OSError:
        continue
    return job_id
  raise RuntimeError("no free port in JAX's SLURM port range")


def slurm_environment(job_id: int, process_id: int, tasks: int) -> dict[str, str]:
  """What srun sets in task `process_id` of a one-node job step (the variables JAX reads)."""
  return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
          "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": str(tasks),
          "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id)}


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
  directory = tmp_path_factory.mktemp("slurm")
  workdir = directory / "run"
  job_id = slurm_job_id_with_free_port()
  spec = {"runs": [{"workdir": str(workdir), "out": str(directory / "final_"),
                    "config": {"steps": STEPS, "checkpoint_every": STEPS}}],
          "result": str(directory / "result.json")}
  processes, logs = [], []
  for process_id in range(2):
    logs.append(str(directory / f"task{process_id}.log"))
    processes.append(worker_util.start_worker(
        "train", spec, str(directory / f"spec{process_id}.json"), devices=2,
        log_path=logs[-1], extra_env=slurm_environment(job_id, process_id, 2)))
  worker_util.wait_for_workers(processes, logs, timeout=400, what="SLURM-launched workers")
  results = []
  for process_id in range(2):
    with open(directory / f"result.process{process_id}.json") as handle:
      results.append(json.load(handle)["result"][0])
  states = [worker_util.load_tree(str(directory / f"final_process{i}.npz")) for i in range(2)]
  return {"workdir": str(workdir), "results": results, "states": states, "job_id": job_id}


def test_slurm_variables_alone_join_the_processes(slurm_run):
  for process_id, result in enumerate(slurm_run["results"]):
    assert result["joined_distributed"], result
    assert result["process_index"] == process_id and result["process_count"] == 2
    assert result["local_devices"] == 2 and result["global_devices"] == 4
    assert result["final_step"] == STEPS


def test_slurm_processes_train_in_lock_step(slurm_run):
  first, second = slurm_run["results"]
  assert [r["step"] for r in first["history"]] == list(range(1, STEPS + 1))
  assert json.dumps([r["loss"] for r in first["history"]]) == json.dumps(
      [r["loss"] for r in second["history"]])
  worker_util.assert_trees_equal(slurm_run["states"][0], slurm_run["states"][1],
                                 "process 0 vs process 1")


def test_slurm_run_writes_one_complete_checkpoint(slurm_run):
  workdir = slurm_run["workdir"]
  assert os.listdir(checkpointing.checkpoint_directory(workdir)) == [str(STEPS)]
  _, params = checkpointing.load_params(workdir, step=STEPS)
  saved = {".params" + k: v for k, v in worker_util.flatten_tree(params).items()}
  final = {k: v for k, v in slurm_run["states"][0].items() if k.startswith(".params")}
  worker_util.assert_trees_equal(saved, final, "checkpoint vs process 0's final state")
  manager = checkpointing.make_manager(workdir)
  data = manager.restore(STEPS, args=checkpointing.ocp.args.Composite(
      data=checkpointing.ocp.args.JsonRestore()))["data"]
  manager.close()
  assert data["process_count"] == 2
  assert [state["process_index"] for state in data["iterators"]] == [0, 1]


@pytest.mark.slow
def test_sweep_job_on_two_slurm_tasks(tmp_path):
  """What each task of a 2-task SLURM sweep job runs (experiments.sweep.RunJob), end to end."""
  from tests import test_sweep

  workdir = str(tmp_path / "run")
  overrides = tuple(test_sweep.reduced_sets(tmp_path / "data"))
  code = ("from experiments import sweep; "
          f"sweep.RunJob()('tiny', {overrides!r}, {workdir!r}, True)")
  job_id = slurm_job_id_with_free_port()
  processes, logs = [], []
  for process_id in range(2):
    logs.append(str(tmp_path / f"task{process_id}.log"))
    env = worker_util.worker_env(devices=1)
    env.update(slurm_environment(job_id, process_id, 2))
    with open(logs[-1], "w") as log:
      processes.append(subprocess.Popen([sys.executable, "-c", code],
                                        cwd=worker_util.REPO_ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT))
  try:
    for process, log in zip(processes, logs):
      process.wait(timeout=900)
      assert process.returncode == 0, worker_util.tail(log)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process_id, log in enumerate(logs):
    assert f"process {process_id} of 2 (jax.distributed), 1 local of 2 devices" in (
        worker_util.tail(log, 10**6))
  with open(os.path.join(workdir, "results.json")) as handle:
    assert [row["exit"] for row in json.load(handle)] == [1, 2]
  with open(os.path.join(workdir, "evaluation.json")) as handle:
    assert json.load(handle)["utterances"] == 3  # The whole test split, not one host's share.
  assert "batch 2 x 2 devices" in worker_util.tail(logs[0], 10**6)
  assert os.path.isfile(os.path.join(workdir, "model", "params.msgpack"))
