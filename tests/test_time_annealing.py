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
from press_jax import train_step as step_lib
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


def test_a_plan_given_as_data_equals_the_plan_built_in():
  """The trainer passes the re-plans as a table (one compiled step for every plan): the
  updates equal an optimiser built with those re-plans, at every update count, and the state
  keeps optax.scale_by_learning_rate's layout (checkpoints of either restore into the other)."""
  import jax
  import jax.numpy as jnp
  import optax

  config = optim.OptimizerConfig(peak_learning_rate=2e-3, warmup_steps=10, total_steps=110,
                                 clip_norm=1e9, weight_decay=0.0)
  replans = ((60, 80), (70, 100))
  params = {"kernel": jnp.full((3,), 0.5), "bias": jnp.zeros((2,))}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  as_data, built_in = optim.make_optimizer(config), optim.make_optimizer(config, replans)
  table = jnp.asarray(optim.replan_table(config, replans))
  step_with_table = jax.jit(lambda state: as_data.update(grads, state, params,
                                                         learning_rate_plan=table))
  step_built_in = jax.jit(lambda state: built_in.update(grads, state, params))
  state_a, state_b = as_data.init(params), built_in.init(params)
  for count in range(105):
    (updates_a, state_a), (updates_b, state_b) = step_with_table(state_a), step_built_in(state_b)
    for a, b in zip(jax.tree_util.tree_leaves(updates_a), jax.tree_util.tree_leaves(updates_b)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"update {count}")
  reference = optax.chain(
      optax.flatten(optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())),
      optax.add_decayed_weights(0.01, mask=optim.decay_mask),
      optax.scale_by_learning_rate(optim.learning_rate_schedule(config, replans)))
  assert (jax.tree_util.tree_structure(as_data.init(params))
          == jax.tree_util.tree_structure(reference.init(params)))
  with pytest.raises(ValueError, match=f"at most {optim.MAX_REPLANS}"):
    optim.replan_table(optim.OptimizerConfig(warmup_steps=0, total_steps=10**6),
                       tuple((u, 10**6 - u) for u in range(1, optim.MAX_REPLANS + 2)))


def test_replanned_steps_projects_with_a_margin():
  assert train_lib.replanned_steps(100, 10.0, 50.0) == 100 + int(10 * 50 * train_lib.REPLAN_MARGIN)
  assert train_lib.replanned_steps(100, 10.0, -5.0) == 100  # Out of time: stop here.


def test_a_late_miss_is_measured_against_the_steps_left():
  """2 % of the steps still to run, not of the plan: late in a run the latter is more than what
  is left. The session-26 demo grew its plan to 8958 steps and stopped at its time limit at 8849:
  a projection that far short at step 8000 shortens the plan; one 1 % short does not, and early
  in the run a shortfall of 100 steps is within the tolerance."""
  assert train_lib.falls_short(8000, 8849, 8958)  # 849 of 958 left: 11 % short.
  assert not train_lib.falls_short(8000, 8949, 8958)  # 949 of 958: 0.9 % short.
  assert not train_lib.falls_short(1000, 8858, 8958)  # 7858 of 7958: 1.3 % short.
  assert train_lib.falls_short(1000, 8700, 8958)  # 7700 of 7958: 3.2 % short.
  assert not train_lib.falls_short(8958, 8958, 8958)  # At the end: nothing left to miss.


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
  # The first row (step 2) holds the compilation: no decision from it. The re-plan at step 4
  # compiles nothing, so the next rows decide again: row 6 (read once step 7 is dispatched, the
  # step the projection is given) and row 8, the last, keep the plan.
  assert sorted(set(calls)) == [4, 7, 8]
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


def assert_annealed_on_the_plan(result, total, replans):
  """Every logged rate follows the re-planned reference (peak 1e-3, warmup 2, `total` updates),
  the run reached its last plan, and the rate is 0 there."""
  rows = [row for row in result.history if "loss" in row]
  assert rows[-1]["step"] == result.planned_steps
  for row in rows:
    np.testing.assert_allclose(
        row["learning_rate"], reference_rate(row["step"] - 1, 1e-3, 2, total, replans), rtol=1e-6)
  assert reference_rate(result.planned_steps, 1e-3, 2, total, replans) == 0.0


