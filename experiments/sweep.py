"""Sweeps: a grid of experiments, one work directory per run, each run a submitit job.

Run:
  python -m experiments.sweep --config tiny --ablations base,loss_gaussian --grid train.seed=0,1 \
      --root runs/sweep [--config.FIELD=VALUE ...] [--dry-run] [--force-replan] [--max-running 1]
  python -m experiments.sweep --config tiny --sweep loss --root runs/sweep   # the same, declared
  python -m experiments.sweep --config S --sweep exits --root runs/exits \
      --executor slurm --nodes 2 --gpus-per-node 8 --partition gpu --time-min 1440 --no-wait
  python -m experiments.sweep --config S --sweep exits --root runs/exits \
      --print-commands --tpu my-pod --zone us-central2-b --repo '~/press_jax'
Expected (first command): four runs, tiny__train.seed=0, tiny__train.seed=1,
tiny__loss_gaussian__train.seed=0, tiny__loss_gaussian__train.seed=1, each submitted to
submitit's local executor (one at a time: --max-running 1 is the local default), whose job runs
experiments.main's stages for `--config tiny/loss_gaussian --workdir
runs/sweep/tiny__loss_gaussian__train.seed=0 --config.train.seed=0` in a fresh process (its output
in <run>/submitit/<job id>_0_log.out and .err, echoed here), a few minutes each on 2 CPU cores;
then a table of run, status, last-exit SI-SNRi (dB) and GMAC/s per exit, also written to
runs/sweep/sweep_results.json.

runs/sweep/sweep.json holds the plan and each run's status (pending, running, done, failed with
its error and log tail, interrupted), its submitit job (executor, job id, log folder) and the
jobs of earlier attempts. Running the same command again skips runs that have a results.json,
polls and collects the jobs still queued or running instead of submitting them again, and
resubmits the failed and interrupted runs, whose stages resume from their checkpoints. A
different plan (runs added or removed, any resolved config field changed) is refused unless
--force-replan; the changed runs' old directories are then moved to <root>/_replaced/ (refused
while such a run's job is still running).

--executor slurm submits each run as a SLURM job of --nodes nodes with --gpus-per-node GPUs and
one process (task) per GPU; every process calls jax.distributed.initialize(), which reads
SLURM's variables (press_jax.distributed), so the run's data parallelism spans the job. On a
timeout or preemption submitit requeues the job and the stages resume. With --no-wait the
command submits and returns; run it again to collect. --print-commands prints, per run, the one
command that runs it on a TPU pod (`gcloud compute tpus tpu-vm ssh ... --worker=all
--command=...`, every worker one JAX process); it submits nothing.

Exit status: 0 when every run is done, 1 when some failed or were interrupted (or a submission
failed), 2 for a bad or changed plan (or another sweep command driving the same root), 3 when
none failed but some are still running (--no-wait), 130 on Ctrl-C (local jobs are cancelled,
SLURM jobs left running).

--config is a name (experiments/configs/<name>.py) or a config file; `--sweep NAME` takes the
ablations and grid that the file's get_sweep(NAME) declares (sweeps as data beside the config,
as big_vision's get_hyper). Grid values are split on commas outside brackets and quotes, and
parsed like --config.x=y values (by the field's type; Python literals for tuples and dicts):
--grid 'policy.target_dbs=(0,10),(0,20)' gives two runs. The ablation name 'base' stands for the
base config itself. --config.x=y overrides apply in order before the grid, and each run's
config is validated once, after all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import submitit
from submitit.core import utils as submitit_utils

from experiments import configs
from press_jax import distributed

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "sweep_results.json"
RUN_RESULTS = "results.json"  # Written by experiments.main when a run has finished.
SUBMITIT_DIR = "submitit"  # <run>/submitit/: the jobs' pickles and logs.
BASE_ABLATION = "base"
MAX_NAME_LENGTH = 150
EXECUTORS = ("local", "slurm")
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # No time limit for local jobs unless --time-min.
SLURM_TIME_MIN = 60 * 24  # Default SLURM time limit (minutes).
# SLURM states of a job that ended badly without a result from submitit: the run failed. Other
# end states (CANCELLED, TIMEOUT past its requeues, NODE_FAIL, a killed local job) interrupted it.
FAILED_STATES = ("FAILED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PlanChangedError(ValueError):
  """The plan of an existing sweep differs from the requested one."""


class SweepBusyError(ValueError):
  """Another sweep command is driving the same root."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep: a config (file or name) plus `--config.field.path=value` overrides."""

  name: str
  config: str  # A config name or file for experiments.configs, e.g. 'tiny/exits_4'.
  overrides: tuple[str, ...] = ()  # 'field.path=value': the sweep's --config.x=y, then the grid.

  def experiment(self) -> configs.ExperimentConfig:
    """The resolved config; its model and loss are built too, so a bad run fails here."""
    try:
      experiment = configs.resolve(self.config, list(self.overrides))
      experiment.train.model_config()
      experiment.train.loss_config()
    except (ValueError, TypeError) as error:
      raise ValueError(f"run {self.name}: {error}") from error
    return experiment

  def command(self, workdir: str, python: str = sys.executable) -> list[str]:
    """The experiments.main command line of this run (what its job runs, as a command)."""
    command = [python, "-m", "experiments.main", "--config", self.config, "--workdir", workdir]
    return command + [f"--config.{assignment}" for assignment in self.overrides]


# --- the grid ---------------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
  """Split on commas outside (), [], {} and quotes: '[0,1],"a,b",3' -> ['[0,1]', '"a,b"', '3']."""
  values, current, depth, quote = [], [], 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "\"'":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      values.append("".join(current))
      current = []
      continue
    current.append(char)
  values.append("".join(current))
  if quote or depth:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  return [value.strip() for value in values]


