"""Training throughput (examples/s, GFLOP/s) of the data-parallel train step on 1, 2, 4 devices.

Run:
  python -m experiments.bench_train                  # S preset, 4 s crops, batch 1, 1 2 4 devices
  python -m experiments.bench_train --remat          # the same with PressNet(remat=True)
  python -m experiments.bench_train --preset tiny --devices 1 --steps 1 --crop-seconds 0.25 --json

Each device count runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N, so on a CPU the N "devices" share its cores
and memory: the numbers measure data-parallel overhead, not a speed-up. Each configuration
compiles `parallel_train_step` over `data_mesh()`, runs `--warmup` steps on synthetic random
batches, then times `--steps` steps (each to completion). A configuration whose XLA buffers
(memory_analysis of the compiled step, times N) exceed 90% of the available memory is reported
as failed instead of run. GFLOP per step comes from XLA's cost analysis of the compiled step.
XLA counts the body of a while loop once, and the encoder blocks and decoder stage groups run
under nn.scan (S: 4.3x undercount), so by default the flops are those of the same step compiled
with `PressNet(config, scan_unroll=True)` (compiled once, never run); `--flops scanned` reports
XLA's raw count instead. The output says which was used.

Expected (measured 2026-11-22 on this project's 2-core CPU, 23 GiB, default command, 5 min):
  devices   step s  examples/s  GFLOP/step  GFLOP/s  compile s  GiB/device
        1    21.79       0.046       288.9     13.3       38.9        9.60
        2    30.09       0.066       577.8     19.2       31.7        9.57
        4 failed: needs 38.3 GiB (4 x 9.6 GiB of XLA buffers), 21.1 GiB available; not run
With --remat (5.5 min): 9.06 / 17.60 / 66.87 s per step on 1 / 2 / 4 devices, 42.5 / 43.7 /
23.0 GFLOP/s (384.8 GFLOP per example, recomputation included), 1.76 GiB per device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

_WORKER_FLAG = "--worker"


# --- the measurement (runs in a subprocess with N host devices) --------------------------------
def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def available_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None where there is none)."""
  try:
    with open("/proc/meminfo") as handle:
      for line in handle:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def measure(preset: str, crop_seconds: float, batch_per_device: int, steps: int, warmup: int,
            flops_method: str, unrolled_flops: float | None = None, remat: bool = False,
            seed: int = 0) -> dict:
  """Compile and time the train step on every visible device; returns one result row."""
  import jax
  import numpy as np

  from press_jax import compute, likelihoods, optim
  from press_jax import config as config_lib
  from press_jax import train_step as step_lib
  from press_jax.models.press_net import PressNet

  devices = jax.device_count()
  config = config_lib.preset(preset)
  samples = int(round(crop_seconds * config.sample_rate))
  row = {"preset": preset, "devices": devices, "batch_per_device": batch_per_device,
         "crop_seconds": crop_seconds, "remat": remat, "platform": jax.devices()[0].platform,
         "jax": jax.__version__}
  model = PressNet(config, remat=remat)
  optimizer = optim.make_optimizer(optim.OptimizerConfig(
      peak_learning_rate=5e-4, warmup_steps=10, total_steps=1000))
  loss_config = likelihoods.LossConfig(block_length=config.block_length)
  mesh = step_lib.data_mesh()
  step_arguments = dict(loss_config=loss_config, optimizer=optimizer)
  # Parameters and optimiser state made by one compiled function, placed replicated.
  state = jax.jit(lambda: step_lib.create_train_state(model, optimizer, seed),
                  out_shardings=step_lib.replicated(mesh))()

  rng = np.random.default_rng(seed)

  def synthetic_batch():
    sources = 0.1 * rng.standard_normal(
        (devices, batch_per_device, config.speakers, samples)).astype(np.float32)
    return {"mixture": sources.sum(2), "sources": sources,
            "mask": np.ones((devices, batch_per_device, samples), np.float32)}

  batches = [synthetic_batch() for _ in range(2)]
  step_fn = step_lib.parallel_train_step(mesh, model=model, **step_arguments)
  started = time.perf_counter()
  compiled = step_fn.lower(state, step_lib.global_batch(mesh, batches[0])).compile()
  row["compile_s"] = time.perf_counter() - started
  scanned_flops = _flops(compiled)
  memory = compiled.memory_analysis()
  per_device = memory.temp_size_in_bytes + memory.argument_size_in_bytes + (
      memory.output_size_in_bytes)
  row["memory_gib_per_device"] = per_device / 2**30
  available = available_bytes()
  if available is not None and per_device * devices > 0.9 * available:
    return {**row, "error": f"needs {per_device * devices / 2**30:.1f} GiB ({devices} x "
                            f"{per_device / 2**30:.1f} GiB of XLA buffers), "
                            f"{available / 2**30:.1f} GiB available; not run"}

  def run_step(index):
    nonlocal state
    state, metrics = compiled(state, step_lib.global_batch(mesh, batches[index % 2]))
    jax.block_until_ready((state, metrics))
    return metrics

  for index in range(warmup):
    run_step(index)
  times = []
  for index in range(steps):
    started = time.perf_counter()
    metrics = run_step(warmup + index)
    times.append(time.perf_counter() - started)
  row["loss"] = float(jax.device_get(metrics["loss"]))

  if flops_method == "unrolled" and unrolled_flops is None:
    unrolled_fn = step_lib.parallel_train_step(
        mesh, model=PressNet(config, scan_unroll=True, remat=remat), **step_arguments)
    started = time.perf_counter()
    unrolled_flops = _flops(unrolled_fn.lower(
        state, step_lib.global_batch(mesh, batches[0])).compile())
    row["unrolled_compile_s"] = time.perf_counter() - started
  # XLA analyses the per-device (SPMD-partitioned) program: one device's shard of the batch.
  flops_per_device = unrolled_flops if flops_method == "unrolled" else scanned_flops
  step_s = sum(times) / len(times)
  gflop_per_step = flops_per_device * devices / 1e9
  forward_gmac = compute.gmac_per_second(config, config.exits, all_heads=True)
  return {
      **row, "examples_per_s": devices * batch_per_device / step_s,
      "step_s": step_s, "step_s_min": min(times), "step_times_s": times, "steps_timed": steps,
      "warmup_steps": warmup, "gflop_per_step": gflop_per_step,
      "gflop_per_s": gflop_per_step / step_s, "flops_method": flops_method,
      "xla_gflop_per_device_scanned": scanned_flops / 1e9,
      "xla_gflop_per_device_unrolled": (unrolled_flops / 1e9 if unrolled_flops is not None
                                        else None),
      # 2 x analytic forward MACs (all heads) of one example: a train step is ~3x this.
      "analytic_forward_gflop_per_example": 2 * forward_gmac * crop_seconds * batch_per_device}


