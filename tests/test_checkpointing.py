"""Checkpoints of press_jax.train: exact resume after SIGKILL, restore onto fewer devices.

Training runs in subprocesses with simulated CPU devices (tests/train_worker.py, mode `train`):
train_worker.MODEL (the tiny preset, smaller), 4 utterances of 2000 samples per step, 10 steps,
a checkpoint every 3 steps.
XLA on CPU is deterministic, so a resumed run must end bit for bit where an uninterrupted one
does.
"""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest

from press_jax import checkpointing
from tests import train_worker, worker_util

STEPS = train_worker.STEPS
EVERY = 3  # checkpoint_every (train_worker's default).


def run_spec(workdir, out=None, progress_file=None, **extra):
  run = {"workdir": str(workdir), "config": {"checkpoint_every": EVERY}}
  if out:
    run["out"] = str(out)
  if progress_file:
    run["progress_file"] = str(progress_file)
  run.update(extra)
  return {"runs": [run]}


def committed_steps(workdir):
  """Finished checkpoints on disk (orbax renames a step's temporary directory when done)."""
  directory = checkpointing.checkpoint_directory(str(workdir))
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A 10-step run on 4 devices, never interrupted: the reference."""
  directory = tmp_path_factory.mktemp("uninterrupted")
  workdir = directory / "run"
  result = worker_util.run_worker("train", run_spec(workdir, out=directory / "final_"),
                                  str(directory), devices=4, name="uninterrupted")
  return workdir, result["result"][0], worker_util.load_tree(
      str(directory / "final_process0.npz"))


def read_int(path):
  try:
    with open(path) as handle:
      return int(handle.read().strip() or 0)
  except (FileNotFoundError, ValueError):
    return 0


def run_with_kills(directory, kill_points, log):
  """Start the run, SIGKILL it once progress reaches each kill point, restart; then finish."""
  workdir = directory / "run"
  records = []
  for attempt, kill_at in enumerate(kill_points):
    progress = directory / f"progress{attempt}"
    spec = run_spec(workdir, progress_file=progress)
    spec["result"] = str(directory / f"attempt{attempt}_result.json")
    log_path = str(directory / f"attempt{attempt}.log")
    process = worker_util.start_worker("train", spec, str(directory / f"spec{attempt}.json"),
                                       devices=4, log_path=log_path)
    deadline = time.monotonic() + 240
    while read_int(progress) < kill_at:
      if process.poll() is not None:
        raise AssertionError(f"attempt {attempt} ended before the kill at step {kill_at}:\n"
                             f"{worker_util.tail(log_path)}")
      if time.monotonic() > deadline:
        process.kill()
        raise AssertionError(f"attempt {attempt} never reached step {kill_at}")
      time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    served = read_int(progress)  # Batches taken from the iterator before the process died.
    with open(str(progress) + ".start") as handle:
      started_from = json.load(handle)["resumed_from"]
    steps, leftovers = committed_steps(workdir)
    records.append({"kill_at": kill_at, "started_from": started_from, "served": served,
                    "killed_step": served - 1,  # Steps dispatched before the kill.
                    "committed": steps, "leftovers": leftovers})
    log(f"attempt {attempt}: {records[-1]}")
  final = worker_util.run_worker("train", run_spec(workdir, out=directory / "final_"),
                                 str(directory), devices=4, name="final")["result"][0]
  return records, final, worker_util.load_tree(str(directory / "final_process0.npz"))


def check_resume(records, final, final_state, reference, workdir):
  """Every restart began at the newest checkpoint due, and less than one interval was lost.

  Training waits for each save to commit (TrainConfig.wait_for_checkpoints, the default), and
  takes the next batch only after that: once batch s + 1 has been served, the checkpoint of
  every step m <= s that is a multiple of k is on disk. So a kill after `served` batches resumes
  from the newest multiple of k at or below served - 1 (or a newer save), losing at most k - 1
  dispatched steps.
  """
  resumed = [r["started_from"] for r in records[1:]] + [final["resumed_from"]]
  for record, resumed_from in zip(records, resumed):
    newest = record["committed"][-1] if record["committed"] else None
    assert resumed_from == newest, (record, resumed_from)
    due = record["killed_step"] // EVERY * EVERY  # Newest save that had to have finished.
    assert (resumed_from or 0) >= due, (record, resumed_from)  # (The final save may be newer.)
    assert record["killed_step"] - (resumed_from or 0) <= EVERY - 1, record
  assert committed_steps(workdir) == ([6, 9, 10], [])  # Leftover temporaries were replaced.
  history_steps = [row["step"] for row in final["history"] if "loss" in row]
  assert history_steps == list(range((final["resumed_from"] or 0) + 1, STEPS + 1))
  assert final["final_step"] == STEPS and final["iterator_index"] == STEPS
  # ... and ended exactly where the uninterrupted run did: params, Adam moments, step, RNG.
  reference_result, reference_state = reference
  worker_util.assert_trees_equal(final_state, reference_state, "resumed vs uninterrupted")
  # train_history.json covers the whole run once, pieced together across the restarts.
  with open(os.path.join(workdir, "train_history.json")) as handle:
    rows = [row for row in json.load(handle) if "loss" in row]
  assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
  assert [row["loss"] for row in rows] == [
      row["loss"] for row in reference_result["history"] if "loss" in row]


def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path):
  _, reference_result, reference_state = uninterrupted
  seed = int(os.environ.get("PRESS_JAX_TEST_SEED", random.randrange(10 ** 6)))
  kill_at = random.Random(seed).randint(2, STEPS - 1)
  records, final, final_state = run_with_kills(tmp_path, [kill_at], print)
  print(f"seed {seed}: {records}, resumed from {final['resumed_from']}")
  check_resume(records, final, final_state, (reference_result, reference_state),
               tmp_path / "run")


@pytest.mark.slow
def test_resume_after_repeated_sigkills_is_exact(uninterrupted, tmp_path):
  _, reference_result, reference_state = uninterrupted
  seed = int(os.environ.get("PRESS_JAX_TEST_SEED", random.randrange(10 ** 6)))
  kill_points = sorted(random.Random(seed).sample(range(2, STEPS), 3))
  records, final, final_state = run_with_kills(tmp_path, kill_points, print)
  print(f"seed {seed}: {records}, resumed from {final['resumed_from']}")
  check_resume(records, final, final_state, (reference_result, reference_state),
               tmp_path / "run")


def test_uninterrupted_run_checkpoints(uninterrupted):
  workdir, result, state = uninterrupted
  steps, leftovers = committed_steps(workdir)
  assert steps == [6, 9, 10] and not leftovers  # Every 3 steps plus the last; keep 3.
  assert result["final_step"] == STEPS and int(state[".step"]) == STEPS
  # The newest checkpoint holds the final state.
  _, params = checkpointing.load_params(str(workdir))
  saved = {".params" + k: v for k, v in worker_util.flatten_tree(params).items()}
  worker_util.assert_trees_equal(saved, {k: v for k, v in state.items()
                                         if k.startswith(".params")}, "checkpoint vs final")
  meta = checkpointing.read_meta(str(workdir))
  assert meta["sample_rate"] == 8000 and meta["train"]["steps"] == STEPS
  assert meta["model"]["width"] == train_worker.MODEL["width"] == 16


@pytest.mark.parametrize("devices", [2, 1])
def test_restore_onto_fewer_devices(uninterrupted, tmp_path, devices):
  """A 4-device checkpoint (step 6) restores replicated onto 2 and 1 devices and trains on."""
  source, _, reference_state = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step in (9, 10):  # Make step 6 the newest checkpoint.
    shutil.rmtree(os.path.join(checkpointing.checkpoint_directory(str(workdir)), str(step)))
  _, saved_params = checkpointing.load_params(str(workdir))  # Plain restore, no mesh.
  saved_params = {".params" + k: v for k, v in worker_util.flatten_tree(saved_params).items()}

  result = worker_util.run_worker(
      "train", run_spec(workdir, out=tmp_path / "final_", restore_check=True),
      str(tmp_path), devices=devices,
      name=f"restore{devices}")["result"][0]
  assert result["global_devices"] == devices
  assert result["restored_step"] == 6 and result["resumed_from"] == 6
  assert result["restored_iterator_state"] == {"index": 6, "seed": 0, "process_index": 0}
  assert result["restored_replicated_on"] == [devices] and result["restored_fully_replicated"]
  restored = worker_util.load_tree(str(tmp_path / "final_restored.npz"))
  worker_util.assert_trees_equal({k: v for k, v in restored.items() if k.startswith(".params")},
                                 saved_params, "restored on fewer devices vs saved")

  # Training continued from step 6 on the same global batches, split 2 x 2 or 1 x 4 instead of
  # 4 x 1: it ends near the 4-device run (only the order of the gradient sums differs).
  assert result["final_step"] == STEPS and result["iterator_index"] == STEPS
  assert [row["step"] for row in result["history"] if "loss" in row] == list(range(7, 11))
  final = worker_util.load_tree(str(tmp_path / "final_process0.npz"))
  params = {k: v for k, v in final.items() if k.startswith(".params")}
  reference = {k: v for k, v in reference_state.items() if k.startswith(".params")}
  assert all(np.all(np.isfinite(v)) for v in params.values())
  changed = [k for k in params if not np.array_equal(params[k], restored[k])]
  assert changed, "no parameter changed after the restore"
  difference = worker_util.max_abs_difference(params, reference)
  assert difference < 1e-5, difference


def test_iterator_state_encoding_round_trips():
  for state in [None, {"index": 3, "nested": [1, 2]}, b"\x00\xffgrain-state", 7]:
    encoded = checkpointing.encode_iterator_state(state)
    json.dumps(encoded)  # Must be JSON.
    assert checkpointing.decode_iterator_state(encoded) == state


def test_no_checkpoint(tmp_path):
  assert not checkpointing.has_checkpoint(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointing.read_meta(str(tmp_path))


def test_iterator_state_of_this_process_is_picked():
  data = {"iterators": [{"index": 3}], "process_count": 1}
  assert checkpointing.iterator_state_of_process(data) == {"index": 3}
  assert checkpointing.gather_from_processes({"index": 3}) == [{"index": 3}]


def test_single_iterator_state_of_earlier_checkpoints_is_read():
  assert checkpointing.iterator_state_of_process({"iterator": {"index": 4}}) == {"index": 4}


def test_iterator_states_of_another_process_count_are_not_restored(caplog):
  data = {"iterators": [{"index": 3, "process_index": 0}, {"index": 3, "process_index": 1}],
          "process_count": 2}
  with caplog.at_level("WARNING"):
    assert checkpointing.iterator_state_of_process(data, "run/checkpoints/7") is None
  assert "saved by 2 processes, this run has 1" in caplog.text
  assert "run/checkpoints/7" in caplog.text
