"""press_jax.train.train end to end, in the style of the Flax examples' mock-data tests.

One subprocess with 2 simulated CPU devices runs, in order (tests/train_worker.py, mode train):
  A  10 steps of train_worker.MODEL (the tiny preset, smaller) into workdir `main`: eval every
     4 steps on a mock eval iterator, a checkpoint every 3 (keep 2), a NaN in device 1's shard
     of batches 1 and 3;
  B  the same workdir with steps=12: resumes from A's last checkpoint;
  C  a fresh workdir whose batches 2 and 3 are NaN, with max_consecutive_nonfinite=2;
  D  run A again in a fresh workdir with log_every=5 and asynchronous checkpoint writes
     (wait_for_checkpoints=False): its rows must average A's per-step rows, its end state and
     checkpoints match A's.
The tests then look at what the runs left behind and returned.
"""

import glob
import json
import math
import os
import struct

import jax
import numpy as np
import pytest

from press_jax import checkpointing, evaluation, optim
from press_jax import train as train_lib
from press_jax.models import press_net
from tests import mock_data, train_worker, worker_util

STEPS = train_worker.STEPS
LOOP = {"eval_every": 4, "checkpoint_every": 3, "keep_checkpoints": 2,
        "max_consecutive_nonfinite": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  directory = tmp_path_factory.mktemp("loop")
  main, diverging, averaged = directory / "main", directory / "diverging", directory / "averaged"
  spec = {"runs": [
      {"workdir": str(main), "out": str(directory / "A_"), "nan_batches": [1, 3],
       "nan_device": 1, "config": LOOP},
      {"workdir": str(main), "out": str(directory / "B_"), "config": dict(LOOP, steps=12)},
      {"workdir": str(diverging), "nan_batches": [2, 3], "config": LOOP},
      {"workdir": str(averaged), "out": str(directory / "D_"), "nan_batches": [1, 3],
       "nan_device": 1, "config": dict(LOOP, log_every=5, wait_for_checkpoints=False)},
  ]}
  result = worker_util.run_worker("train", spec, str(directory), devices=2, name="loop")
  a, b, c, d = result["result"]
  return {"main": main, "diverging": diverging, "averaged": averaged,
          "A": a, "B": b, "C": c, "D": d,
          "D_state": worker_util.load_tree(str(directory / "D_process0.npz")),
          "A_state": worker_util.load_tree(str(directory / "A_process0.npz")),
          "B_state": worker_util.load_tree(str(directory / "B_process0.npz"))}


def loss_rows(history):
  return [row for row in history if "loss" in row]


def test_runs_on_two_devices(runs):
  assert runs["A"]["global_devices"] == 2 and runs["A"]["local_devices"] == 2
  assert runs["A"]["resumed_from"] is None
  assert runs["A"]["final_step"] == STEPS and runs["A"]["iterator_index"] == STEPS
  assert [row["step"] for row in loss_rows(runs["A"]["history"])] == list(range(1, STEPS + 1))
  assert all(row["steps_per_s"] > 0 for row in loss_rows(runs["A"]["history"]))


def test_checkpoints_keep_the_newest_n(runs):
  # A saves at 3, 6, 9 and 10 (the end); B at 12 (= its end). keep_checkpoints=2.
  assert runs["A"]["checkpoint_dirs"] == ["10", "9"]
  assert runs["B"]["checkpoint_dirs"] == ["10", "12"]
  meta = checkpointing.read_meta(str(runs["main"]))
  assert meta["sample_rate"] == mock_data.SAMPLE_RATE
  assert meta["train"]["steps"] == 12 and meta["train"]["eval_every"] == 4


def test_nan_batches_are_skipped_and_counted(runs):
  rows = {row["step"]: row for row in loss_rows(runs["A"]["history"])}
  assert math.isnan(rows[2]["loss"]) and math.isnan(rows[4]["loss"])  # Batches 1 and 3.
  assert [rows[s]["nonfinite_steps"] for s in range(1, STEPS + 1)] == [0] + [1] * 2 + [2] * 7
  assert all(np.isfinite(rows[s]["loss"]) for s in rows if s not in (2, 4))
  assert runs["A"]["nonfinite_steps"] == 2
  assert all(np.all(np.isfinite(v)) for v in runs["A_state"].values() if v.dtype.kind == "f")
  # The logged learning rate is the one each step's update used: updates skip the NaN steps.
  schedule = optim.learning_rate_schedule(optim.OptimizerConfig(**train_worker.OPTIMIZER))
  for step, row in rows.items():
    update = max(step - 1 - sum(1 for s in (2, 4) if s <= step), 0)
    assert row["learning_rate"] == pytest.approx(float(schedule(update)), abs=1e-12), step


def test_log_rows_average_the_finite_steps_since_the_previous_row(runs):
  per_step = {row["step"]: row for row in loss_rows(runs["A"]["history"])}
  rows = loss_rows(runs["D"]["history"])
  assert [row["step"] for row in rows] == [5, 10]
  for row, window in zip(rows, ([1, 3, 5], [6, 7, 8, 9, 10])):  # Steps 2 and 4 were NaN.
    for key in ("loss", "grad_norm"):
      assert row[key] == pytest.approx(np.mean([per_step[s][key] for s in window]), rel=1e-5)
    for key in ("per_exit_loss", "per_exit_si_snr"):
      np.testing.assert_allclose(
          row[key], np.mean([per_step[s][key] for s in window], axis=0), rtol=1e-5, atol=1e-6)
    assert row["nonfinite_steps"] == per_step[row["step"]]["nonfinite_steps"]


def test_asynchronous_checkpoint_writes_end_in_the_same_state(runs):
  worker_util.assert_trees_equal(runs["D_state"], runs["A_state"], "async vs waiting saves")
  steps = sorted(int(n) for n in os.listdir(checkpointing.checkpoint_directory(
      str(runs["averaged"]))))
  assert steps == [9, 10]  # Every 3 steps and the last, keep 2: all committed at exit.
  _, params = checkpointing.load_params(str(runs["averaged"]))
  saved = {".params" + k: v for k, v in worker_util.flatten_tree(params).items()}
  worker_util.assert_trees_equal(
      saved, {k: v for k, v in runs["D_state"].items() if k.startswith(".params")},
      "async checkpoint vs final")


def test_consecutive_nan_batches_raise(runs):
  error = runs["C"]["error"]
  assert error["type"] == "NonFiniteTrainingError"
  message = error["message"]
  assert "2 consecutive steps up to step 4" in message, message
  assert "non-finite loss or gradient" in message and "max_consecutive_nonfinite=2" in message
  assert runs["C"]["iterator_index"] <= 6  # It stopped right away, not at the end.


def test_evaluations_and_history_file(runs):
  with open(os.path.join(runs["main"], "train_history.json")) as handle:
    saved = json.load(handle)
  # The file covers the whole run across the resume: A's rows, then B's.
  assert [row["step"] for row in loss_rows(saved)] == list(range(1, 13))
  assert [row["step"] for row in saved if "eval" in row] == [4, 8, 12]
  assert json.dumps(saved) == json.dumps(runs["A"]["history"] + runs["B"]["history"])
  for row in saved:
    if "eval" in row:
      evaluation = row["eval"]
      assert evaluation["utterances"] == 2 * 4  # 2 batches x 2 devices x 2 per device.
      assert len(evaluation["si_snr_improvement"]) == 2  # One value per exit (tiny: 2).
      assert all(np.isfinite(evaluation["si_snr"]))


def test_second_call_resumes_from_the_checkpoint(runs):
  b = runs["B"]
  assert b["resumed_from"] == STEPS
  assert [row["step"] for row in loss_rows(b["history"])] == [11, 12]
  assert b["final_step"] == 12 and b["iterator_index"] == 12
  assert b["nonfinite_steps"] == 2  # The skip counter came back from the checkpoint.
  changed = [k for k in runs["B_state"] if k.startswith(".params")
             and not np.array_equal(runs["B_state"][k], runs["A_state"][k])]
  assert changed  # The rate is not 0 yet: updates 8 and 9 of 10 (two batches were skipped).


def read_scalars(directory):
  """{tag: {step: value}} from tensorboardX event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    with open(path, "rb") as handle:
      data = handle.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_events(runs):
  directory = os.path.join(runs["main"], "tensorboard")
  assert len(glob.glob(os.path.join(directory, "events.out.tfevents.*"))) == 2  # A, B
  scalars = read_scalars(directory)
  assert sorted(scalars["train/loss"]) == list(range(1, 13))
  for tag in ("train/per_exit_si_snr/exit1", "train/per_exit_si_snr/exit2",
              "train/learning_rate", "train/grad_norm", "train/nonfinite_steps"):
    assert tag in scalars, sorted(scalars)
  assert sorted(scalars["eval/si_snr_improvement/exit2"]) == [4, 8, 12]
  assert scalars["train/loss"][5] == pytest.approx(
      loss_rows(runs["A"]["history"])[4]["loss"], rel=1e-6)


def test_load_model_from_workdir_evaluates(runs):
  model, params = checkpointing.load_model(str(runs["main"]))
  assert model.config == press_net.create("tiny", **train_worker.MODEL).config
  saved = {".params" + k: v for k, v in worker_util.flatten_tree(params).items()}
  worker_util.assert_trees_equal(
      saved, {k: v for k, v in runs["B_state"].items() if k.startswith(".params")},
      "load_model vs the final state")
  batch = mock_data.global_batch(0, 1, 2, train_worker.SAMPLES, seed=7)
  # The trainer's validation: the one evaluator on the exits only.
  result = train_lib.validate(
      evaluation.Evaluator(model, policy=None, with_calibration=False), params, lambda: [batch])
  assert result["utterances"] == 2
  assert np.all(np.isfinite(result["si_snr_improvement"]))


def test_model_dir_load_of_a_training_workdir(runs):
  from press_jax import model_dir

  loaded = model_dir.load(str(runs["main"]))
  assert loaded.kind == "checkpoint" and loaded.calibration is None
  model, params = loaded.model, loaded.params
  assert model.config == press_net.create("tiny", **train_worker.MODEL).config
  # The model itself reads parameter files only, never run directories.
  with pytest.raises(FileNotFoundError, match="press_jax.model_dir.load"):
    press_net.load(str(runs["main"]))
  _, expected = checkpointing.load_model(str(runs["main"]))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)