def parse_grid(text: str) -> tuple[str, list[str]]:
  """'train.seed=0,1' -> ('train.seed', ['0', '1'])."""
  field, separator, values = text.partition("=")
  field = field.strip()
  if not separator or not field:
    raise ValueError(f"--grid {text!r}: expected FIELD.PATH=VALUE1,VALUE2,...")
  parsed = split_values(values)
  if any(not value for value in parsed):
    raise ValueError(f"--grid {text!r}: empty value")
  if len(set(parsed)) != len(parsed):
    raise ValueError(f"--grid {text!r}: repeated value")
  return field, parsed


def safe_name(text: str) -> str:
  """A file-system safe run name part: brackets, quotes, spaces dropped; only [A-Za-z0-9._=+,-]."""
  return re.sub(r"[^A-Za-z0-9._=+,\-]", "_", re.sub(r"[\s\[\](){}\"']", "", text))


def _short_hash(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_name(base: str, ablation: str | None, assignments: Sequence[str]) -> str:
  """'tiny', 'exits_4', ['train.seed=0'] -> 'tiny__exits_4__train.seed=0' (file-system safe)."""
  parts = [base] + ([ablation] if ablation else []) + list(assignments)
  name = "__".join(safe_name(part) for part in parts)
  if len(name) > MAX_NAME_LENGTH:
    name = name[:MAX_NAME_LENGTH - 9] + "-" + _short_hash("__".join(parts))
  return name


def expand(base: str, ablations: Sequence[str] = (), grid: Sequence[str] = (),
           sets: Sequence[str] = ()) -> list[RunSpec]:
  """Every (ablation, grid point) combination as a RunSpec, ablations outermost, in order."""
  is_file = base.endswith(".py") or ":" in base
  if ":" in base or (not is_file and "/" in base):
    raise ValueError(f"--config {base!r}: give the ablation with --ablations, not in the config")
  label = os.path.splitext(os.path.basename(base))[0] if is_file else base
  ablation_list = [None if a == BASE_ABLATION else a for a in ablations] or [None]
  if len(set(ablation_list)) != len(ablation_list):
    raise ValueError(f"--ablations: repeated ablation in {list(ablations)}")
  axes = [parse_grid(text) for text in grid]
  fields = [field for field, _ in axes]
  if len(set(fields)) != len(fields):
    raise ValueError(f"--grid: a field appears twice in {fields}")
  specs = []
  for ablation in ablation_list:
    for point in itertools.product(*[values for _, values in axes]):
      assignments = [f"{field}={value}" for field, value in zip(fields, point)]
      specs.append(RunSpec(
          name=run_name(label, ablation, assignments),
          config=(f"{base}{':' if is_file else '/'}{ablation}" if ablation else base),
          overrides=tuple(sets) + tuple(assignments)))
  names = [spec.name for spec in specs]
  if len(set(names)) != len(names):  # Values differing only in unsafe characters.
    specs = [dataclasses.replace(spec, name=spec.name + "-" + _short_hash(
        spec.config + "|" + "|".join(spec.overrides))) for spec in specs]
  return specs


def declared_sweep(base: str, name: str) -> dict[str, Any]:
  """The sweep `name` declared by the config file of `base` (its get_sweep)."""
  module = configs.load_module(base)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--sweep {name}: config {base!r} declares no sweeps (no get_sweep)")
  try:
    declared = module.get_sweep(name)
  except KeyError:
    raise ValueError(f"--sweep {name}: config {base!r} declares no sweep {name!r} (see its "
                     "get_sweep docstring)") from None
  unknown = set(declared) - {"ablations", "grid"}
  if unknown:
    raise ValueError(f"--sweep {name}: unknown keys {sorted(unknown)} (expected ablations, grid)")
  return declared


# --- the plan and its state -------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def plan_entry(spec: RunSpec) -> dict[str, Any]:
  """What defines a run in sweep.json: name, config, overrides and the resolved config."""
  return {"name": spec.name, "config": spec.config, "set": list(spec.overrides),
          "experiment": _jsonable(spec.experiment().to_dict())}


_PLAN_KEYS = ("name", "config", "set", "experiment")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, dict):
    flat = {}
    for key, item in value.items():
      flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
  return {prefix: value}


