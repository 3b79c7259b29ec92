"""Re-planned schedules: `anneal_to_time_limit` shortens the run so the rate still reaches 0.

The schedule is checked against a piecewise-linear numpy reference written from its definition;
the trainer's decision is made deterministic by replacing the projection of the steps that fit
(`train.replanned_steps`, which reads the wall clock) with fixed answers.
"""

import json
import os

import numpy as np
import pytest

from press_jax import optim
from press_jax import train as train_lib
from tests import mock_data
from tests.model_util import SMALL

SAMPLES = 2000
BATCH = 2


def reference_rate(count, peak, warmup, total, replans):
  """The learning rate at update `count`, from the definitions (numpy, float64)."""
  def base(c):
    if c < warmup:
      return peak * c / max(warmup, 1)
    return peak * max(total - c, 0) / max(total - warmup, 1)

  def upto(k, c):  # The schedule with the first k re-plans applied.
    if k == 0:
      return base(c)
    update, new_total = replans[k - 1]
    if c < update:
      return upto(k - 1, c)
    start = upto(k - 1, update)
    return start * min(max((new_total - c) / (new_total - update), 0.0), 1.0)

  return upto(len(replans), count)


@pytest.mark.parametrize("replans", [(), ((60, 80),), ((60, 80), (70, 75)), ((5, 9),),
                                     ((60, 80), (70, 100))])
def test_schedule_matches_the_piecewise_linear_reference(replans):
  config = optim.OptimizerConfig(peak_learning_rate=2e-3, warmup_steps=10, total_steps=110)
  schedule = optim.learning_rate_schedule(config, replans)
  for count in range(0, 120):
    np.testing.assert_allclose(float(schedule(count)),
                               reference_rate(count, 2e-3, 10, 110, replans), rtol=1e-6,
                               atol=1e-12, err_msg=f"update {count}")


@pytest.mark.parametrize("replans", [((0, 0),), ((50, 40),), ((60, 80), (50, 70)),
                                     ((60, 120),), ((60, 80), (70, 111))])
def test_bad_replans_are_refused(replans):
  config = optim.OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=10, total_steps=110)
  with pytest.raises(ValueError, match="re-plan"):
    optim.learning_rate_schedule(config, replans)


def test_replanned_steps_projects_with_a_margin():
  assert train_lib.replanned_steps(100, 10.0, 50.0) == 100 + int(10 * 50 * train_lib.REPLAN_MARGIN)
  assert train_lib.replanned_steps(100, 10.0, -5.0) == 100  # Out of time: stop here.


def make_config(**values):
  # The tiny preset made smaller (each re-plan recompiles the step; the model is not the point).
  base = dict(model="tiny", model_overrides=dict(SMALL), steps=12, log_every=2, eval_every=0,
              checkpoint_every=4, keep_checkpoints=2, batch_size_per_device=BATCH, time_limit_s=3600.0,
              anneal_to_time_limit=True,
              optimizer=optim.OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=2,
                                              total_steps=12))
  base.update(values)
  return train_lib.TrainConfig(**base)


def iterator():
  return mock_data.MockIterator(1, BATCH, SAMPLES)


@pytest.fixture(scope="module")
def replanned_run(tmp_path_factory):
  """12 planned steps; at the second log row (step 4) the projection says 8 fit."""
  workdir = str(tmp_path_factory.mktemp("anneal") / "run")
  patch = pytest.MonkeyPatch()
  calls = []

  def projection(step, rate, remaining_s):
    calls.append(step)
    return 8
  patch.setattr(train_lib, "replanned_steps", projection)
  try:
    result = train_lib.train(make_config(), workdir, iterator())
  finally:
    patch.undo()
  return workdir, result, calls