def test_a_shortened_plan_grows_back_when_more_fits(tmp_path, monkeypatch):
  """24 planned steps; at step 4 the projection says 16 fit (shortened); later 22 fit (the
  machine got faster). The plan may grow only GROWTH_ROWS rows of rate after its last re-plan
  (the shrink on row 4, the first rate; rows 6..12): it grows to 22 on row 12's decision, made
  once step 13 is dispatched (update 12), and the rate still ends at 0 there. Both re-plans run
  on the one compiled step."""
  decisions, built = [], []

  def projection(step, rate, remaining_s):
    decisions.append(step)
    return 16 if step <= 4 else 22

  original = step_lib.parallel_train_step

  def parallel_train_step(*args, **kwargs):
    built.append(original(*args, **kwargs))
    return built[-1]
  monkeypatch.setattr(train_lib, "replanned_steps", projection)
  monkeypatch.setattr(train_lib, "GROWTH_ROWS", 4)
  monkeypatch.setattr(train_lib.step_lib, "parallel_train_step", parallel_train_step)
  result = train_lib.train(grow_config(), str(tmp_path / "grow"), iterator())
  replans = ((4, 16), (12, 22))
  assert result.replans == replans and result.planned_steps == 22
  assert not result.stopped_early
  # One step function, traced (and compiled) once: the re-plans changed its input only.
  assert len(built) == 1 and built[0]._cache_size() == 1
  assert_annealed_on_the_plan(result, 24, replans)
  # Rows between the two re-plans decided but had too few rows to grow; after growing, later
  # rows still decide and change nothing.
  assert any(4 < d < 12 for d in decisions) and any(d > 12 for d in decisions)
  assert [row["replan"] for row in result.history if "replan" in row][-1] == {
      "steps": 22, "update": 12, "total_updates": 22}


def test_a_plan_grows_again_as_the_machine_speeds_up_at_most_max_growths_times(
    tmp_path, monkeypatch):
  """The projection rises step by step (a machine that keeps speeding up, or a cache that
  fills): the plan grows each time it clearly can, GROWTH_ROWS (2) rows after its last re-plan,
  and no more than MAX_GROWTHS (2) times; the learning rate still ends at 0."""
  def projection(step, rate, remaining_s):
    return 16 if step <= 4 else min(16 + 2 * (step - 4), 60)

  monkeypatch.setattr(train_lib, "replanned_steps", projection)
  monkeypatch.setattr(train_lib, "GROWTH_ROWS", 2)
  monkeypatch.setattr(train_lib, "MAX_GROWTHS", 2)
  result = train_lib.train(grow_config(steps=40), str(tmp_path / "regrow"), iterator())
  # Rows every 2 steps, the first rate at row 4 (shrink to 16). Row 8 (2 rows later) projects 24
  # >= 16 * 1.05: grown at update 8; row 12 projects 32: grown at update 12; then no more.
  replans = ((4, 16), (8, 24), (12, 32))
  assert result.replans == replans and result.planned_steps == 32
  assert_annealed_on_the_plan(result, 40, replans)


def test_a_plan_never_grows_past_its_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "replanned_steps",
                      lambda step, rate, remaining: 16 if step <= 4 else 100)
  monkeypatch.setattr(train_lib, "GROWTH_ROWS", 4)
  result = train_lib.train(grow_config(), str(tmp_path / "capped"), iterator())
  assert result.replans == ((4, 16), (12, 24)) and result.planned_steps == 24


def test_a_small_late_miss_shortens_the_plan(tmp_path, monkeypatch):
  """60 planned steps; from step 50 on the projection is one step short (59): under 2 % of the
  plan, but 10 % of the 10 steps left. The plan is shortened to 59 there and the run ends on it,
  annealed; before step 50 (the same plan fitting) nothing changes."""
  monkeypatch.setattr(train_lib, "replanned_steps",
                      lambda step, rate, remaining: 60 if step < 50 else 59)
  result = train_lib.train(grow_config(steps=60), str(tmp_path / "late"), iterator())
  assert len(result.replans) == 1 and result.planned_steps == 59
  [(update, total)] = result.replans
  assert 50 <= update < 59 and total == 59
  assert not result.stopped_early
  assert_annealed_on_the_plan(result, 60, result.replans)


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
