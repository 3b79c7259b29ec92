"""Run `tests/train_worker.py` in subprocesses with N simulated CPU devices.

JAX fixes its device count when it initialises, and the pytest process has already initialised
it with one device, so every multi-device case runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=N.

Compilation dominates these tests (20-40 s per train-step program on two busy CPU cores), so:
- all workers of one pytest session (and the pytest processes themselves, see conftest.py)
  share a persistent XLA compilation cache (a temporary directory, removed at exit; set
  PRESS_JAX_TEST_XLA_CACHE to keep one): the tests reuse a few step programs (same shapes and
  optimiser) across many short runs;
- workers and the pytest processes compile with TEST_XLA_FLAGS: XLA's backend optimisation off
  (about 2.5x faster to compile, 1.5x slower to run these tiny steps) and the CPU backend's
  loop emitters instead of its fusion emitters (the tiny train step: 6.4 -> 3.1 s to compile,
  0.09 -> 0.13 s per step). Every comparison is between programs built the same way. Set
  PRESS_JAX_TEST_XLA_OPTIMIZE=1 to test with XLA's defaults instead.

Simulated devices share the machine's cores, and XLA's CPU client runs them on two thread pools
of max(cores, devices) threads (`xla/pjrt/cpu/cpu_client.cc`); a device waiting in a collective
holds a thread of one of them. On a loaded 2-core CI machine a 4-device worker once aborted in
XLA's rendezvous ("Expected 4 threads to join the rendezvous, but only 3 of them arrived" after
its 40-s termination timeout; CI of 2026-12-07). So multi-device workers get pools with spare
threads (NPROC, which XLA's DefaultThreadPoolSize reads) and COLLECTIVE_XLA_FLAGS: a straggler
has 240 s to arrive, and a true hang still fails the test by its own timeout, with the log.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, "tests", "train_worker.py")


def _cache_dir() -> str:
  if os.environ.get("PRESS_JAX_TEST_XLA_CACHE"):
    return os.environ["PRESS_JAX_TEST_XLA_CACHE"]
  directory = tempfile.mkdtemp(prefix="press_jax_xla_cache_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  # Processes started from here on (pytest-xdist workers, training workers) share it.
  os.environ["PRESS_JAX_TEST_XLA_CACHE"] = directory
  return directory


XLA_CACHE_DIR = _cache_dir()

TEST_XLA_FLAGS = ("" if os.environ.get("PRESS_JAX_TEST_XLA_OPTIMIZE") == "1" else
                  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
COLLECTIVE_XLA_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=60 "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=240")


def worker_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", TEST_XLA_FLAGS,
                          COLLECTIVE_XLA_FLAGS if devices > 1 else ""]).strip(),
      PRESS_JAX_TEST_XLA_CACHE=XLA_CACHE_DIR,
      PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      PYTHONUNBUFFERED="1")
  if devices > 1:
    env["NPROC"] = str(max(os.cpu_count() or 1, 2 * devices))
  # A worker joins a multi-process run only as its test says (flags or SLURM-style variables
  # in extra_env), not because the test session itself runs inside a SLURM job.
  for name in list(env):
    if name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "PRESS_AUTO_DISTRIBUTED") or name.startswith("SLURM_"):
      env.pop(name)
  return env


def worker_command(mode: str, spec: dict[str, Any], spec_path: str) -> list[str]:
  with open(spec_path, "w") as handle:
    json.dump(spec, handle)
  return [sys.executable, WORKER, mode, spec_path]


def start_worker(mode: str, spec: dict[str, Any], spec_path: str, devices: int,
                 log_path: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
  """Start a worker in the background (stdout and stderr to `log_path`)."""
  env = worker_env(devices)
  env.update(extra_env or {})
  log = open(log_path, "w")
  process = subprocess.Popen(worker_command(mode, spec, spec_path), cwd=REPO_ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
  log.close()
  return process


def tail(path: str, characters: int = 6000) -> str:
  with open(path, errors="replace") as handle:
    return handle.read()[-characters:]


def wait_for_workers(processes: list[subprocess.Popen], logs: list[str], timeout: float,
                     what: str) -> None:
  """Waits for every worker, asserting exit status 0 (with its log's tail).

  On a timeout the workers get SIGUSR1 first (tests/train_worker.py dumps its Python stacks
  into its log) and the assertion shows every log's tail; the workers are killed in any case.
  """
  try:
    for process, log in zip(processes, logs):
      process.wait(timeout=timeout)
      assert process.returncode == 0, tail(log)
  except subprocess.TimeoutExpired:
    for process in processes:
      if process.poll() is None:
        process.send_signal(signal.SIGUSR1)
    time.sleep(2)
    raise AssertionError(f"{what} timed out:\n" + "\n".join(tail(log, 3000) for log in logs))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()


def run_worker(mode: str, spec: dict[str, Any], workdir: str, devices: int,
               name: str = "worker", timeout: float = 300) -> dict[str, Any]:
  """Run a worker to completion; returns its result JSON (spec['result'])."""
  spec = dict(spec, result=os.path.join(workdir, f"{name}_result.json"))
  log_path = os.path.join(workdir, f"{name}.log")
  process = start_worker(mode, spec, os.path.join(workdir, f"{name}_spec.json"), devices,
                         log_path)
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    raise AssertionError(f"{name} timed out after {timeout} s:\n{tail(log_path)}")
  if process.returncode != 0:
    raise AssertionError(f"{name} failed (exit {process.returncode}):\n{tail(log_path)}")
  with open(spec["result"]) as handle:
    return json.load(handle)


def load_tree(path: str) -> dict[str, np.ndarray]:
  """A flattened tree saved by the worker ({key path: array})."""
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def flatten_tree(tree) -> dict[str, np.ndarray]:
  """{key path: array} of a pytree, keyed like the worker's files (jax.tree_util.keystr)."""
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def max_abs_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
             if a[k].size else 0.0 for k in a)


def assert_trees_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str = ""):
  assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
  different = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not different, (f"{what}: {len(different)} of {len(a)} leaves differ, max |diff| "
                         f"{max_abs_difference(a, b):.3g}; first: {different[:3]}")


def free_port() -> int:
  """A TCP port that is free on localhost right now (for an explicit coordinator address)."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


# --- SLURM-style launch ------------------------------------------------------------------------
SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX: coordinator port = job id % 4096 + this.


def slurm_job_id_with_free_port() -> int:
  """A SLURM job id whose derived coordinator port (JAX's SLURM detection) is free here."""
  for _ in range(100):
    job_id = random.randrange(10**5, 10**6)
    with socket.socket() as sock:
      try:
        sock.bind(("localhost", job_id % 2**12 + SLURM_PORT_BASE))
      except OSError:
        continue
    return job_id
  raise RuntimeError("no free port in JAX's SLURM port range")


def slurm_environment(job_id: int, process_id: int, tasks: int) -> dict[str, str]:
  """What srun sets in task `process_id` of a one-node job step (the variables JAX reads)."""
  return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
          "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": str(tasks),
          "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id)}