def test_the_run_ends_at_the_replanned_step_with_the_rate_at_zero(replanned_run):
  workdir, result, calls = replanned_run
  # The first row (step 2) holds the compilation: no decision from it. After the re-plan at
  # step 4 the row at 6 holds the recompilation (no decision either); the next is at step 8.
  assert sorted(set(calls)) == [4, 8]
  assert result.planned_steps == 8 and result.replans == ((4, 8),)
  assert not result.stopped_early
  rows = [row for row in result.history if "loss" in row]
  assert [row["step"] for row in rows] == [2, 4, 6, 8]
  # Each row's rate is the schedule's at the update its step went into (step - 1).
  for row in rows:
    np.testing.assert_allclose(
        row["learning_rate"], reference_rate(row["step"] - 1, 1e-3, 2, 12, ((4, 8),)),
        rtol=1e-6)
  assert reference_rate(8, 1e-3, 2, 12, ((4, 8),)) == 0.0
  [replan] = [row["replan"] for row in result.history if "replan" in row]
  assert replan == {"steps": 8, "update": 4, "total_updates": 8}
  with open(os.path.join(workdir, train_lib.SCHEDULE_FILE)) as handle:
    assert json.load(handle) == {"steps": 8, "replans": [[4, 8]]}
  assert train_lib.read_schedule(workdir) == {"steps": 8, "replans": ((4, 8),)}


def test_a_second_call_keeps_the_replanned_end(replanned_run):
  workdir, first, _ = replanned_run
  # Without the patch the projection reads the clock; with an hour left it shortens nothing.
  again = train_lib.train(make_config(), workdir, iterator())
  assert again.planned_steps == 8 and again.replans == ((4, 8),)
  assert [row for row in again.history if "loss" in row] == []  # Already at step 8.


def grow_config(steps=24):
  return make_config(steps=steps, optimizer=optim.OptimizerConfig(
      peak_learning_rate=1e-3, warmup_steps=2, total_steps=steps))


def test_a_shortened_plan_grows_back_once_when_more_fits(tmp_path, monkeypatch):
  """24 planned steps; at step 4 the projection says 16 fit (shortened); later 22 fit (the
  machine got faster). After the recompilation's row (6) the rate needs GROWTH_ROWS rows
  (8..14) before the plan may grow: it grows to 22 on row 14's decision, made once step 15 is
  dispatched (update 15), once, and the rate still ends at 0 there."""
  decisions = []

  def projection(step, rate, remaining_s):
    decisions.append(step)
    return 16 if step <= 4 else 22
  monkeypatch.setattr(train_lib, "replanned_steps", projection)
  monkeypatch.setattr(train_lib, "GROWTH_ROWS", 4)
  result = train_lib.train(grow_config(), str(tmp_path / "grow"), iterator())
  replans = ((4, 16), (15, 22))
  assert result.replans == replans and result.planned_steps == 22
  assert not result.stopped_early
  rows = [row for row in result.history if "loss" in row]
  assert rows[-1]["step"] == 22
  for row in rows:
    np.testing.assert_allclose(
        row["learning_rate"], reference_rate(row["step"] - 1, 1e-3, 2, 24, replans), rtol=1e-6)
  assert reference_rate(22, 1e-3, 2, 24, replans) == 0.0
  # Rows between the two re-plans decided but had too little rate to grow; after growing, later
  # rows still decide and change nothing.
  assert any(4 < d < 15 for d in decisions) and any(d > 15 for d in decisions)
  assert [row["replan"] for row in result.history if "replan" in row][-1] == {
      "steps": 22, "update": 15, "total_updates": 22}


def test_a_plan_never_grows_past_its_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "replanned_steps",
                      lambda step, rate, remaining: 16 if step <= 4 else 100)
  monkeypatch.setattr(train_lib, "GROWTH_ROWS", 4)
  result = train_lib.train(grow_config(), str(tmp_path / "capped"), iterator())
  assert result.replans == ((4, 16), (15, 24)) and result.planned_steps == 24


def test_without_the_option_the_plan_is_kept(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "replanned_steps", lambda *args: 3)
  result = train_lib.train(make_config(steps=6, anneal_to_time_limit=False,
                                       optimizer=optim.OptimizerConfig(
                                           peak_learning_rate=1e-3, warmup_steps=2,
                                           total_steps=6)),
                           str(tmp_path / "plain"), iterator())
  assert result.planned_steps == 6 and result.replans == ()
  assert not os.path.exists(tmp_path / "plain" / train_lib.SCHEDULE_FILE)


def test_a_corrupt_plan_file_is_named(tmp_path):
  (tmp_path / train_lib.SCHEDULE_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="schedule.json: not a schedule plan"):
    train_lib.read_schedule(str(tmp_path))
