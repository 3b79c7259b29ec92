"""Multi-host data parallelism on one machine: 2 processes x 2 CPU devices via jax.distributed.

The processes are launched as SLURM starts them: `srun` gives every task of a job step
SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, and nothing
else is passed (tests/train_worker.py, mode train, without a 'distributed' entry), so
press_jax.distributed calls jax.distributed.initialize() with no arguments and JAX's SLURM
detection (jax/_src/clusters/slurm_cluster.py) takes the coordinator from the first node of
SLURM_STEP_NODELIST on port SLURM_JOB_ID % 4096 + 61440, the process count from SLURM_NTASKS
and the process id from SLURM_PROCID (the node list is `localhost`, the job id chosen so that
the port is free). If that detection did not happen, each process would train alone on its 2
devices and every check below fails. (Explicit coordinator arguments are the launch of
tests/test_multihost_evaluation.py; both launches used to train in a test of their own.)

Each process runs press_jax.train.train on its own half of every global batch (its 2 devices'
rows), with gloo collectives between the processes, and checkpoints into the shared work
directory. The two processes must stay in lock-step and agree with one process on 4 devices
fed the same global batches.
"""

import json
import os

import numpy as np
import pytest

from press_jax import checkpointing, distributed
from tests import train_worker, worker_util

STEPS = train_worker.STEPS


def params_of(tree):
  return {k: v for k, v in tree.items() if k.startswith(".params")}


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
  directory = tmp_path_factory.mktemp("multihost")
  workdir = directory / "run"
  job_id = worker_util.slurm_job_id_with_free_port()
  processes, logs = [], []
  for process_id in range(2):
    # Multi-process saves are slow: a checkpoint every 5 steps. The second run resumes the
    # first at step 10 for 2 more steps: each process must get its own iterator state back.
    spec = {"runs": [{"workdir": str(workdir), "out": str(directory / "final_"),
                      "config": {"checkpoint_every": 5}},
                     {"workdir": str(workdir), "config": {"checkpoint_every": 5,
                                                          "steps": STEPS + 2}}],
            "result": str(directory / "result.json")}
    logs.append(str(directory / f"process{process_id}.log"))
    processes.append(worker_util.start_worker(
        "train", spec, str(directory / f"spec{process_id}.json"), devices=2,
        log_path=logs[-1], extra_env=worker_util.slurm_environment(job_id, process_id, 2)))
  worker_util.wait_for_workers(processes, logs, timeout=400, what="multi-host workers")
  results, resumed = [], []
  for process_id in range(2):
    with open(directory / f"result.process{process_id}.json") as handle:
      first, second = json.load(handle)["result"]
    results.append(first)
    resumed.append(second)
  states = [worker_util.load_tree(str(directory / f"final_process{i}.npz")) for i in range(2)]

  # The reference: one process, 4 devices, the same global batches.
  single_dir = directory / "single"
  single = worker_util.run_worker(
      "train", {"runs": [{"workdir": str(single_dir / "run"), "out": str(single_dir) + "/"}]},
      str(directory), devices=4, name="single")["result"][0]
  single_state = worker_util.load_tree(str(single_dir / "process0.npz"))
  return {"workdir": workdir, "results": results, "resumed": resumed, "states": states,
          "single": single, "single_state": single_state}


def test_slurm_variables_alone_join_the_processes_in_one_mesh(multihost):
  for process_id, result in enumerate(multihost["results"]):
    assert result["joined_distributed"] and result["process_index"] == process_id
    assert result["process_count"] == 2
    assert result["local_devices"] == 2 and result["global_devices"] == 4
    assert result["final_step"] == STEPS and result["iterator_index"] == STEPS


def test_processes_stay_in_lock_step(multihost):
  first, second = multihost["results"]
  assert [r["step"] for r in first["history"]] == list(range(1, STEPS + 1))
  assert json.dumps([r["loss"] for r in first["history"]]) == json.dumps(
      [r["loss"] for r in second["history"]])
  worker_util.assert_trees_equal(multihost["states"][0], multihost["states"][1],
                                 "process 0 vs process 1")


def test_two_hosts_match_one_host_with_four_devices(multihost):
  single, state = multihost["single"], multihost["single_state"]
  np.testing.assert_allclose([r["loss"] for r in multihost["results"][0]["history"]],
                             [r["loss"] for r in single["history"]], rtol=1e-5)
  difference = worker_util.max_abs_difference(params_of(multihost["states"][0]),
                                              params_of(state))
  assert difference < 1e-5, difference
  assert int(multihost["states"][0][".step"]) == int(state[".step"]) == STEPS


