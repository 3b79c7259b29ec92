"""A sweep job on 2 tasks as SLURM starts them: local processes with SLURM's variables only.

The SLURM-variable launch itself (JAX's SLURM detection joining the processes, lock-step
training, one complete checkpoint, resume) is tested on the 2-process training run of
tests/test_multihost.py; this file runs what each task of a SLURM sweep job runs, end to end
(slow-marked: `make test-all`).
"""

import json
import os
import subprocess
import sys

import pytest

from tests import worker_util


@pytest.mark.slow
def test_sweep_job_on_two_slurm_tasks(tmp_path):
  """What each task of a 2-task SLURM sweep job runs (experiments.sweep.RunJob), end to end."""
  from tests import test_sweep

  workdir = str(tmp_path / "run")
  overrides = tuple(test_sweep.reduced_sets(tmp_path / "data"))
  code = ("from experiments import sweep; "
          f"sweep.RunJob()('tiny', {overrides!r}, {workdir!r}, True)")
  job_id = worker_util.slurm_job_id_with_free_port()
  processes, logs = [], []
  for process_id in range(2):
    logs.append(str(tmp_path / f"task{process_id}.log"))
    env = worker_util.worker_env(devices=1)
    env.update(worker_util.slurm_environment(job_id, process_id, 2))
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
