"""Sweeps: grid expansion and naming, the plan, and the plan -> submit -> resume cycle.

Runs are submitit jobs. Most tests submit tests/sweep_jobs.FakeJob (a quick stand-in for
experiments.sweep.RunJob) through submitit's real local executor; one submits the real RunJob
on a reduced tiny config and kills it half-way. The SLURM executor is exercised without SLURM:
stand-in sbatch, sacct, srun and scancel commands on PATH record what submitit submits and
answer its polls.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep
from tests import sweep_jobs, worker_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ["train.seed=0,1"]
ABLATIONS = ["loss_gaussian", "loss_si_snr"]


@pytest.fixture(autouse=True)
def job_environment(monkeypatch):
  """Job processes import tests.sweep_jobs (the repository on their path)."""
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def run(root, specs, job=None, **kwargs):
  """run_sweep with the fake job, quick polls, all runs at once unless told."""
  kwargs = {"max_running": 0, "poll_s": 0.1, "follow": False, **kwargs}
  return sweep.run_sweep(str(root), specs, job_fn=job or sweep_jobs.FakeJob(), **kwargs)


def statuses(root):
  with open(os.path.join(root, sweep.SWEEP_FILE)) as handle:
    return {run["name"]: run for run in json.load(handle)["runs"]}


def calls(root):
  """The fake job's calls, in the order they ended."""
  path = os.path.join(root, "calls.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as handle:
    return [json.loads(line) for line in handle]


def called(root):
  return sorted(call["name"] for call in calls(root))


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
      "--config.train.log_every=5", "--config.train.seed=0", "--config.data.crop_seconds=0.5"]


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
def test_bad_plans_fail_before_submitting(tmp_path, base, ablations, grid, message):
  with pytest.raises(ValueError, match=message):
    run(tmp_path, sweep.expand(base, ablations, grid))
  assert not os.path.exists(tmp_path / sweep.SWEEP_FILE)


def test_invalid_model_fails_at_plan_time(tmp_path):
  # tiny has 2 decoder blocks: 6 exits is not a valid model; the run name says which.
  with pytest.raises(ValueError, match=r"run tiny__train.model_overrides.exits=6: PressConfig"):
    run(tmp_path, sweep.expand("tiny", grid=["train.model_overrides.exits=6"]))
  assert calls(tmp_path) == []


# --- submit, collect, resubmit (local executor, fake jobs) ------------------------------------
def test_submit_then_resume(tmp_path):
  root = str(tmp_path / "sweep")
  specs = sweep.expand("tiny", ABLATIONS, SEEDS)
  failing, killed = "tiny__loss_si_snr__train.seed=0", "tiny__loss_si_snr__train.seed=1"
  state = run(root, specs, sweep_jobs.FakeJob(fail_once=[failing], die_once=[killed]))
  assert called(root) == sorted(s.name for s in specs)
  assert all(call["multihost"] is False for call in calls(root))  # Local: one process.
  runs = statuses(root)
  assert [r["status"] for r in runs.values()].count("done") == 2
  assert runs[failing]["status"] == "failed" and runs[killed]["status"] == "interrupted"
  assert runs[failing]["error"] == f"RuntimeError: boom in {failing}"
  assert "RuntimeError: boom" in runs[failing]["log_tail"]
  assert "killed" in runs[killed]["error"]
  for name, entry in runs.items():
    job = entry["job"]
    assert entry["attempts"] == 1 and job["executor"] == "local" and job["tasks"] == 1
    assert job["log_folder"] == os.path.join(root, name, sweep.SUBMITIT_DIR)
    assert job["stdout"] == os.path.join(job["log_folder"], f"{job['job_id']}_0_log.out")
    assert f"fake training {name}" in open(job["stdout"]).read()
    assert os.path.isfile(os.path.join(job["log_folder"], f"{job['job_id']}_submitted.pkl"))
  assert runs[failing]["experiment"]["train"]["loss"] == "si_snr"
  assert "driver" not in json.load(open(os.path.join(root, sweep.SWEEP_FILE)))
  path, rows = sweep.write_results(root, state)
  assert sorted(r["status"] for r in rows) == ["done", "done", "failed", "interrupted"]

  # The same command again: only the failed and the killed run are submitted, as new jobs.
  os.remove(os.path.join(root, "calls.jsonl"))
  run(root, specs)
  assert called(root) == sorted([failing, killed])
  again = statuses(root)
  assert all(r["status"] == "done" for r in again.values())
  for name in (failing, killed):
    assert again[name]["attempts"] == 2 and again[name]["log_tail"] is None
    assert again[name]["job"]["job_id"] != runs[name]["job"]["job_id"]
    assert [(j["job_id"], j["status"]) for j in again[name]["previous_jobs"]] == [
        (runs[name]["job"]["job_id"], runs[name]["status"])]
  for name in set(runs) - {failing, killed}:
    assert again[name]["job"] == runs[name]["job"] and again[name]["attempts"] == 1

  # All done: nothing is submitted.
  os.remove(os.path.join(root, "calls.jsonl"))
  run(root, specs)
  assert calls(root) == [] and statuses(root) == again


