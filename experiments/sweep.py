"""Sweeps: a grid of experiments, one work directory per run, resumable.

Run:
  python -m experiments.sweep --base tiny --ablations base,loss_gaussian --grid train.seed=0,1 \
      --root runs/sweep [--set FIELD=VALUE ...] [--dry-run] [--force-replan] [--jobs 1]
  python -m experiments.sweep --base S --ablations exits_4,exits_6,exits_12 --root runs/exits
Expected (first command): four runs, tiny__train.seed=0, tiny__train.seed=1,
tiny__loss_gaussian__train.seed=0, tiny__loss_gaussian__train.seed=1, one after the other, each
`python -m experiments.main --config tiny/loss_gaussian --workdir
runs/sweep/tiny__loss_gaussian__train.seed=0 --set train.seed=0` in a fresh subprocess (output
in <run>/log.txt and echoed), a few minutes each on 2 CPU cores; then a table of run, status,
last-exit SI-SNRi (dB) and GMAC/s per exit, also written to runs/sweep/sweep_results.json.
runs/sweep/sweep.json holds the plan and each run's status (pending, running, done, failed with
its exit code and log tail, interrupted). Running the same command again skips runs that have a
results.json and relaunches the others, whose stages resume from their checkpoints. A different
plan (runs added or removed, any resolved config field changed) is refused unless
--force-replan; the changed runs' old directories are then moved to <root>/_replaced/.
Exit status: 0 when every run is done, 1 when some failed, 2 for a bad or changed plan.

Grid values are split on commas outside brackets and quotes, and parsed like --set values (JSON,
bare words are strings): --grid 'policy.target_dbs=[0,10],[0,20]' gives two runs. The ablation
name 'base' stands for the base config itself. --set assignments apply in order before the grid
(set train.optimizer.warmup_steps and total_steps before lowering train.steps).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence

from experiments import configs

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "sweep_results.json"
LOG_FILE = "log.txt"
RUN_RESULTS = "results.json"  # Written by experiments.main when a run has finished.
BASE_ABLATION = "base"
MAX_NAME_LENGTH = 150
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Runner = Callable[["RunSpec", str, str], int]  # (spec, workdir, log path) -> exit code.


class PlanChangedError(ValueError):
  """The plan of an existing sweep differs from the requested one."""


class SweepBusyError(ValueError):
  """Another process is running a sweep in the same root."""


class Terminated(BaseException):
  """The sweep received SIGTERM (raised like KeyboardInterrupt, so the running run is stopped)."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated()


