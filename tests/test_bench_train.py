"""bench_train: the driver and its output, and (slow) a real tiny run in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from experiments import bench_train

KEYS = {"preset", "devices", "batch_per_device", "crop_seconds", "examples_per_s", "step_s",
        "gflop_per_step", "gflop_per_s", "flops_method"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_row(devices, unrolled):
  step_s = 0.5 * devices
  return {"preset": "tiny", "devices": devices, "batch_per_device": 1, "crop_seconds": 0.25,
          "remat": False, "memory_gib_per_device": 0.1,
          "examples_per_s": devices / step_s, "step_s": step_s, "step_s_min": step_s,
          "step_times_s": [step_s], "steps_timed": 1, "warmup_steps": 0,
          "gflop_per_step": 2.0 * devices, "gflop_per_s": 2.0 * devices / step_s,
          "flops_method": "unrolled", "xla_gflop_per_device_scanned": 1.0,
          "xla_gflop_per_device_unrolled": 2.0 if unrolled is None else unrolled / 1e9,
          "analytic_forward_gflop_per_example": 0.5, "compile_s": 1.0,
          "unrolled_compile_s": None, "loss": 0.0, "platform": "cpu", "jax": "0"}


def test_device_environment_replaces_the_count():
  environment = bench_train.device_environment(4, {
      "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", "PATH": "/bin"})
  assert environment["XLA_FLAGS"] == (
      "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4")
  assert environment["JAX_PLATFORMS"] == "cpu" and environment["PATH"] == "/bin"


def test_driver_counts_unrolled_flops_once(monkeypatch, capsys):
  seen = []

  def run_configuration(args, devices, unrolled_flops):
    seen.append((devices, unrolled_flops))
    return fake_row(devices, unrolled_flops)

  monkeypatch.setattr(bench_train, "run_configuration", run_configuration)
  bench_train.main(["--preset", "tiny", "--devices", "1", "2", "4", "--json"])
  assert seen == [(1, None), (2, 2e9), (4, 2e9)]
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [row["devices"] for row in rows] == [1, 2, 4]
  assert all(KEYS <= row.keys() for row in rows)

  bench_train.main(["--preset", "tiny", "--devices", "1", "2"])
  table = capsys.readouterr().out
  assert "scan_unroll=True" in table and "2.00x" in table
  assert table.splitlines()[2].split()[:3] == ["1", "0.50", "2.000"]


def test_driver_reports_failed_configurations(monkeypatch, capsys):
  def run_configuration(args, devices, unrolled_flops):
    if devices == 4:
      return {"preset": "tiny", "devices": 4, "batch_per_device": 1, "crop_seconds": 0.25,
              "remat": False, "error": "needs 38.3 GiB"}
    return fake_row(devices, unrolled_flops)

  monkeypatch.setattr(bench_train, "run_configuration", run_configuration)
  assert bench_train.main(["--preset", "tiny", "--devices", "1", "4"]) == 1
  table = capsys.readouterr().out
  assert "      4 failed: needs 38.3 GiB" in table and "GFLOP/step" in table


def run_tiny(*extra):
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--preset", "tiny", "--devices", "1",
       "--steps", "1", "--crop-seconds", "0.25", "--json", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-2000:]
  row = json.loads(completed.stdout.strip().splitlines()[-1])
  assert KEYS <= row.keys()
  assert (row["preset"], row["devices"], row["batch_per_device"], row["crop_seconds"]) == (
      "tiny", 1, 1, 0.25)
  assert row["step_s"] > 0 and row["examples_per_s"] == pytest.approx(1 / row["step_s"])
  assert row["gflop_per_step"] > 0
  assert row["gflop_per_s"] == pytest.approx(row["gflop_per_step"] / row["step_s"])
  return row


def test_tiny_run_in_subprocess_scanned_flops():
  """~30 s: one compile of the tiny train step (no scan-unrolled recompile, no warm-up)."""
  row = run_tiny("--flops", "scanned", "--warmup", "0")
  assert row["flops_method"] == "scanned" and row["xla_gflop_per_device_unrolled"] is None


@pytest.mark.slow  # ~55 s on 2 CPU cores: compiles the tiny train step twice (scanned, unrolled).
def test_tiny_run_in_subprocess():
  row = run_tiny()
  assert row["flops_method"] == "unrolled"
  # tiny scans over one encoder block and one stage group: unrolling changes nothing.
  assert row["xla_gflop_per_device_unrolled"] == pytest.approx(
      row["xla_gflop_per_device_scanned"], rel=1e-3)