def test_running_jobs_are_polled_not_resubmitted(tmp_path, monkeypatch, capsys):
  root = str(tmp_path)
  held = "tiny__train.seed=1"
  monkeypatch.setattr(sweep, "default_job", lambda: sweep_jobs.FakeJob(hold=[held]))
  argv = ["--config", "tiny", "--grid", "train.seed=0,1", "--root", root, "--poll-s", "0.1",
          "--max-running", "0", "--quiet"]
  assert sweep.main(argv + ["--no-wait"]) == 3  # Submitted, not finished.
  first = statuses(root)
  assert [r["status"] for r in first.values()] == ["running", "running"]
  assert "2 run(s) still running" in capsys.readouterr().out
  deadline = time.monotonic() + 60
  while sweep.job_state(first["tiny__train.seed=0"]["job"]) is None:
    assert time.monotonic() < deadline
    time.sleep(0.1)
  # Again while one job still runs: the other is collected, the held one polled.
  forget_jobs(monkeypatch)
  assert sweep.main(argv + ["--no-wait"]) == 3
  second = statuses(root)
  assert second["tiny__train.seed=0"]["status"] == "done"
  assert second[held]["status"] == "running" and second[held]["job"] == first[held]["job"]
  assert "tiny__train.seed=1: poll (running): local job" in _dry_run(argv, capsys)
  open(os.path.join(root, held, "release"), "w").close()
  assert sweep.main(argv) == 0  # Waits for it and collects it.
  final = statuses(root)
  assert all(r["status"] == "done" and r["attempts"] == 1 for r in final.values())
  # Collected by the poll ("state": "ENDED"), or, when the released job wrote its results
  # before this call planned, recognised as finished from its results (no state recorded).
  assert final[held]["job"] in ({**first[held]["job"], "state": "ENDED"}, first[held]["job"])
  assert called(root) == ["tiny__train.seed=0", held]  # Each ran once.
  table = capsys.readouterr().out
  assert f"{held}  done        {first[held]['job']['job_id']}" in table


def forget_jobs(monkeypatch):
  """What a new sweep command knows: sweep.json only (no job objects, a fresh sacct watcher)."""
  sweep._JOBS.clear()  # pylint: disable=protected-access
  monkeypatch.setattr(sweep.submitit.SlurmJob, "watcher",
                      type(sweep.submitit.SlurmJob.watcher)(delay_s=600))


def _dry_run(argv, capsys):
  capsys.readouterr()
  assert sweep.main(argv + ["--dry-run"]) == 0
  return capsys.readouterr().out


