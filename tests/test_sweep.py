"""Sweep runner: grid expansion, naming, plan/resume, refusal of a changed plan, summary."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ["train.seed=0,1"]
ABLATIONS = ["loss_gaussian", "loss_si_snr"]


class FakeRunner:
  """Stands in for `python -m experiments.main`: writes what a finished run writes."""

  def __init__(self, fail=(), interrupt=(), no_results=()):
    self.fail, self.interrupt, self.no_results = set(fail), set(interrupt), set(no_results)
    self.calls = []

  def __call__(self, spec, workdir, log_path):
    self.calls.append(spec.name)
    with open(log_path, "a") as log:
      log.write(f"training {spec.name}\n")
      if spec.name in self.fail:
        log.write("Traceback (most recent call last):\nRuntimeError: boom\n")
        return 3
    if spec.name in self.interrupt:
      raise KeyboardInterrupt
    with open(os.path.join(workdir, "experiment.json"), "w") as handle:
      json.dump(spec.experiment().to_dict(), handle, default=str)
    if spec.name in self.no_results:
      return 0
    seed = json.loads(dict(a.split("=", 1) for a in spec.overrides).get("train.seed", "0"))
    results = [{"exit": e, "si_snri_db": 2.0 * e + seed, "params": 1000 * e,
                "gmac_per_s": 0.25 * e} for e in (1, 2)]
    with open(os.path.join(workdir, "results.json"), "w") as handle:
      json.dump(results, handle)
    return 0


def statuses(root):
  with open(os.path.join(root, sweep.SWEEP_FILE)) as handle:
    return {run["name"]: run for run in json.load(handle)["runs"]}


# --- grid and names ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, values", [
    ("0,1", ["0", "1"]),
    ("[0,10],[20, 30]", ["[0,10]", "[20, 30]"]),
    ('"a,b",c', ['"a,b"', "c"]),
    ('{"exits": 4, "width": 8},null', ['{"exits": 4, "width": 8}', "null"]),
])
def test_split_values(text, values):
  assert sweep.split_values(text) == values


@pytest.mark.parametrize("text", ["train.seed", "=1,2", "train.seed=1,,2", "train.seed=[1,2",
                                  "train.seed=1,1"])
def test_parse_grid_rejects(text):
  with pytest.raises(ValueError, match="grid|unbalanced"):
    sweep.parse_grid(text)


def test_expand_product_and_names():
  specs = sweep.expand("tiny", ABLATIONS, ["train.seed=0,1", "data.crop_seconds=0.5,1.0"],
                       sets=["train.log_every=5"])
  assert [s.name for s in specs] == [
      f"tiny__{a}__train.seed={seed}__data.crop_seconds={crop}"
      for a in ABLATIONS for seed in (0, 1) for crop in ("0.5", "1.0")]
  first = specs[0]
  assert first.config == "tiny/loss_gaussian"
  assert first.overrides == ("train.log_every=5", "train.seed=0", "data.crop_seconds=0.5")
  experiment = first.experiment()
  assert (experiment.train.loss, experiment.train.log_every, experiment.data.crop_seconds) == (
      "gaussian", 5, 0.5)
  assert first.command("/w")[1:] == [
      "-m", "experiments.main", "--config", "tiny/loss_gaussian", "--workdir", "/w",
      "--set", "train.log_every=5", "--set", "train.seed=0", "--set", "data.crop_seconds=0.5"]


def test_expand_base_and_defaults():
  assert [s.name for s in sweep.expand("tiny")] == ["tiny"]
  specs = sweep.expand("tiny", ["base", "pit_per_exit"], SEEDS)
  assert [(s.name, s.config) for s in specs] == [
      ("tiny__train.seed=0", "tiny"), ("tiny__train.seed=1", "tiny"),
      ("tiny__pit_per_exit__train.seed=0", "tiny/pit_per_exit"),
      ("tiny__pit_per_exit__train.seed=1", "tiny/pit_per_exit")]


def test_names_are_filesystem_safe_and_unique():
  specs = sweep.expand("tiny", grid=['data.manual_dir="/a b/c",/a_b/c',
                                     "policy.target_dbs=[0, 10],[20,30]"])
  names = [s.name for s in specs]
  assert len(set(names)) == len(names) == 4
  for name in names:
    assert "/" not in name and " " not in name and all(
        c.isalnum() or c in "._=+,-" for c in name), name
  assert any(n.startswith("tiny__data.manual_dir=_ab_c__policy.target_dbs=20,30") for n in names)
  long_name = sweep.run_name("tiny", None, [f"train.model_overrides.x{i}={i}" for i in range(20)])
  assert len(long_name) <= sweep.MAX_NAME_LENGTH


@pytest.mark.parametrize("base, ablations, grid, message", [
    ("tiny", ["nope"], [], "unknown ablation 'nope'"),
    ("big", [], [], "unknown experiment"),
    ("tiny", [], ["train.nope=1,2"], "TrainConfig has no field 'nope'"),
    ("tiny", [], ["train.seed=0", "train.seed=1"], "appears twice"),
    ("tiny/exits_4", [], [], "--ablations"),
])
def test_bad_plans_fail_before_running(tmp_path, base, ablations, grid, message):
  runner = FakeRunner()
  with pytest.raises(ValueError, match=message):
    sweep.run_sweep(str(tmp_path), sweep.expand(base, ablations, grid), runner)
  assert runner.calls == []


def test_invalid_model_fails_at_plan_time(tmp_path):
  # tiny has 2 decoder blocks: 6 exits is not a valid model; the run name says which.
  with pytest.raises(ValueError, match=r"run tiny__train.model_overrides.exits=6: PressConfig"):
    sweep.run_sweep(str(tmp_path), sweep.expand("tiny", grid=["train.model_overrides.exits=6"]),
                    FakeRunner())


# --- running and resuming ---------------------------------------------------------------------
def test_run_then_resume(tmp_path):
  root = str(tmp_path / "sweep")
  specs = sweep.expand("tiny", ABLATIONS, SEEDS)
  failing = "tiny__loss_si_snr__train.seed=0"
  runner = FakeRunner(fail=[failing])
  state = sweep.run_sweep(root, specs, runner)
  assert runner.calls == [s.name for s in specs]
  runs = statuses(root)
  assert [r["status"] for r in runs.values()].count("done") == 3
  assert runs[failing]["status"] == "failed" and runs[failing]["exit_code"] == 3
  assert "RuntimeError: boom" in runs[failing]["log_tail"]
  assert runs[failing]["attempts"] == 1
  assert "RuntimeError: boom" in (tmp_path / "sweep" / failing / "log.txt").read_text()
  assert runs[failing]["experiment"]["train"]["loss"] == "si_snr"
  path, rows = sweep.write_results(root, state)
  assert [r["status"] for r in rows].count("failed") == 1

  # The same command again: only the failed run is launched.
  runner = FakeRunner()
  sweep.run_sweep(root, specs, runner)
  assert runner.calls == [failing]
  runs = statuses(root)
  assert all(r["status"] == "done" for r in runs.values())
  assert runs[failing]["attempts"] == 2 and runs[failing]["log_tail"] is None

  # All done: nothing is launched.
  runner = FakeRunner()
  sweep.run_sweep(root, specs, runner)
  assert runner.calls == []


def test_interrupted_and_deleted_runs_are_relaunched(tmp_path):
  root = str(tmp_path)
  specs = sweep.expand("tiny", grid=["train.seed=0,1,2"])
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(root, specs, FakeRunner(interrupt=["tiny__train.seed=1"]))
  runs = statuses(root)
  assert [runs[s.name]["status"] for s in specs] == ["done", "interrupted", "pending"]
  os.remove(os.path.join(root, "tiny__train.seed=0", "results.json"))
  runner = FakeRunner()
  sweep.run_sweep(root, specs, runner)
  assert runner.calls == [s.name for s in specs]


def test_exit_zero_without_results_is_a_failure(tmp_path):
  specs = sweep.expand("tiny")
  sweep.run_sweep(str(tmp_path), specs, FakeRunner(no_results=["tiny"]))
  run = statuses(str(tmp_path))["tiny"]
  assert run["status"] == "failed" and run["exit_code"] == 0
  assert "no results.json" in run["log_tail"]


def test_parallel_jobs(tmp_path):
  specs = sweep.expand("tiny", ABLATIONS, SEEDS)
  runner = FakeRunner()
  sweep.run_sweep(str(tmp_path), specs, runner, jobs=2)
  assert sorted(runner.calls) == sorted(s.name for s in specs)
  assert all(r["status"] == "done" for r in statuses(str(tmp_path)).values())


def test_second_sweep_in_same_root_is_refused(tmp_path):
  with sweep.exclusive(str(tmp_path)):
    with pytest.raises(sweep.SweepBusyError):
      sweep.run_sweep(str(tmp_path), sweep.expand("tiny"), FakeRunner())


# --- changed plans ----------------------------------------------------------------------------
def test_changed_plan_is_refused(tmp_path):
  root = str(tmp_path)
  sweep.run_sweep(root, sweep.expand("tiny", grid=SEEDS), FakeRunner())
  before = (tmp_path / "sweep.json").read_text()

  with pytest.raises(sweep.PlanChangedError) as error:
    sweep.run_sweep(root, sweep.expand("tiny", grid=["train.seed=0,2"]), FakeRunner())
  assert "tiny__train.seed=1: removed" in str(error.value)
  assert "tiny__train.seed=2: added" in str(error.value)
  assert "--force-replan" in str(error.value)

  with pytest.raises(sweep.PlanChangedError, match=r"train\.steps: 40 -> 50"):
    sweep.run_sweep(root, sweep.expand("tiny", grid=SEEDS, sets=["train.steps=50"]),
                    FakeRunner())
  assert (tmp_path / "sweep.json").read_text() == before  # Nothing touched.

  # The same plan in another order is the same plan.
  runner = FakeRunner()
  sweep.run_sweep(root, sweep.expand("tiny", grid=["train.seed=1,0"]), runner)
  assert runner.calls == []


def test_force_replan_moves_changed_runs_aside(tmp_path):
  root = str(tmp_path)
  sweep.run_sweep(root, sweep.expand("tiny", grid=SEEDS), FakeRunner())
  specs = sweep.expand("tiny", grid=["train.seed=0,2"], sets=[])
  runner = FakeRunner()
  sweep.run_sweep(root, specs, runner, force_replan=True)
  assert runner.calls == ["tiny__train.seed=2"]  # seed 0 unchanged and done.
  assert (tmp_path / "tiny__train.seed=1").is_dir()  # Removed runs are left alone.

  specs = sweep.expand("tiny", grid=["train.seed=0,2"], sets=["train.steps=50"])
  runner = FakeRunner()
  sweep.run_sweep(root, specs, runner, force_replan=True)
  assert runner.calls == ["tiny__train.seed=0", "tiny__train.seed=2"]
  replaced = os.listdir(tmp_path / "_replaced")
  assert sorted(name.split(".2")[0] for name in replaced) == [
      "tiny__train.seed=0", "tiny__train.seed=2"]
  assert statuses(root)["tiny__train.seed=0"]["experiment"]["train"]["steps"] == 50


def test_run_directory_from_another_config_is_refused(tmp_path):
  root = str(tmp_path)
  sweep.run_sweep(root, sweep.expand("tiny", grid=SEEDS), FakeRunner())
  os.remove(tmp_path / "sweep.json")  # Lost state: the run directories still tell.
  with pytest.raises(sweep.PlanChangedError, match="started with another config"):
    sweep.run_sweep(root, sweep.expand("tiny", grid=SEEDS, sets=["train.steps=50"]),
                    FakeRunner())


# --- summary ----------------------------------------------------------------------------------
def test_summary_table(tmp_path):
  root = str(tmp_path)
  specs = sweep.expand("tiny", grid=SEEDS)
  state = sweep.run_sweep(root, specs, FakeRunner(fail=["tiny__train.seed=1"]))
  path, rows = sweep.write_results(root, state)
  table = sweep.format_summary(rows)
  lines = table.splitlines()
  assert lines[0].split() == ["run", "status", "SI-SNRi", "last", "(dB)", "GMAC/s", "per",
                              "exit"]
  assert lines[1].split() == ["tiny__train.seed=0", "done", "4.00", "0.250", "0.500"]
  assert lines[2].split() == ["tiny__train.seed=1", "failed", "(3)", "-", "-"]
  with open(path) as handle:
    written = json.load(handle)["runs"]
  assert written[0]["last_exit_si_snri_db"] == 4.0
  assert written[0]["gmac_per_s"] == [0.25, 0.5] and written[1]["results"] is None


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
  root = str(tmp_path / "sweep")
  code = sweep.main(["--base", "tiny", "--ablations", "base,loss_gaussian", "--grid",
                     "train.seed=0,1", "--root", root, "--dry-run"])
  assert code == 0 and not os.path.exists(root)
  output = capsys.readouterr().out
  assert "4 runs" in output and "tiny__loss_gaussian__train.seed=1: run" in output
  assert "--config tiny/loss_gaussian" in output
  assert sweep.main(["--base", "tiny", "--grid", "train.nope=1", "--root", root]) == 2
  assert "TrainConfig has no field 'nope'" in capsys.readouterr().err


def test_subprocess_runner_logs_and_exit_code(tmp_path, monkeypatch):
  script = ("import json, os, sys; print('hello from', sys.argv[1]); "
            "json.dump([{'exit': 1, 'si_snri_db': 1.5, 'params': 1, 'gmac_per_s': 0.1}], "
            "open(os.path.join(sys.argv[1], 'results.json'), 'w')); sys.exit(int(sys.argv[2]))")
  exit_codes = {"tiny__train.seed=0": "0", "tiny__train.seed=1": "5"}
  monkeypatch.setattr(sweep.RunSpec, "command", lambda spec, workdir, python=sys.executable: [
      python, "-c", script, workdir, exit_codes[spec.name]])
  state = sweep.run_sweep(str(tmp_path), sweep.expand("tiny", grid=SEEDS),
                          sweep.SubprocessRunner(stream=False))
  runs = {run["name"]: run for run in state["runs"]}
  assert runs["tiny__train.seed=0"]["status"] == "done"
  assert runs["tiny__train.seed=1"]["status"] == "failed"
  assert runs["tiny__train.seed=1"]["exit_code"] == 5
  log = (tmp_path / "tiny__train.seed=1" / "log.txt").read_text()
  assert log.startswith("=== ") and "hello from" in log


def test_sigterm_stops_the_running_run(tmp_path):
  # A sweep whose run sleeps (its pid in a file); SIGTERM to the sweep stops both.
  pid_file = tmp_path / "child.pid"
  script = f"""
import sys
from experiments import sweep
child = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
sweep.RunSpec.command = lambda spec, workdir, python=sys.executable: [python, "-c", child]
sys.exit(sweep.main(["--base", "tiny", "--root", {str(tmp_path / 'root')!r}, "--quiet"]))
"""
  process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.monotonic() + 30
  while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
    time.sleep(0.05)
  child = int(pid_file.read_text())
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=30) == 143, process.stderr.read()
  assert "Terminated" in process.stderr.read()
  assert statuses(str(tmp_path / "root"))["tiny"]["status"] == "interrupted"
  with pytest.raises(ProcessLookupError):  # Reaped by the sweep: gone.
    os.kill(child, 0)