@contextlib.contextmanager
def exclusive(root: str):
  """Hold <root>/.sweep.lock (released when the process ends, however it ends)."""
  with open(os.path.join(root, ".sweep.lock"), "w") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise SweepBusyError(f"another process is running the sweep in {root}") from None
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep: a named config plus --set overrides."""

  name: str
  config: str  # A name for experiments.configs.get, e.g. 'tiny/exits_4'.
  overrides: tuple[str, ...] = ()  # 'field.path=value', the sweep's --set first, then the grid.

  def experiment(self) -> configs.ExperimentConfig:
    """The resolved config; its model and loss are built too, so a bad run fails here."""
    try:
      experiment = configs.override(configs.get(self.config), list(self.overrides))
      experiment.train.model_config()
      experiment.train.loss_config()
    except (ValueError, TypeError) as error:
      raise ValueError(f"run {self.name}: {error}") from error
    return experiment

  def command(self, workdir: str, python: str = sys.executable) -> list[str]:
    command = [python, "-m", "experiments.main", "--config", self.config, "--workdir", workdir]
    for assignment in self.overrides:
      command += ["--set", assignment]
    return command


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
  if "/" in base:
    raise ValueError(f"--base {base!r}: give the ablation with --ablations, not in the base")
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
          name=run_name(base, ablation, assignments),
          config=f"{base}/{ablation}" if ablation else base,
          overrides=tuple(sets) + tuple(assignments)))
  names = [spec.name for spec in specs]
  if len(set(names)) != len(names):  # Values differing only in unsafe characters.
    specs = [dataclasses.replace(spec, name=spec.name + "-" + _short_hash(
        spec.config + "|" + "|".join(spec.overrides))) for spec in specs]
  return specs


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

  A run's status is refreshed from its directory: 'done' iff its results.json exists.
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
             "exit_code": previous.get("exit_code"), "attempts": previous.get("attempts", 0),
             "started": previous.get("started"), "finished": previous.get("finished"),
             "log_tail": previous.get("log_tail")}
    if run_finished(root, name) and not (dry_run and name in replaced):
      entry["status"] = "done"
    elif entry["status"] == "done":  # results.json deleted since: run it again.
      entry["status"] = "pending"
    runs.append(entry)
  return {"version": 1, "root": os.path.abspath(root),
          "created": old_state["created"] if old_state and not differences else _now(),
          "runs": runs}


# --- running ----------------------------------------------------------------------------------
def log_tail(path: str, lines: int = 30, characters: int = 4000) -> str:
  """The last `lines` lines (at most `characters`) of a log file."""
  if not os.path.isfile(path):
    return ""
  with open(path, "rb") as handle:
    handle.seek(max(0, os.path.getsize(path) - 64 * 1024))
    text = handle.read().decode("utf-8", errors="replace")
  text = text.replace("\r", "\n")
  tail = "\n".join(line for line in text.splitlines() if line.strip())
  return "\n".join(tail.splitlines()[-lines:])[-characters:]


class SubprocessRunner:
  """Runs `python -m experiments.main` for a run; its output goes to the log (and the terminal)."""

  def __init__(self, stream: bool = True, python: str = sys.executable):
    self.stream, self.python = stream, python

  def __call__(self, spec: RunSpec, workdir: str, log_path: str) -> int:
    command = spec.command(workdir, self.python)
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment["PYTHONPATH"] = os.pathsep.join(
        [_REPO_ROOT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(log_path, "ab") as log:
      log.write(f"=== {_now()} {subprocess.list2cmdline(command)}\n".encode())
      log.flush()
      process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=environment)
      try:
        while chunk := process.stdout.read1(65536):
          log.write(chunk)
          log.flush()
          if self.stream:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return process.wait()
      except BaseException:  # KeyboardInterrupt: stop the run before leaving.
        process.terminate()
        try:
          process.wait(timeout=30)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()
        raise


def run_sweep(root: str, specs: Sequence[RunSpec], runner: Runner | None = None, *,
              force_replan: bool = False, jobs: int = 1, out=None) -> dict[str, Any]:
  """Run every unfinished run of the sweep (resuming), keeping sweep.json up to date."""
  out = out or sys.stdout
  os.makedirs(root, exist_ok=True)
  with exclusive(root):
    return _run_locked(root, specs, runner or SubprocessRunner(stream=jobs == 1),
                       force_replan, jobs, out)


def _run_locked(root, specs, runner, force_replan, jobs, out) -> dict[str, Any]:
  state = prepare(root, specs, force_replan=force_replan, out=out)
  path = os.path.join(root, SWEEP_FILE)
  lock = threading.Lock()
  write_json(path, state)
  by_name = {spec.name: spec for spec in specs}
  todo = [run for run in state["runs"] if run["status"] != "done"]
  done = len(state["runs"]) - len(todo)
  print(f"sweep {root}: {len(state['runs'])} runs, {done} done, {len(todo)} to run", file=out,
        flush=True)

  def update(run, **changes):
    with lock:
      run.update(changes)
      write_json(path, state)

  def execute(index_and_run):
    index, run = index_and_run
    workdir = os.path.abspath(os.path.join(root, run["workdir"]))
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, LOG_FILE)
    resuming = " (resuming)" if os.path.isdir(os.path.join(workdir, "train")) else ""
    print(f"[{index}/{len(todo)}] {run['name']}{resuming}: log {log_path}", file=out, flush=True)
    update(run, status="running", started=_now(), finished=None, exit_code=None,
           attempts=run["attempts"] + 1)
    try:
      exit_code = runner(by_name[run["name"]], workdir, log_path)
    except BaseException:
      update(run, status="interrupted", finished=_now(), log_tail=log_tail(log_path))
      raise
    if exit_code == 0 and run_finished(root, run["name"]):
      update(run, status="done", exit_code=0, finished=_now(), log_tail=None)
    else:
      tail = log_tail(log_path)
      if exit_code == 0:
        tail += f"\n(exit code 0 but no {RUN_RESULTS} in {workdir})"
      update(run, status="failed", exit_code=exit_code, finished=_now(), log_tail=tail)
      print(f"[{index}/{len(todo)}] {run['name']} FAILED (exit {exit_code}); last lines:\n"
            + "\n".join("    " + line for line in tail.splitlines()[-10:]), file=out,
            flush=True)
    return run

  numbered = list(enumerate(todo, start=1))
  if jobs <= 1:
    for item in numbered:
      execute(item)
  else:
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
      for future in concurrent.futures.as_completed([pool.submit(execute, i) for i in numbered]):
        future.result()
  return state


# --- results ----------------------------------------------------------------------------------
def collect_results(root: str, state: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per run: status and, when finished, its per-exit results."""
  rows = []
  for run in state["runs"]:
    path = os.path.join(root, run["workdir"], RUN_RESULTS)
    results = read_json(path) if os.path.isfile(path) else None
    row = {"name": run["name"], "config": run["config"], "set": run["set"],
           "status": run["status"], "exit_code": run.get("exit_code"), "results": results}
    if results:
      results = sorted(results, key=lambda entry: entry["exit"])
      row.update(last_exit_si_snri_db=results[-1]["si_snri_db"],
                 si_snri_db=[entry["si_snri_db"] for entry in results],
                 gmac_per_s=[entry["gmac_per_s"] for entry in results],
                 params=[entry["params"] for entry in results])
    rows.append(row)
  return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
  """The sweep table: run, status, last-exit SI-SNRi (dB), GMAC/s per exit."""
  width = max([len("run")] + [len(row["name"]) for row in rows])
  lines = [f"{'run':<{width}}  {'status':<11} {'SI-SNRi last (dB)':>17}  GMAC/s per exit"]
  for row in rows:
    status = row["status"] + (f" ({row['exit_code']})" if row["status"] == "failed" else "")
    if row.get("gmac_per_s"):
      si_snri = f"{row['last_exit_si_snri_db']:>17.2f}"
      gmacs = " ".join(f"{value:.3f}" for value in row["gmac_per_s"])
    else:
      si_snri, gmacs = f"{'-':>17}", "-"
    lines.append(f"{row['name']:<{width}}  {status:<11} {si_snri}  {gmacs}")
  return "\n".join(lines)