def entry_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Human-readable differences between two plan entries of the same run."""
  differences = []
  for key in ("config", "set"):
    if old.get(key) != new.get(key):
      differences.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
  old_flat, new_flat = _flatten(old.get("experiment", {})), _flatten(new.get("experiment", {}))
  for field in sorted(set(old_flat) | set(new_flat)):
    if old_flat.get(field, "<absent>") != new_flat.get(field, "<absent>"):
      differences.append(f"{field}: {old_flat.get(field, '<absent>')!r} -> "
                         f"{new_flat.get(field, '<absent>')!r}")
  return differences


def plan_differences(old_runs: Sequence[dict], new_runs: Sequence[dict]) -> dict[str, list[str]]:
  """{run name: differences}; added and removed runs say so. Empty: the same plan."""
  old_by_name = {run["name"]: run for run in old_runs}
  new_by_name = {run["name"]: run for run in new_runs}
  differences = {}
  for name in old_by_name.keys() - new_by_name.keys():
    differences[name] = ["removed from the plan"]
  for name in new_by_name.keys() - old_by_name.keys():
    differences[name] = ["added to the plan"]
  for name in old_by_name.keys() & new_by_name.keys():
    changed = entry_differences(old_by_name[name], new_by_name[name])
    if changed:
      differences[name] = changed
  return dict(sorted(differences.items()))


def format_differences(differences: dict[str, list[str]], limit: int = 5) -> str:
  lines = []
  for name, changes in differences.items():
    lines.append(f"  {name}: " + "; ".join(changes[:limit])
                 + (f"; ... ({len(changes) - limit} more)" if len(changes) > limit else ""))
  return "\n".join(lines)


def read_json(path: str) -> Any:
  with open(path) as handle:
    return json.load(handle)


def write_json(path: str, value: Any) -> None:
  """Atomically replace `path` (a crash never leaves a half-written file)."""
  temporary = f"{path}.tmp{os.getpid()}"
  with open(temporary, "w") as handle:
    json.dump(value, handle, indent=1)
  os.replace(temporary, path)


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def run_finished(root: str, name: str) -> bool:
  return os.path.isfile(os.path.join(root, name, RUN_RESULTS))


def _stored_experiment(root: str, name: str) -> Any:
  """The config a run directory was started with (experiments.main writes experiment.json)."""
  path = os.path.join(root, name, "experiment.json")
  return _jsonable(read_json(path)) if os.path.isfile(path) else None


def prepare(root: str, specs: Sequence[RunSpec], force_replan: bool = False,
            dry_run: bool = False, out=None) -> dict[str, Any]:
  """The sweep state for `specs`: the stored one if the plan matches, else an error or a replan.

  A run's status is refreshed from its directory: 'done' iff its results.json exists. A run
  still 'running' keeps its job, to be polled; replanning such a run is refused.
  """
  out = out or sys.stdout
  new_runs = [plan_entry(spec) for spec in specs]
  path = os.path.join(root, SWEEP_FILE)
  old_state = read_json(path) if os.path.isfile(path) else None
  old_by_name = {run["name"]: run for run in (old_state or {}).get("runs", [])}
  differences = plan_differences(list(old_by_name.values()), new_runs) if old_state else {}
  # A run directory started with another config (e.g. sweep.json deleted or edited) also counts.
  for run in new_runs:
    stored = _stored_experiment(root, run["name"])
    if (stored is not None and stored != run["experiment"]
        and differences.get(run["name"], ["added to the plan"]) == ["added to the plan"]):
      differences[run["name"]] = ["its directory was started with another config"] + (
          entry_differences({**run, "experiment": stored}, run))
  replaced = {name for name, changes in differences.items()
              if changes != ["added to the plan"] and changes != ["removed from the plan"]}
  if differences:
    message = (f"the plan in {path} differs from the requested one:\n"
               f"{format_differences(differences)}")
    if not force_replan:
      raise PlanChangedError(message + "\nRe-run with the original arguments to resume, use "
                             "another --root, or pass --force-replan (the changed runs' "
                             "directories are moved to <root>/_replaced/).")
    busy = [f"{name} (job {old_by_name[name]['job']['job_id']})" for name in sorted(replaced)
            if name in old_by_name and old_by_name[name].get("status") == "running"
            and job_state(old_by_name[name]["job"]) is None]
    if busy:
      raise PlanChangedError(message + "\nCannot replan runs whose jobs are still running: "
                             f"{', '.join(busy)}; wait for them or cancel them first.")
    print(("[dry run] would replan: " if dry_run else "replanning: ") + message, file=out)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  runs = []
  for run in new_runs:
    name, previous = run["name"], old_by_name.get(run["name"], {})
    directory = os.path.join(root, name)
    if name in replaced:
      previous = {}
      if os.path.exists(directory):
        target = os.path.join(root, "_replaced", f"{name}.{stamp}")
        print(f"{'[dry run] would move' if dry_run else 'moving'} {directory} -> {target}",
              file=out)
        if not dry_run:
          os.makedirs(os.path.dirname(target), exist_ok=True)
          shutil.move(directory, target)
    entry = {**run, "workdir": name, "status": previous.get("status", "pending"),
             "attempts": previous.get("attempts", 0), "job": previous.get("job"),
             "previous_jobs": previous.get("previous_jobs", []),
             "submitted": previous.get("submitted"), "finished": previous.get("finished"),
             "error": previous.get("error"), "log_tail": previous.get("log_tail")}
    if entry["status"] == "running" and entry["job"] is None:
      entry["status"] = "pending"  # An edited sweep.json: nothing to poll.
    if run_finished(root, name) and not (dry_run and name in replaced):
      entry["status"] = "done"
    elif entry["status"] == "done":  # results.json deleted since: run it again.
      entry["status"] = "pending"
    runs.append(entry)
  state = {"version": 2, "root": os.path.abspath(root),
           "created": old_state["created"] if old_state and not differences else _now(),
           "runs": runs}
  return state


# --- what a job runs --------------------------------------------------------------------------
class RunJob(submitit.helpers.Checkpointable):
  """What a run's submitit job runs, in each of its processes: join them, then the stages.

  `job(config, overrides, workdir, multihost)`. A SLURM job (multihost=True) of several tasks
  joins one JAX runtime through jax.distributed.initialize(), which reads SLURM's variables
  (press_jax.distributed); a local job is one process with this machine's devices. Then
  experiments.main.run: data, train, finetune, evaluation, every stage resuming from its
  checkpoints. As a submitit Checkpointable, a job that reaches its time limit or is preempted
  is requeued with the same arguments, and resumes.
  """

  def __call__(self, config: str, overrides: Sequence[str], workdir: str,
               multihost: bool) -> dict[str, Any]:
    from experiments import main as main_lib  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel

    if not multihost:  # A local job: never join a SLURM step the sweep happens to run in.
      os.environ["PRESS_AUTO_DISTRIBUTED"] = "0"
    logging.basicConfig(level=logging.WARNING)
    joined = distributed.initialize_from_flags_or_environment()
    print(f"[sweep job] {workdir}: process {jax.process_index()} of {jax.process_count()}"
          f"{' (jax.distributed)' if joined else ''}, {jax.local_device_count()} local of "
          f"{jax.device_count()} devices", flush=True)
    experiment = configs.resolve(config, list(overrides))
    main_lib.run(experiment, workdir)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "results": os.path.join(workdir, RUN_RESULTS)}


def default_job() -> RunJob:
  """A RunJob that pickles by reference to experiments.sweep (also under `python -m`)."""
  return importlib.import_module("experiments.sweep").RunJob()


# --- executors and jobs -----------------------------------------------------------------------
def _local_gpus() -> list[int]:
  """The GPUs a local job may use: CUDA_VISIBLE_DEVICES's (integer ids), else nvidia-smi's."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    if not all(i.isdigit() for i in ids):  # submitit sets the jobs' CUDA_VISIBLE_DEVICES.
      raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: the local executor takes integer "
                       "GPU ids")
    return [int(i) for i in ids]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    listing = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return list(range(sum(line.startswith("GPU ") for line in listing.splitlines())))


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
  """Where a sweep's jobs run: submitit's local executor or SLURM, and their resources."""

  kind: str = "local"  # 'local' or 'slurm'.
  nodes: int = 1  # SLURM nodes per run.
  gpus_per_node: int | None = None  # Local: how many of the visible GPUs (default all).
  tasks_per_node: int | None = None  # SLURM processes per node; default one per GPU (or 1).
  partition: str | None = None
  time_min: int | None = None  # Time limit per job; local default none, SLURM default 1 day.
  cpus_per_task: int | None = None
  slurm_extra: tuple[tuple[str, Any], ...] = ()  # Any other sbatch option, e.g. account=X.
  setup: tuple[str, ...] = ()  # Shell lines the SLURM job runs before its tasks.
  python: str | None = None  # The job's interpreter; default this one (sys.executable).

  def __post_init__(self):
    if self.kind not in EXECUTORS:
      raise ValueError(f"--executor {self.kind!r}: choose one of {list(EXECUTORS)}")
    for field in ("nodes", "gpus_per_node", "tasks_per_node", "time_min", "cpus_per_task"):
      value = getattr(self, field)
      if value is not None and value < (0 if field == "gpus_per_node" else 1):
        raise ValueError(f"--{field.replace('_', '-')} {value}: too small")
    if self.kind == "local":
      slurm_only = {"--nodes": self.nodes != 1, "--tasks-per-node": self.tasks_per_node,
                    "--partition": self.partition, "--cpus-per-task": self.cpus_per_task,
                    "--slurm-extra": self.slurm_extra, "--slurm-setup": self.setup}
      given = [flag for flag, value in slurm_only.items() if value]
      if given:
        raise ValueError(f"{', '.join(given)}: SLURM options; add --executor slurm")

  @property
  def tasks(self) -> int:
    """Processes per job: nodes x tasks per node (JAX on SLURM: one process per GPU)."""
    if self.kind == "local":
      return 1
    return self.nodes * (self.tasks_per_node or max(1, self.gpus_per_node or 0))

  def parameters(self, name: str) -> dict[str, Any]:
    """submitit's update_parameters arguments for the job of run `name`."""
    if self.kind == "local":
      gpus = _local_gpus()
      count = len(gpus) if self.gpus_per_node is None else self.gpus_per_node
      if count > len(gpus):
        raise ValueError(f"--gpus-per-node {count}: this machine shows {len(gpus)} GPU(s)")
      return {"timeout_min": self.time_min or LOCAL_TIMEOUT_MIN, "tasks_per_node": 1,
              "gpus_per_node": count, "visible_gpus": gpus}
    parameters = {"job_name": f"press_{name}"[:120], "nodes": self.nodes,
                  "ntasks_per_node": self.tasks // self.nodes,
                  "time": self.time_min or SLURM_TIME_MIN}
    optional = {"gpus_per_node": self.gpus_per_node or None, "partition": self.partition,
                "cpus_per_task": self.cpus_per_task, "setup": list(self.setup) or None,
                "additional_parameters": dict(self.slurm_extra) or None}
    parameters.update({key: value for key, value in optional.items() if value is not None})
    return parameters

  def executor(self, folder: str, name: str) -> submitit.Executor:
    """A submitit executor writing its pickles and logs to `folder`."""
    python = self.python or shlex.quote(sys.executable)
    if self.kind == "local":
      executor = submitit.LocalExecutor(folder, python=python)
    else:
      executor = submitit.SlurmExecutor(folder, python=python)
    executor.update_parameters(**self.parameters(name))
    return executor