def test_local_runs_go_one_after_another_by_default(tmp_path):
  root = str(tmp_path)
  specs = sweep.expand("tiny", grid=["train.seed=0,1,2"])
  run(root, specs, sweep_jobs.FakeJob(seconds=0.3), max_running=None)
  spans = sorted((call["started"], call["ended"]) for call in calls(root))
  assert len(spans) == 3
  assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_exit_zero_without_results_is_a_failure(tmp_path):
  run(tmp_path, sweep.expand("tiny"), sweep_jobs.FakeJob(no_results=["tiny"]))
  entry = statuses(str(tmp_path))["tiny"]
  assert entry["status"] == "failed" and "without results.json" in entry["error"]


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_ctrl_c_cancels_local_jobs(tmp_path, monkeypatch, sigint_ignored):
  """Ctrl-C stops the held job; also when its controller ignores SIGINT, as every process started
  under nohup, from a background shell job or from a pytest-xdist worker does (it inherits the
  ignored signal): cancel then kills the controller's task after sweep.CANCEL_GRACE_S."""
  root = str(tmp_path)
  sleeps = []
  real_sleep = time.sleep

  def sleep(seconds):  # Ctrl-C once the held job has started.
    sleeps.append(seconds)
    if os.path.exists(os.path.join(root, "tiny", "attempted")):
      raise KeyboardInterrupt
    real_sleep(seconds)

  monkeypatch.setattr(sweep.time, "sleep", sleep)
  monkeypatch.setattr(sweep, "CANCEL_GRACE_S", 3.0)
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else
                           signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      run(root, sweep.expand("tiny"), sweep_jobs.FakeJob(hold=["tiny"]))
  finally:
    signal.signal(signal.SIGINT, previous)
  monkeypatch.setattr(sweep.time, "sleep", real_sleep)
  entry = statuses(root)["tiny"]
  assert entry["status"] == "interrupted" and "Ctrl-C" in entry["error"]
  # The held job would hold for 120 s: its controller must be gone well before.
  deadline = time.monotonic() + 60
  while sweep.job_state(entry["job"]) is None:
    assert time.monotonic() < deadline, "the cancelled job's controller did not exit in 60 s"
    real_sleep(0.1)
  assert calls(root) == []  # The held job never finished.
  run(root, sweep.expand("tiny"))  # Resubmitted next time.
  assert statuses(root)["tiny"]["status"] == "done" and statuses(root)["tiny"]["attempts"] == 2


def test_second_sweep_in_same_root_is_refused(tmp_path):
  root = str(tmp_path)
  specs = sweep.expand("tiny")
  run(root, specs, sweep_jobs.FakeJob(no_results=["tiny"]))
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    state = json.load(open(tmp_path / sweep.SWEEP_FILE))
    state["driver"] = {"host": sweep.socket.gethostname(), "pid": other.pid, "since": "now"}
    sweep.write_json(str(tmp_path / sweep.SWEEP_FILE), state)
    with pytest.raises(sweep.SweepBusyError, match=f"process {other.pid}"):
      run(root, specs)
  finally:
    other.kill()
    other.wait()
  run(root, specs)  # That driver is gone: this one takes over.
  assert statuses(root)["tiny"]["status"] == "done"


# --- changed plans ----------------------------------------------------------------------------
def test_changed_plan_is_refused(tmp_path):
  root = str(tmp_path)
  run(root, sweep.expand("tiny", grid=SEEDS))
  before = (tmp_path / "sweep.json").read_text()

  with pytest.raises(sweep.PlanChangedError) as error:
    run(root, sweep.expand("tiny", grid=["train.seed=0,2"]))
  assert "tiny__train.seed=1: removed" in str(error.value)
  assert "tiny__train.seed=2: added" in str(error.value)
  assert "--force-replan" in str(error.value)

  with pytest.raises(sweep.PlanChangedError, match=r"train\.steps: 40 -> 50"):
    run(root, sweep.expand("tiny", grid=SEEDS, sets=["train.steps=50"]))
  assert (tmp_path / "sweep.json").read_text() == before  # Nothing touched.
  assert len(calls(root)) == 2

  # The same plan in another order is the same plan.
  run(root, sweep.expand("tiny", grid=["train.seed=1,0"]))
  assert len(calls(root)) == 2


def test_force_replan_moves_changed_runs_aside(tmp_path):
  root = str(tmp_path)
  run(root, sweep.expand("tiny", grid=SEEDS))
  os.remove(tmp_path / "calls.jsonl")
  run(root, sweep.expand("tiny", grid=["train.seed=0,2"]), force_replan=True)
  assert called(root) == ["tiny__train.seed=2"]  # seed 0 unchanged and done.
  assert (tmp_path / "tiny__train.seed=1").is_dir()  # Removed runs are left alone.

  os.remove(tmp_path / "calls.jsonl")
  specs = sweep.expand("tiny", grid=["train.seed=0,2"], sets=["train.steps=50"])
  run(root, specs, force_replan=True)
  assert called(root) == ["tiny__train.seed=0", "tiny__train.seed=2"]
  replaced = os.listdir(tmp_path / "_replaced")
  assert sorted(name.split(".2")[0] for name in replaced) == [
      "tiny__train.seed=0", "tiny__train.seed=2"]
  entry = statuses(root)["tiny__train.seed=0"]
  assert entry["experiment"]["train"]["steps"] == 50
  assert entry["attempts"] == 1 and entry["previous_jobs"] == []  # A new run.