# --- the driver: one subprocess per device count ----------------------------------------------
def device_environment(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """os.environ with XLA_FLAGS forcing `devices` host devices (other XLA flags kept)."""
  environment = dict(os.environ if base is None else base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 environment.get("XLA_FLAGS", "")).split()
  environment["XLA_FLAGS"] = " ".join(flags + [
      f"--xla_force_host_platform_device_count={devices}"])
  environment.setdefault("JAX_PLATFORMS", "cpu")
  return environment


def run_configuration(args: argparse.Namespace, devices: int,
                      unrolled_flops: float | None) -> dict:
  """One device count in a fresh interpreter; its result row, with 'error' if it failed."""
  command = [sys.executable, "-m", "experiments.bench_train", _WORKER_FLAG,
             "--preset", args.preset, "--crop-seconds", str(args.crop_seconds),
             "--batch-per-device", str(args.batch_per_device), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--flops", args.flops]
  if args.remat:
    command.append("--remat")
  if unrolled_flops is not None:
    command += ["--unrolled-flops", repr(unrolled_flops)]
  failed = {"preset": args.preset, "devices": devices, "batch_per_device": args.batch_per_device,
            "crop_seconds": args.crop_seconds, "remat": args.remat}
  try:
    completed = subprocess.run(command, env=device_environment(devices), capture_output=True,
                               text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {**failed, "error": f"timed out after {args.timeout:g} s (--timeout)"}
  rows = [line for line in completed.stdout.splitlines() if line.startswith("{")]
  if completed.returncode != 0 or not rows:
    killed = " (SIGKILL: probably out of memory)" if completed.returncode == -9 else ""
    return {**failed, "error": f"exit code {completed.returncode}{killed}: "
                               f"{completed.stderr.strip()[-2000:]}"}
  row = json.loads(rows[-1])
  if row["devices"] != devices:
    return {**failed, "error": f"asked for {devices} devices, JAX saw {row['devices']} (is "
                               "XLA_FLAGS honoured on this platform?)"}
  return row


def format_table(rows: list[dict]) -> str:
  """A human-readable table of result rows."""
  measured = [row for row in rows if "error" not in row]
  first = measured[0] if measured else rows[0]
  lines = [f"preset {first['preset']}, {first['crop_seconds']:g} s crops at 8 kHz, batch "
           f"{first['batch_per_device']} per device" + (", remat" if first["remat"] else "")]
  if measured:
    lines[0] += (f", mean of {first['steps_timed']} timed step(s) after {first['warmup_steps']} "
                 f"warm-up ({first['platform']}, jax {first['jax']})")
  lines.append(f"{'devices':>7} {'step s':>8} {'examples/s':>11} {'GFLOP/step':>11} "
               f"{'GFLOP/s':>8} {'compile s':>10} {'GiB/device':>11}")
  for row in rows:
    if "error" in row:
      lines.append(f"{row['devices']:>7} failed: {row['error']}")
      continue
    lines.append(f"{row['devices']:>7} {row['step_s']:>8.2f} {row['examples_per_s']:>11.3f} "
                 f"{row['gflop_per_step']:>11.1f} {row['gflop_per_s']:>8.1f} "
                 f"{row['compile_s']:>10.1f} {row['memory_gib_per_device']:>11.2f}")
  if not measured:
    return "\n".join(lines)
  scanned, unrolled = first["xla_gflop_per_device_scanned"], first["xla_gflop_per_device_unrolled"]
  if first["flops_method"] == "unrolled":
    lines.append(
        f"GFLOP/step: XLA cost analysis of the step compiled with scan_unroll=True "
        f"({unrolled:.1f} GFLOP per device) x devices. The scanned step XLA runs counts "
        f"{scanned:.1f} GFLOP per device (each while-loop body once): {unrolled / scanned:.2f}x "
        "less.")
  else:
    lines.append(f"GFLOP/step: XLA cost analysis of the scanned step as compiled "
                 f"({scanned:.1f} GFLOP per device) x devices; while-loop bodies are counted "
                 "once, so this undercounts (use --flops unrolled).")
  lines.append(f"Analytic forward pass (2 x MACs, all heads): "
               f"{first['analytic_forward_gflop_per_example']:.1f} GFLOP per device batch; a "
               "training step is roughly 3x that." + (
                   " remat recomputes the forward pass: its flops are counted." if first["remat"]
                   else ""))
  lines.append("GiB/device: XLA's buffers of the compiled step (temporaries, arguments, "
               "outputs); simulated devices share this machine's memory and cores.")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="S")
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  parser.add_argument("--crop-seconds", type=float, default=4.0)
  parser.add_argument("--batch-per-device", type=int, default=1)
  parser.add_argument("--remat", action="store_true",
                      help="PressNet(remat=True): recompute activations in the backward pass")
  parser.add_argument("--flops", choices=("unrolled", "scanned"), default="unrolled",
                      help="count flops on the scan-unrolled step (exact) or the scanned one")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
  parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
  parser.add_argument(_WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--unrolled-flops", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.batch_per_device < 1:
    parser.error("--steps and --batch-per-device must be >= 1, --warmup >= 0")

  if args.worker:
    from press_jax import allocator  # noqa: PLC0415 (the worker's own process)
    malloc = allocator.configure()  # As the trainer's entry point runs (press_jax/allocator.py).
    row = measure(args.preset, args.crop_seconds, args.batch_per_device, args.steps,
                  args.warmup, args.flops, args.unrolled_flops, args.remat)
    row["allocator"] = malloc
    print(json.dumps(row), flush=True)
    return 0

  rows, unrolled_flops = [], None
  for devices in args.devices:
    row = run_configuration(args, devices, unrolled_flops)
    # The per-device program is the same for every device count: count its flops once.
    if row.get("xla_gflop_per_device_unrolled") is not None:
      unrolled_flops = row["xla_gflop_per_device_unrolled"] * 1e9
    rows.append(row)
    if args.json:
      print(json.dumps(row), flush=True)
    elif "error" in row:
      print(f"[{devices} device(s)] failed: {row['error']}", file=sys.stderr, flush=True)
    else:
      print(f"[{devices} device(s)] {row['step_s']:.2f} s/step, "
            f"{row['examples_per_s']:.3f} examples/s", file=sys.stderr, flush=True)
  if not args.json:
    print(format_table(rows))
  return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