def parse_extra(assignments: Sequence[str]) -> tuple[tuple[str, Any], ...]:
  """--slurm-extra KEY=VALUE (an sbatch option, dashes or underscores); a bare KEY is a flag."""
  extra = []
  for assignment in assignments:
    key, separator, value = assignment.partition("=")
    key = key.strip().lstrip("-")
    if not key:
      raise ValueError(f"--slurm-extra {assignment!r}: expected KEY=VALUE or KEY")
    extra.append((key.replace("-", "_"), value if separator else True))
  return tuple(extra)


# Jobs submitted by this process, by (folder, job id): polled through submitit's objects (a local
# job's process is this process's child). Others, from an earlier command, are re-attached.
_JOBS: dict[tuple[str, str], submitit.Job] = {}


def _paths(record: dict[str, Any], task: int = 0) -> submitit_utils.JobPaths:
  return submitit_utils.JobPaths(record["log_folder"], job_id=record["job_id"], task_id=task)


def submit(options: ExecutorOptions, job_fn: Callable, spec: RunSpec,
           workdir: str) -> dict[str, Any]:
  """Submit run `spec` (working in `workdir`); returns its job record for sweep.json."""
  folder = os.path.join(workdir, SUBMITIT_DIR)
  executor = options.executor(folder, spec.name)
  job = executor.submit(job_fn, spec.config, tuple(spec.overrides), workdir,
                        options.kind == "slurm")
  _JOBS[(folder, str(job.job_id))] = job
  record = {"executor": options.kind, "job_id": str(job.job_id), "log_folder": folder,
            "tasks": options.tasks}
  paths = _paths(record)
  record.update(stdout=str(paths.stdout), stderr=str(paths.stderr))
  return record