def test_replanning_a_running_run_is_refused(tmp_path):
  root = str(tmp_path)
  run(root, sweep.expand("tiny"), sweep_jobs.FakeJob(hold=["tiny"]), wait=False)
  try:
    with pytest.raises(sweep.PlanChangedError, match="still running: tiny"):
      run(root, sweep.expand("tiny", sets=["train.steps=50"]), force_replan=True)
    assert not (tmp_path / "_replaced").exists()
  finally:
    open(tmp_path / "tiny" / "release", "w").close()
  run(root, sweep.expand("tiny"))
  assert statuses(root)["tiny"]["status"] == "done"


def test_run_directory_from_another_config_is_refused(tmp_path):
  root = str(tmp_path)
  specs = sweep.expand("tiny", grid=SEEDS)
  experiments = {s.name: sweep.plan_entry(s)["experiment"] for s in specs}
  run(root, specs, sweep_jobs.FakeJob(experiments=experiments))
  os.remove(tmp_path / "sweep.json")  # Lost state: the run directories still tell.
  with pytest.raises(sweep.PlanChangedError, match="started with another config"):
    run(root, sweep.expand("tiny", grid=SEEDS, sets=["train.steps=50"]))


# --- summary, dry run, TPU commands -----------------------------------------------------------
def test_summary_table(tmp_path):
  root = str(tmp_path)
  state = run(root, sweep.expand("tiny", grid=SEEDS),
              sweep_jobs.FakeJob(fail_once=["tiny__train.seed=1"]))
  path, rows = sweep.write_results(root, state)
  lines = sweep.format_summary(rows).splitlines()
  jobs = [row["job_id"] for row in rows]
  assert lines[0].split() == ["run", "status", "job", "SI-SNRi", "last", "(dB)", "GMAC/s",
                              "per", "exit"]
  assert lines[1].split() == ["tiny__train.seed=0", "done", jobs[0], "4.00", "0.250", "0.500"]
  assert lines[2].split() == ["tiny__train.seed=1", "failed", jobs[1], "-", "-"]
  with open(path) as handle:
    written = json.load(handle)["runs"]
  assert written[0]["last_exit_si_snri_db"] == 4.0
  assert written[0]["gmac_per_s"] == [0.25, 0.5] and written[1]["results"] is None
  assert written[1]["error"] == "RuntimeError: boom in tiny__train.seed=1"
  assert written[1]["log_folder"] == os.path.join(root, "tiny__train.seed=1", "submitit")


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
  root = str(tmp_path / "sweep")
  code = sweep.main(["--config", "tiny", "--ablations", "base,loss_gaussian", "--grid",
                     "train.seed=0,1", "--root", root, "--dry-run"])
  assert code == 0 and not os.path.exists(root)
  output = capsys.readouterr().out
  assert "4 runs" in output and "tiny__loss_gaussian__train.seed=1: submit" in output
  assert "--config tiny/loss_gaussian" in output
  assert sweep.main(["--config", "tiny", "--grid", "train.nope=1", "--root", root]) == 2
  assert "TrainConfig has no field 'nope'" in capsys.readouterr().err
  assert sweep.main(["--config", "tiny", "--root", root, "--nodes", "2"]) == 2
  assert "--nodes: SLURM options; add --executor slurm" in capsys.readouterr().err