def test_multihost_checkpoint_is_complete(multihost):
  workdir = str(multihost["workdir"])
  names = sorted(os.listdir(checkpointing.checkpoint_directory(workdir)), key=int)
  assert names == ["5", "10", str(STEPS + 2)]
  _, params = checkpointing.load_params(workdir, step=STEPS)
  saved = {".params" + k: v for k, v in worker_util.flatten_tree(params).items()}
  worker_util.assert_trees_equal(saved, params_of(multihost["states"][0]), "checkpoint")
  with open(os.path.join(workdir, "train_history.json")) as handle:  # Lead host only.
    assert [row["step"] for row in json.load(handle)] == list(range(1, STEPS + 3))


def test_multihost_checkpoint_holds_every_hosts_iterator_state(multihost):
  manager = checkpointing.make_manager(str(multihost["workdir"]))
  data = manager.restore(STEPS, args=checkpointing.ocp.args.Composite(
      data=checkpointing.ocp.args.JsonRestore()))["data"]
  manager.close()
  assert data["process_count"] == 2
  assert data["iterators"] == [{"index": STEPS, "seed": 0, "process_index": 0},
                               {"index": STEPS, "seed": 0, "process_index": 1}]


def test_multihost_resume_gives_each_host_its_own_iterator_state(multihost):
  # MockIterator.set_state raises if handed another process's state.
  for process_id, result in enumerate(multihost["resumed"]):
    assert "error" not in result, result
    assert result["resumed_from"] == STEPS
    assert result["final_step"] == STEPS + 2 and result["iterator_index"] == STEPS + 2
  first, second = multihost["resumed"]
  assert [r["loss"] for r in first["history"]] == [r["loss"] for r in second["history"]]


# --- press_jax.distributed: flags and environment ---------------------------------------------
@pytest.fixture
def calls(monkeypatch):
  recorded = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *args, **kwargs: recorded.append((args, kwargs)))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "PRESS_AUTO_DISTRIBUTED") + distributed.SLURM_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return recorded


def set_slurm(monkeypatch, tasks, **changes):
  values = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]",
            "SLURM_NTASKS": str(tasks), "SLURM_PROCID": "1", "SLURM_LOCALID": "1", **changes}
  for name, value in values.items():
    if value is None:
      monkeypatch.delenv(name, raising=False)
    else:
      monkeypatch.setenv(name, value)


def test_single_process_does_nothing(calls):
  assert distributed.initialize_from_flags_or_environment() is False
  assert distributed.initialize_from_flags_or_environment(num_processes=1) is False
  assert calls == []


def test_explicit_arguments(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "elsewhere:1")
  assert distributed.initialize_from_flags_or_environment("host:1234", 2, 1) is True
  assert calls == [((), {"coordinator_address": "host:1234", "num_processes": 2,
                         "process_id": 1})]


def test_environment_variables(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:8476")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.initialize_from_flags_or_environment() is True
  assert calls == [((), {"coordinator_address": "10.0.0.1:8476", "num_processes": 4,
                         "process_id": 3})]


@pytest.mark.parametrize("arguments,match", [
    (dict(coordinator_address="h:1", num_processes=2), "process_id"),
    (dict(num_processes=2, process_id=0), "coordinator"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "outside"),
])
def test_incomplete_settings_are_rejected(calls, arguments, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize_from_flags_or_environment(**arguments)
  assert calls == []


def test_slurm_step_of_several_tasks_initialises_without_arguments(calls, monkeypatch):
  set_slurm(monkeypatch, tasks=8)
  assert distributed.slurm_process_count() == 8
  assert distributed.initialize_from_flags_or_environment() is True
  assert calls == [((), {})]  # JAX reads SLURM's variables itself.


@pytest.mark.parametrize("tasks, changes, environment", [
    (1, {}, {}),  # One task: a single process, nothing to join.
    (4, {"SLURM_STEP_NODELIST": None}, {}),  # Not inside a job step (no srun).
    (4, {}, {"PRESS_AUTO_DISTRIBUTED": "0"}),  # Detection turned off.
])
def test_slurm_detection_needs_a_step_of_several_tasks(calls, monkeypatch, tasks, changes,
                                                       environment):
  set_slurm(monkeypatch, tasks, **changes)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize_from_flags_or_environment() is False
  assert calls == []


def test_explicit_settings_win_over_slurm(calls, monkeypatch):
  set_slurm(monkeypatch, tasks=8)
  assert distributed.initialize_from_flags_or_environment("host:1", 2, 0) is True
  assert calls == [((), {"coordinator_address": "host:1", "num_processes": 2,
                         "process_id": 0})]
  assert distributed.initialize_from_flags_or_environment(num_processes=1) is False