def write_results(root: str, state: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
  rows = collect_results(root, state)
  path = os.path.join(root, RESULTS_FILE)
  write_json(path, {"root": os.path.abspath(root), "written": _now(), "runs": rows})
  return path, rows


def dry_run(root: str, specs: Sequence[RunSpec], force_replan: bool = False,
            out=None) -> dict[str, Any]:
  """Print what a sweep would do (and check its plan); writes nothing."""
  out = out or sys.stdout
  state = prepare(root, specs, force_replan=force_replan, dry_run=True, out=out)
  by_name = {spec.name: spec for spec in specs}
  print(f"[dry run] sweep {root}: {len(specs)} runs", file=out)
  for run in state["runs"]:
    workdir = os.path.abspath(os.path.join(root, run["workdir"]))
    if run["status"] == "done":
      action = "skip (done)"
    elif os.path.isdir(os.path.join(workdir, "train")):
      action = f"resume ({run['status']})"
    else:
      action = "run"
    print(f"  {run['name']}: {action}\n    "
          + subprocess.list2cmdline(by_name[run["name"]].command(workdir)), file=out)
  return state


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog="ablations: " + ", ".join([BASE_ABLATION] + sorted(configs.ABLATIONS)))
  parser.add_argument("--base", required=True, help=f"one of {sorted(configs.BASES)}")
  parser.add_argument("--ablations", default="",
                      help="comma-separated ablation names ('base' = none); default: the base")
  parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                      help="a grid axis (repeatable; the runs are the product of the axes)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="an override for every run (repeatable)")
  parser.add_argument("--root", default=os.path.join("runs", "sweep"))
  parser.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
  parser.add_argument("--force-replan", action="store_true",
                      help="accept a plan that differs from the root's sweep.json")
  parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1)")
  parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output")
  args = parser.parse_args(argv)
  previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    return _main(args)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)


def _main(args: argparse.Namespace) -> int:
  try:
    specs = expand(args.base, [a.strip() for a in args.ablations.split(",") if a.strip()],
                   args.grid, args.set)
    if args.dry_run:
      dry_run(args.root, specs, args.force_replan)
      return 0
    runner = SubprocessRunner(stream=args.jobs == 1 and not args.quiet)
    state = run_sweep(args.root, specs, runner, force_replan=args.force_replan, jobs=args.jobs)
  except ValueError as error:  # Bad grid, unknown config or field, changed plan.
    print(f"sweep: error: {error}", file=sys.stderr)
    return 2
  except (KeyboardInterrupt, Terminated) as error:
    print(f"sweep: {type(error).__name__}: the running run was stopped and marked "
          "'interrupted'; re-run the same command to resume", file=sys.stderr)
    return 130 if isinstance(error, KeyboardInterrupt) else 143
  path, rows = write_results(args.root, state)
  print("\n" + format_summary(rows) + f"\n\nresults: {path}\nstate:   "
        f"{os.path.join(args.root, SWEEP_FILE)}")
  failed = [row["name"] for row in rows if row["status"] != "done"]
  if failed:
    print(f"{len(failed)} run(s) not done: {', '.join(failed)}; re-run the same command to "
          "retry them (they resume from their checkpoints).")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