def test_print_commands(tmp_path, capsys):
  root = str(tmp_path / "sweep")
  code = sweep.main(["--config", "tiny", "--grid", "policy.target_dbs=(0,10),(0,20)",
                     "--config.train.seed=3", "--root", root, "--print-commands", "--tpu", "pod-1",
                     "--zone", "us-central2-b", "--repo", "/home/me/press_jax"])
  assert code == 0 and not os.path.exists(root)
  lines = capsys.readouterr().out.splitlines()
  commands = [line for line in lines if line.startswith("gcloud ")]
  assert len(commands) == 2 and "# tiny__policy.target_dbs=0,10 (pending)" in lines
  first = commands[0]
  assert first.startswith("gcloud compute tpus tpu-vm ssh pod-1 --zone us-central2-b "
                          "--worker=all --command=")
  # What each worker runs, once the local shell has removed one level of quoting.
  remote = sweep.shlex.split(first)[-1].removeprefix("--command=")
  words = sweep.shlex.split(remote)
  assert words[:3] == ["cd", "/home/me/press_jax", "&&"]
  assert words[3:] == ["PRESS_AUTO_DISTRIBUTED=1", "python", "-m", "experiments.main",
                       "--config", "tiny", "--workdir",
                       os.path.join(root, "tiny__policy.target_dbs=0,10"),
                       "--config.train.seed=3", "--config.policy.target_dbs=(0,10)"]