def _local_controller_alive(record: dict[str, Any]) -> bool:
  """Whether the local job's controller (submitit.local._local, pid = job id) still runs."""
  pid = int(record["job_id"])
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
      command = handle.read().decode(errors="replace")
  except FileNotFoundError:
    if os.path.isdir("/proc"):
      return False
    try:  # No /proc (macOS): the pid's existence.
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      pass
    return True
  return "submitit.local._local" in command and record["log_folder"] in command


def _slurm_job(record: dict[str, Any]) -> tuple[submitit.Job, bool]:
  """The SLURM job of `record` (registered with submitit's sacct watcher); True if just now."""
  key = (record["log_folder"], record["job_id"])
  if key in _JOBS:
    return _JOBS[key], False
  _JOBS[key] = submitit.SlurmJob(record["log_folder"], record["job_id"],
                                 tasks=list(range(record.get("tasks", 1))))
  return _JOBS[key], True


def refresh_slurm_states(records: Sequence[dict[str, Any]]) -> None:
  """One sacct call for the SLURM jobs among `records` (and any others being polled)."""
  records = [record for record in records if record["executor"] == "slurm"]
  for record in records:
    _slurm_job(record)
  if records:
    submitit.SlurmJob.watcher.update()


def job_state(record: dict[str, Any]) -> str | None:
  """None while the job is queued or running; its end state once it has ended.

  A SLURM job's state is the one sacct gave at the last refresh_slurm_states (asked now for a
  job this process has not polled before).
  """
  if record["executor"] == "local":
    job = _JOBS.get((record["log_folder"], record["job_id"]))
    if job is not None:  # This process's child: submitit polls it.
      running = job.state == "RUNNING"
    else:
      running = _local_controller_alive(record)
    return None if running else "ENDED"
  job, attached = _slurm_job(record)
  if attached:
    job.watcher.update()
  state = job.watcher.get_state(record["job_id"], mode="cache")
  results = [_paths(record, task).result_pickle for task in range(record.get("tasks", 1))]
  if state.upper() == "UNKNOWN" and all(path.exists() for path in results):
    return "COMPLETED"  # sacct does not know it (any more), but every task has finished.
  if not job.watcher.is_done(record["job_id"], mode="cache"):
    return None
  return state.split()[0]  # 'CANCELLED by 123' -> 'CANCELLED'.


def job_errors(record: dict[str, Any]) -> tuple[list[str], bool]:
  """(the tracebacks of tasks that raised, whether every task returned a result)."""
  errors, complete = [], True
  for task in range(record.get("tasks", 1)):
    path = _paths(record, task).result_pickle
    if not path.exists():
      complete = False
      continue
    try:
      outcome, value = submitit_utils.pickle_load(path)
    except Exception as error:  # pylint: disable=broad-except
      outcome, value = "error", f"unreadable result {path}: {error}"
    if outcome == "error":
      errors.append(str(value))
  return errors, complete


# How long a cancelled local job's controller gets to exit on SIGINT before its tasks are killed.
CANCEL_GRACE_S = 10.0


def _local_tasks(pid: int) -> list[int]:
  """The child processes of a local job's controller (Linux /proc; empty elsewhere)."""
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
      return [int(child) for child in handle.read().split()]
  except (FileNotFoundError, ProcessLookupError):
    return []


def cancel(record: dict[str, Any], grace_s: float | None = None) -> None:
  """Stop a job. SLURM: scancel. Local: the controller (submitit.local._local) gets SIGINT and
  interrupts its task; if it has not exited after `grace_s` (default CANCEL_GRACE_S) — a controller started with SIGINT
  ignored never sees it: under nohup, from a background shell job, in a pytest-xdist worker — its
  tasks get SIGKILL, and it exits once they have ended. The work lost is what a crash loses: the
  steps since the task's last checkpoint, from which the next submission resumes."""
  job = _JOBS.get((record["log_folder"], record["job_id"]))
  if record["executor"] != "local":
    _slurm_job(record)[0].cancel(check=False)
    return
  if job is not None:
    job.cancel()
  elif _local_controller_alive(record):
    os.kill(int(record["job_id"]), signal.SIGINT)
  else:
    return
  pause = threading.Event().wait  # Not time.sleep: this runs while a KeyboardInterrupt unwinds.
  deadline = time.monotonic() + (CANCEL_GRACE_S if grace_s is None else grace_s)
  while job_state(record) is None and time.monotonic() < deadline:
    pause(0.1)
  if job_state(record) is None:
    for task in _local_tasks(int(record["job_id"])):
      try:
        os.kill(task, signal.SIGKILL)
      except ProcessLookupError:
        pass


def log_tail(path: str, lines: int = 30, characters: int = 4000) -> str:
  """The last `lines` lines (at most `characters`) of a log file."""
  if not path or not os.path.isfile(path):
    return ""
  with open(path, "rb") as handle:
    handle.seek(max(0, os.path.getsize(path) - 64 * 1024))
    text = handle.read().decode("utf-8", errors="replace")
  text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "\n")  # Progress bars.
  tail = "\n".join(line for line in text.splitlines() if line.strip())
  return "\n".join(tail.splitlines()[-lines:])[-characters:]