# --- executor options -------------------------------------------------------------------------
def test_local_jobs_see_the_visible_gpus(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
  parameters = sweep.ExecutorOptions().parameters("run")
  assert (parameters["gpus_per_node"], parameters["visible_gpus"]) == (2, [3, 5])
  assert sweep.ExecutorOptions(gpus_per_node=1).parameters("run")["gpus_per_node"] == 1
  with pytest.raises(ValueError, match="shows 2 GPU"):
    sweep.ExecutorOptions(gpus_per_node=3).parameters("run")
  assert sweep.ExecutorOptions().parameters("run")["timeout_min"] == sweep.LOCAL_TIMEOUT_MIN
  assert sweep.ExecutorOptions(time_min=5).parameters("run")["timeout_min"] == 5


def test_slurm_options_and_tasks():
  options = sweep.ExecutorOptions(kind="slurm", nodes=2, gpus_per_node=4, partition="gpu",
                                  time_min=120,
                                  slurm_extra=sweep.parse_extra(["account=proj", "exclusive"]))
  assert options.tasks == 8  # One process per GPU.
  assert options.parameters("tiny") == {
      "job_name": "press_tiny", "nodes": 2, "ntasks_per_node": 4, "time": 120,
      "gpus_per_node": 4, "partition": "gpu",
      "additional_parameters": {"account": "proj", "exclusive": True}}
  assert sweep.ExecutorOptions(kind="slurm").tasks == 1
  assert sweep.ExecutorOptions(kind="slurm", nodes=3, tasks_per_node=2).tasks == 6
  assert sweep.ExecutorOptions(kind="slurm").parameters("x")["time"] == sweep.SLURM_TIME_MIN
  with pytest.raises(ValueError, match="--executor"):
    sweep.ExecutorOptions(kind="pbs")
  with pytest.raises(ValueError, match="--partition"):
    sweep.ExecutorOptions(partition="gpu")


FAKE_SLURM = {
    "srun": "exit 0\n",
    "sbatch": """
if [ -f "$FAKE_SLURM/sbatch_fails" ]; then echo "sbatch: error: invalid partition" >&2; exit 1; fi
id=$(( $(cat "$FAKE_SLURM/next_id") )); echo $(( id + 1 )) > "$FAKE_SLURM/next_id"
cp "$1" "$FAKE_SLURM/$id.sh"
echo "Submitted batch job $id"
""",
    "sacct": """
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
  if [ "$1" = "-j" ]; then
    state=RUNNING; [ -f "$FAKE_SLURM/state.$2" ] && state=$(cat "$FAKE_SLURM/state.$2")
    echo "$2|$state|gpu[001-002]"; echo "$2.0|$state|gpu[001-002]"; shift
  fi
  shift
done
""",
    "scancel": 'echo CANCELLED > "$FAKE_SLURM/state.$1"\n',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  """sbatch (copies the script, answers a new job id), sacct (state files, default RUNNING)."""
  directory = tmp_path / "slurm"
  (directory / "bin").mkdir(parents=True)
  (directory / "next_id").write_text(str(int(time.time() * 1000) % 10**8))  # Fresh ids.
  for name, body in FAKE_SLURM.items():
    path = directory / "bin" / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
  monkeypatch.setenv("FAKE_SLURM", str(directory))
  monkeypatch.setenv("PATH", f"{directory / 'bin'}{os.pathsep}{os.environ['PATH']}")
  return directory


def test_slurm_submission_poll_and_resubmission(tmp_path, fake_slurm, capsys, monkeypatch):
  root = str(tmp_path / "sweep")
  argv = ["--config", "tiny", "--grid", "train.seed=0,1", "--root", root, "--executor", "slurm",
          "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time-min", "120",
          "--slurm-extra", "account=proj", "--slurm-extra", "exclusive",
          "--slurm-setup", "source /opt/press/.venv/bin/activate", "--no-wait"]
  assert sweep.main(argv) == 3
  first = statuses(root)
  ids = [first[f"tiny__train.seed={seed}"]["job"]["job_id"] for seed in (0, 1)]
  for seed, job_id in zip((0, 1), ids):
    name = f"tiny__train.seed={seed}"
    job = first[name]["job"]
    workdir = os.path.join(root, name)
    assert job["executor"] == "slurm" and job["tasks"] == 8 and first[name]["status"] == "running"
    assert job["log_folder"] == os.path.join(workdir, "submitit")
    script = (fake_slurm / f"{job_id}.sh").read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --account=proj",
                 "#SBATCH --exclusive", f"#SBATCH --job-name=press_{name}",
                 "source /opt/press/.venv/bin/activate"]:
      assert line in script.splitlines(), (line, script)
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(
        f"-u -m submitit.core._submit {sweep.shlex.quote(job['log_folder'])}")
    # What every task of the job runs: RunJob on this run, joining through SLURM's variables.
    submission = sweep.submitit.SlurmJob(job["log_folder"], job_id).submission()
    assert type(submission.function).__module__ == "experiments.sweep"
    assert type(submission.function).__name__ == "RunJob"
    assert submission.args == ("tiny", (f"train.seed={seed}",), workdir, True)
  assert "2 run(s) still running" in capsys.readouterr().out

  # Polled while running (by a new command): nothing is submitted again.
  forget_jobs(monkeypatch)
  assert sweep.main(argv) == 3
  assert statuses(root) == first and len(list(fake_slurm.glob("*.sh"))) == 2

  # One completes (its results.json written), the other fails: that one is resubmitted.
  (fake_slurm / f"state.{ids[0]}").write_text("COMPLETED")
  with open(os.path.join(root, "tiny__train.seed=0", "results.json"), "w") as handle:
    json.dump([{"exit": 1, "si_snri_db": 3.0, "params": 10, "gmac_per_s": 0.5}], handle)
  (fake_slurm / f"state.{ids[1]}").write_text("FAILED")
  forget_jobs(monkeypatch)
  assert sweep.main(argv) == 3
  third = statuses(root)
  assert third["tiny__train.seed=0"]["status"] == "done"
  assert third["tiny__train.seed=0"]["job"]["job_id"] == ids[0]
  resubmitted = third["tiny__train.seed=1"]
  assert resubmitted["status"] == "running" and resubmitted["attempts"] == 2
  assert resubmitted["job"]["job_id"] not in ids
  assert [(j["job_id"], j["status"], j["state"]) for j in resubmitted["previous_jobs"]] == [
      (ids[1], "failed", "FAILED")]
  assert len(list(fake_slurm.glob("*.sh"))) == 3


# --- the real job, killed half-way and resumed ------------------------------------------------
def reduced_sets(data_dir, steps=4):
  """A tiny run of a few steps on the 6/2/3-utterance corpus (tests/test_main_job.py's)."""
  return [f"train.steps={steps}", "train.log_every=2", "train.eval_every=0",
          "train.checkpoint_every=2", "train.optimizer.warmup_steps=1",
          f"train.optimizer.total_steps={steps}", "data.builder_config=clean_8k_n6-2-3",
          f"data.data_dir={data_dir}", "data.eval_batch_size_per_device=1",
          "data.crop_seconds=0.5", "finetune.min_steps=1", "finetune.steps_fraction=0.0",
          "with_sdr=False"]


@pytest.fixture
def shared_compilation_cache(monkeypatch):
  """The job processes share the test session's XLA compilation cache (tests/worker_util.py)."""
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", worker_util.XLA_CACHE_DIR)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def test_real_run_killed_then_resumed(tmp_path, shared_compilation_cache, capsys):
  root = str(tmp_path / "sweep")
  workdir = os.path.join(root, "tiny")
  argv = ["--config", "tiny", "--root", root, "--poll-s", "0.5", "--quiet"]
  for assignment in reduced_sets(tmp_path / "data"):
    argv.append(f"--config.{assignment}")
  assert sweep.main(argv + ["--no-wait"]) == 3
  first = statuses(root)["tiny"]["job"]
  # Once training has checkpointed step 2, kill the job's process (the controller's child).
  deadline = time.monotonic() + 400
  checkpoint = os.path.join(workdir, "train", "checkpoints", "2")
  while not os.path.isdir(checkpoint):
    assert sweep.job_state(first) is None, sweep.log_tail(first["stderr"])
    assert time.monotonic() < deadline, "no checkpoint at step 2"
    time.sleep(0.2)
  controller = int(first["job_id"])
  with open(f"/proc/{controller}/task/{controller}/children") as handle:
    tasks = [int(pid) for pid in handle.read().split()]
  assert len(tasks) == 1
  os.kill(tasks[0], signal.SIGKILL)
  while sweep.job_state(first) is None:  # The controller notices and exits.
    assert time.monotonic() < deadline
    time.sleep(0.1)
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # The same command: the killed run is resubmitted and resumes from its checkpoint.
  capsys.readouterr()
  assert sweep.main(argv) == 0
  output = capsys.readouterr().out
  assert "submitted tiny (resuming)" in output and "tiny: done" in output
  entry = statuses(root)["tiny"]
  assert entry["status"] == "done" and entry["attempts"] == 2
  assert [(j["job_id"], j["status"]) for j in entry["previous_jobs"]] == [
      (first["job_id"], "interrupted")]
  second = open(entry["job"]["stdout"]).read()
  assert "step 2/4" not in second and "[finetune]" in second  # Training was not redone.
  with open(os.path.join(workdir, "train", "train_history.json")) as handle:
    assert [row["step"] for row in json.load(handle)] == [2, 4]
  with open(os.path.join(workdir, "results.json")) as handle:
    assert [row["exit"] for row in json.load(handle)] == [1, 2]

  # Again: everything done, nothing submitted; a changed plan is refused.
  assert sweep.main(argv) == 0
  assert statuses(root)["tiny"] == entry
  assert sweep.main(argv + ["--config.train.seed=1"]) == 2
  assert "train.seed: 0 -> 1" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_sweep_reduced(tmp_path, shared_compilation_cache, capsys):
  """The README's sweep (tiny x {base, loss_gaussian} x seeds 0, 1), each run a few steps."""
  root = str(tmp_path / "sweep")
  argv = ["--config", "tiny", "--ablations", "base,loss_gaussian", "--grid", "train.seed=0,1",
          "--root", root, "--poll-s", "0.5"]
  for assignment in reduced_sets(tmp_path / "data"):
    argv.append(f"--config.{assignment}")
  assert sweep.main(argv) == 0
  output = capsys.readouterr().out
  assert "[train] tiny for 4 steps" in output  # The jobs' output, echoed.
  runs = statuses(root)
  assert list(runs) == ["tiny__train.seed=0", "tiny__train.seed=1",
                        "tiny__loss_gaussian__train.seed=0", "tiny__loss_gaussian__train.seed=1"]
  assert all(r["status"] == "done" and r["attempts"] == 1 for r in runs.values())
  with open(os.path.join(root, sweep.RESULTS_FILE)) as handle:
    rows = json.load(handle)["runs"]
  assert all(len(row["gmac_per_s"]) == 2 for row in rows)
  assert runs["tiny__loss_gaussian__train.seed=1"]["experiment"]["train"]["loss"] == "gaussian"


def test_failed_submission_is_reported(tmp_path, fake_slurm, capsys):
  (fake_slurm / "sbatch_fails").write_text("")
  root = str(tmp_path / "sweep")
  assert sweep.main(["--config", "tiny", "--root", root, "--executor", "slurm", "--no-wait"]) == 1
  assert "invalid partition" in capsys.readouterr().err
  entry = statuses(root)["tiny"]
  assert entry["status"] == "pending" and entry["job"] is None  # Submitted next time.