class LogFollower:
  """Echoes what the jobs append to their task-0 logs (stdout, then stderr)."""

  def __init__(self, out):
    self.out, self.offsets = out, {}

  def __call__(self, runs: Sequence[dict[str, Any]], prefix: bool = False) -> None:
    """Print the new whole lines of each run's logs, `[run name] `-prefixed if `prefix`."""
    for run in runs:
      for key in ("stdout", "stderr"):
        path = (run.get("job") or {}).get(key)
        if not path or not os.path.isfile(path):
          continue
        with open(path, "rb") as handle:
          handle.seek(self.offsets.get(path, 0))
          chunk = handle.read()
        complete = chunk.rfind(b"\n") + 1  # Whole lines only.
        if not complete:
          continue
        self.offsets[path] = self.offsets.get(path, 0) + complete
        text = chunk[:complete].decode("utf-8", errors="replace")
        if prefix:
          text = "".join(f"[{run['name']}] {line}\n" for line in text.splitlines())
        self.out.write(text)
      self.out.flush()


# --- running ----------------------------------------------------------------------------------
def _driver_alive(driver: dict[str, Any] | None) -> bool:
  """Whether another live process on this machine is driving the sweep (see run_sweep)."""
  if not driver or driver.get("pid") == os.getpid() or driver.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(driver["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _finish(run: dict[str, Any], root: str, out) -> None:
  """Record how a run's ended job went: done, failed (with its error) or interrupted."""
  record = run["job"]
  record["state"] = job_state(record) or "UNKNOWN"
  run["finished"] = _now()
  if run_finished(root, run["name"]):
    run.update(status="done", error=None, log_tail=None)
    print(f"{run['name']}: done (job {record['job_id']})", file=out, flush=True)
    return
  errors, complete = job_errors(record)
  tail = log_tail(record.get("stderr")) or log_tail(record.get("stdout"))
  if errors:
    status, error = "failed", errors[0].strip().splitlines()[-1]
    tail = "\n".join(errors[0].strip().splitlines()[-30:])
  elif complete:
    status, error = "failed", f"the job ended without {RUN_RESULTS} in {run['workdir']}"
  elif record["state"].upper() in FAILED_STATES:
    status, error = "failed", f"SLURM state {record['state']}"
  elif record["executor"] == "local":
    status, error = "interrupted", "the job ended without a result (killed, or it crashed)"
  else:
    status, error = "interrupted", f"the job ended without a result (state {record['state']})"
  run.update(status=status, error=error, log_tail=tail)
  print(f"{run['name']}: {status.upper()} (job {record['job_id']}): {error}; last lines:\n"
        + "\n".join("    " + line for line in tail.splitlines()[-10:]), file=out, flush=True)


def run_sweep(root: str, specs: Sequence[RunSpec], options: ExecutorOptions | None = None, *,
              job_fn: Callable | None = None, force_replan: bool = False, wait: bool = True,
              max_running: int | None = None, poll_s: float | None = None,
              follow: bool = True, out=None) -> dict[str, Any]:
  """Submit every unfinished run of the sweep as a submitit job, keeping sweep.json up to date.

  Runs whose jobs are still queued or running (from an earlier command) are polled, not
  submitted again; pending, failed and interrupted runs are submitted, at most `max_running`
  in flight (default: 1 for the local executor, all for SLURM; 0 = no limit). With `wait`,
  returns once every job has ended (echoing their logs if `follow`); else right after
  submitting. `job_fn(config, overrides, workdir, multihost)` is what each job runs (RunJob).
  While it waits, sweep.json names this process as the root's driver; a second command on the
  same root is refused while that process lives (it would submit the same runs again).
  """
  out = out or sys.stdout
  options = options or ExecutorOptions()
  job_fn = job_fn or default_job()
  if max_running is None:
    max_running = 1 if options.kind == "local" else 0
  if poll_s is None:
    poll_s = 2.0 if options.kind == "local" else 30.0
  path = os.path.join(root, SWEEP_FILE)
  driver = read_json(path).get("driver") if os.path.isfile(path) else None
  if _driver_alive(driver):
    raise SweepBusyError(f"process {driver['pid']} on {driver['host']} has been driving the "
                         f"sweep in {root} since {driver['since']}; wait for it or stop it")
  os.makedirs(root, exist_ok=True)
  state = prepare(root, specs, force_replan=force_replan, out=out)
  state["driver"] = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
  write_json(path, state)
  by_name = {spec.name: spec for spec in specs}
  runs = state["runs"]
  in_flight = [run for run in runs if run["status"] == "running"]
  refresh_slurm_states([run["job"] for run in in_flight])
  for run in in_flight:  # Jobs of an earlier command: collect those that have ended.
    if job_state(run["job"]) is not None:
      _finish(run, root, out)
  in_flight = [run for run in runs if run["status"] == "running"]
  todo = [run for run in runs if run["status"] in ("pending", "failed", "interrupted")]
  print(f"sweep {root}: {len(runs)} runs, {sum(r['status'] == 'done' for r in runs)} done, "
        f"{len(in_flight)} running, {len(todo)} to submit ({options.kind} executor)", file=out,
        flush=True)
  write_json(path, state)
  follower = LogFollower(out) if follow else None
  submitted = 0
  try:
    while True:
      while todo and (max_running <= 0 or len(in_flight) < max_running):
        run = todo.pop(0)
        workdir = os.path.abspath(os.path.join(root, run["workdir"]))
        os.makedirs(workdir, exist_ok=True)
        resuming = os.path.isdir(os.path.join(workdir, "train"))
        if run["job"]:
          run["previous_jobs"].append({**run["job"], "status": run["status"],
                                       "error": run.get("error")})
        run.update(job=submit(options, job_fn, by_name[run["name"]], workdir),
                   status="running", attempts=run["attempts"] + 1, submitted=_now(),
                   finished=None, error=None, log_tail=None)
        submitted += 1
        in_flight.append(run)
        write_json(path, state)
        print(f"[{submitted}] submitted {run['name']}{' (resuming)' if resuming else ''}: "
              f"{options.kind} job {run['job']['job_id']}, logs {run['job']['log_folder']}",
              file=out, flush=True)
      if not wait or not in_flight:
        break
      time.sleep(poll_s)
      refresh_slurm_states([run["job"] for run in in_flight])
      ended = [run for run in in_flight if job_state(run["job"]) is not None]
      if follower:  # After the poll: an ended job's last lines are echoed too.
        follower(in_flight, prefix=len(in_flight) > 1)
      for run in ended:
        _finish(run, root, out)
        in_flight.remove(run)
      if ended:
        write_json(path, state)
  except KeyboardInterrupt:
    for run in in_flight:
      if run["job"]["executor"] == "local":
        cancel(run["job"])
        run.update(status="interrupted", finished=_now(), error="cancelled (Ctrl-C)")
    raise
  finally:
    state.pop("driver", None)
    write_json(path, state)
  return state


# --- results ----------------------------------------------------------------------------------
def collect_results(root: str, state: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per run: status, job and, when finished, its per-exit results."""
  rows = []
  for run in state["runs"]:
    path = os.path.join(root, run["workdir"], RUN_RESULTS)
    results = read_json(path) if os.path.isfile(path) else None
    job = run.get("job") or {}
    row = {"name": run["name"], "config": run["config"], "set": run["set"],
           "status": run["status"], "error": run.get("error"), "attempts": run["attempts"],
           "job_id": job.get("job_id"), "log_folder": job.get("log_folder"),
           "results": results}
    if results:
      results = sorted(results, key=lambda entry: entry["exit"])
      row.update(last_exit_si_snri_db=results[-1]["si_snri_db"],
                 si_snri_db=[entry["si_snri_db"] for entry in results],
                 gmac_per_s=[entry["gmac_per_s"] for entry in results],
                 params=[entry["params"] for entry in results])
    rows.append(row)
  return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
  """The sweep table: run, status, job, last-exit SI-SNRi (dB), GMAC/s per exit."""
  width = max([len("run")] + [len(row["name"]) for row in rows])
  job_width = max([len("job")] + [len(str(row.get("job_id") or "-")) for row in rows])
  lines = [f"{'run':<{width}}  {'status':<11} {'job':<{job_width}} {'SI-SNRi last (dB)':>17}  "
           "GMAC/s per exit"]
  for row in rows:
    if row.get("gmac_per_s"):
      si_snri = f"{row['last_exit_si_snri_db']:>17.2f}"
      gmacs = " ".join(f"{value:.3f}" for value in row["gmac_per_s"])
    else:
      si_snri, gmacs = f"{'-':>17}", "-"
    lines.append(f"{row['name']:<{width}}  {row['status']:<11} "
                 f"{str(row.get('job_id') or '-'):<{job_width}} {si_snri}  {gmacs}")
  return "\n".join(lines)


def write_results(root: str, state: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
  rows = collect_results(root, state)
  path = os.path.join(root, RESULTS_FILE)
  write_json(path, {"root": os.path.abspath(root), "written": _now(), "runs": rows})
  return path, rows


def dry_run(root: str, specs: Sequence[RunSpec], force_replan: bool = False,
            out=None) -> dict[str, Any]:
  """Print what a sweep would do (and check its plan); writes and submits nothing."""
  out = out or sys.stdout
  state = prepare(root, specs, force_replan=force_replan, dry_run=True, out=out)
  by_name = {spec.name: spec for spec in specs}
  print(f"[dry run] sweep {root}: {len(specs)} runs", file=out)
  for run in state["runs"]:
    workdir = os.path.abspath(os.path.join(root, run["workdir"]))
    job = run.get("job") or {}
    if run["status"] == "done":
      action = "skip (done)"
    elif run["status"] == "running":
      ended = job_state(job) is not None
      action = f"{'collect (ended)' if ended else 'poll (running)'}: {job['executor']} job " + (
          f"{job['job_id']}, logs {job['log_folder']}")
    elif os.path.isdir(os.path.join(workdir, "train")):
      action = f"resubmit, resuming ({run['status']})"
    else:
      action = "submit"
    print(f"  {run['name']}: {action}\n    "
          + shlex.join(by_name[run["name"]].command(workdir)), file=out)
  print("\n" + format_summary(collect_results(root, state)), file=out)
  return state


def tpu_command(spec: RunSpec, workdir: str, tpu: str | None, zone: str | None,
                repo: str) -> str:
  """The one command that runs `spec` on every worker of a TPU pod (one JAX process each).

  PRESS_AUTO_DISTRIBUTED=1: every worker calls jax.distributed.initialize() with no arguments,
  which finds the pod's workers itself. `workdir` must be on storage every worker sees.
  """
  remote = (f"cd {repo} && PRESS_AUTO_DISTRIBUTED=1 "
            + shlex.join(spec.command(workdir, python="python")))
  return (f"gcloud compute tpus tpu-vm ssh {shlex.quote(tpu) if tpu else '$TPU_NAME'} "
          f"--zone {shlex.quote(zone) if zone else '$ZONE'} --worker=all "
          f"--command={shlex.quote(remote)}")


def print_commands(root: str, specs: Sequence[RunSpec], tpu: str | None = None,
                   zone: str | None = None, repo: str | None = None,
                   force_replan: bool = False, out=None) -> dict[str, Any]:
  """Print each run's TPU-pod command (checking the plan); writes and submits nothing."""
  out = out or sys.stdout
  state = prepare(root, specs, force_replan=force_replan, dry_run=True, out=out)
  by_name = {spec.name: spec for spec in specs}
  print(f"# sweep {root}: {len(specs)} runs, one command each, run from a machine with gcloud; "
        "every TPU worker must see the work directories", file=out)
  for run in state["runs"]:
    print(f"# {run['name']} ({run['status']})\n" + tpu_command(
        by_name[run["name"]], os.path.join(root, run["workdir"]), tpu, zone,
        repo or _REPO_ROOT), file=out)
  return state


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog="ablations: " + ", ".join([BASE_ABLATION] + sorted(configs.ABLATIONS)))
  parser.add_argument("--config", required=True,
                      help=f"the base config: a name ({', '.join(configs.BASES)}) or a config "
                      "file; --config.FIELD.PATH=VALUE overrides it for every run (repeatable)")
  parser.add_argument("--sweep", help="a sweep declared by the config file's get_sweep(NAME): "
                      "its ablations and grid, before --ablations and --grid")
  parser.add_argument("--ablations", default="",
                      help="comma-separated ablation names ('base' = none); default: the base")
  parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                      help="a grid axis (repeatable; the runs are the product of the axes)")
  parser.add_argument("--root", default=os.path.join("runs", "sweep"))
  parser.add_argument("--dry-run", action="store_true", help="print the plan; submit nothing")
  parser.add_argument("--force-replan", action="store_true",
                      help="accept a plan that differs from the root's sweep.json")
  parser.add_argument("--quiet", action="store_true", help="do not echo the jobs' output")
  jobs = parser.add_argument_group("jobs (submitit)")
  jobs.add_argument("--executor", choices=EXECUTORS, default="local",
                    help="local: this machine (default); slurm: one SLURM job per run")
  jobs.add_argument("--max-running", type=int, default=None, metavar="N",
                    help="runs in flight at once (default 1 local, all on SLURM; 0: no limit)")
  jobs.add_argument("--no-wait", action="store_true",
                    help="submit and return; run the same command again to collect")
  jobs.add_argument("--poll-s", type=float, default=None,
                    help="seconds between polls (default 2 local, 30 SLURM)")
  jobs.add_argument("--time-min", type=int, default=None,
                    help=f"time limit per job in minutes (default: none local, "
                    f"{SLURM_TIME_MIN} SLURM; submitit requeues a timed-out SLURM job)")
  jobs.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (local: of the visible ones, default all)")
  slurm = parser.add_argument_group("SLURM (--executor slurm)")
  slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
  slurm.add_argument("--tasks-per-node", type=int, default=None,
                     help="processes per node (default: one per GPU, JAX's SLURM convention)")
  slurm.add_argument("--partition")
  slurm.add_argument("--cpus-per-task", type=int, default=None)
  slurm.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                     help="any other sbatch option, e.g. account=proj, qos=high, mem=64G, "
                     "constraint=a100, exclusive (repeatable)")
  slurm.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                     help="a shell line the job runs before its tasks, e.g. 'source "
                     ".venv/bin/activate' (repeatable)")
  tpu = parser.add_argument_group("TPU pods (--print-commands)")
  tpu.add_argument("--print-commands", action="store_true",
                   help="print each run's gcloud command for a TPU pod; submit nothing")
  tpu.add_argument("--tpu", help="the TPU VM's name (default: $TPU_NAME in the command)")
  tpu.add_argument("--zone", help="its zone (default: $ZONE in the command)")
  tpu.add_argument("--repo", help=f"this repository on the TPU workers (default {_REPO_ROOT})")
  config_args, rest = configs.split_config_args(sys.argv[1:] if argv is None else argv)
  try:
    base, sets = configs.config_args_to_spec(config_args, None)
  except ValueError as error:
    parser.error(str(error))
  args = parser.parse_args(rest + (["--config", base] if base else []))
  try:
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    grid = list(args.grid)
    if args.sweep:
      declared = declared_sweep(base, args.sweep)
      ablations = list(declared.get("ablations", ())) + ablations
      grid = list(declared.get("grid", ())) + grid
    specs = expand(base, ablations, grid, sets)
    if args.print_commands:
      print_commands(args.root, specs, args.tpu, args.zone, args.repo, args.force_replan)
      return 0
    if args.dry_run:
      dry_run(args.root, specs, args.force_replan)
      return 0
    options = ExecutorOptions(
        kind=args.executor, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node, partition=args.partition, time_min=args.time_min,
        cpus_per_task=args.cpus_per_task, slurm_extra=parse_extra(args.slurm_extra),
        setup=tuple(args.slurm_setup))
    state = run_sweep(args.root, specs, options, force_replan=args.force_replan,
                      wait=not args.no_wait, max_running=args.max_running, poll_s=args.poll_s,
                      follow=not args.quiet)
  except ValueError as error:  # Bad grid, unknown config or field, changed plan, busy root.
    print(f"sweep: error: {error}", file=sys.stderr)
    return 2
  except (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError) as error:
    print(f"sweep: error: a submission failed: {error}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("sweep: KeyboardInterrupt: local jobs were cancelled and marked 'interrupted', SLURM "
          "jobs left running; re-run the same command to resume or collect", file=sys.stderr)
    return 130
  path, rows = write_results(args.root, state)
  print("\n" + format_summary(rows) + f"\n\nresults: {path}\nstate:   "
        f"{os.path.join(args.root, SWEEP_FILE)}")
  failed = [row["name"] for row in rows if row["status"] in ("failed", "interrupted")]
  running = [row["name"] for row in rows if row["status"] == "running"]
  if failed:
    print(f"{len(failed)} run(s) failed or interrupted: {', '.join(failed)}; re-run the same "
          "command to resubmit them (they resume from their checkpoints).")
  if running:
    print(f"{len(running)} run(s) still running: {', '.join(running)}; re-run the same "
          "command to collect them.")
  return 1 if failed else 3 if running else 0


if __name__ == "__main__":
  sys.exit(main())
