"""The peer comparison in one run: JAX against the PyTorch port (training) and against
onnxruntime and PyTorch (inference per exit), on the same config, parameters and inputs.

Run:
  python -m experiments.bench_runtimes                     # demo and S, ~10 min on 2 CPU cores
  python -m experiments.bench_runtimes --configs demo --json
  python -m experiments.bench_runtimes --configs tiny --crop-seconds 0.25 --audio-seconds 0.5 \\
      --repeats 1 --no-torch-compile --json               # what the test runs

Per config (a config name or file of experiments/configs, as every entry point takes):

- training: one optimiser step on one device's batch (`train.batch_size_per_device` crops of
  `data.crop_seconds`, or `--crop-seconds`; the speech-like random batch of bench_step), median
  of `--repeats` warm steps after a warm-up. JAX: `press_jax.train_step.train_step` jitted with
  the state donated (bench_step's step, as the trainer runs it, remat as the config says).
  PyTorch: the port (`press_jax.torch_port`, the same parameters through the safetensors
  export) with `press_loss`, `backward`, gradient clipping at `clip_norm` and `torch.optim.AdamW`
  with the config's betas and weight decay; eager, and `torch.compile(model)` (inductor) unless
  `--no-torch-compile` (its compile time is printed; an error is reported, not raised). The
  first step's loss of both frameworks is printed beside the timings: they compute the same
  loss on the same batch (test: within 1e-4 relative).
- inference per exit k: batch 1, `--audio-seconds` of audio (10 s), the median of `--repeats`
  calls after a warm-up, every runtime's calls alternated round by round (since session 22:
  timed one after the other, the same graphs read 1.2x and 1.9x JAX's time in two runs), as a
  real-time factor RTF = compute seconds / audio seconds (below 1:
  faster than real time). JAX (`jax_rtf`, what a JAX user runs): `forward_through_exit`
  jitted, the stages up to exit k with the model's own recurrence kernel (`auto`: sequential
  on CPU); beside it `jax_export_kernel_rtf`, `forward.graph_function(model, params, k)`
  jitted: the function the exports trace (the two-pass recurrence, `forward.EXPORT_RECURRENCE`);
  onnxruntime: the ONNX graph of exit k (`press_jax.export.onnx_graphs.export_exit`, as
  press-export writes it), a session with onnxruntime's default threads, and with
  `--onnx-as-converted` also jax2onnx's graph without press_jax's rewrites
  (`onnxruntime_as_converted_rtf`; press_jax/export/onnx_rewrites.py);
  PyTorch: the port's `forward(max_exit=k)` under
  `torch.no_grad()` (it runs the heads of the exits before k too).

Prints a table per config, or with --json one JSON object per config and line: `config`,
`jax_train_examples_per_s`, `torch_train_examples_per_s` (the better of eager and compiled),
`train_ratio` (JAX / best PyTorch), `inference` (a list per exit: `exit`, `jax_rtf`,
`jax_export_kernel_rtf`, `onnxruntime_rtf`, `torch_rtf`, `onnxruntime_vs_jax` = onnxruntime's
time / JAX's), and the details (each PyTorch mode, losses, the shapes,
thread counts, versions, the same run's 2048^2 float32 matmul GFLOP/s). A missing optional
extra (torch, onnx) gives null figures and the reason under `unavailable`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from experiments import bench_step, configs
from press_jax import allocator
from press_jax import train_step as step_lib
from press_jax.export import forward
from press_jax.export import onnx_graphs
from press_jax.export import params as params_lib

DEFAULT_CONFIGS = ("demo", "S")


def log(message: str) -> None:
  print(f"[bench_runtimes] {message}", file=sys.stderr, flush=True)


def median_call(function: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median wall seconds of `function()` (which must block until its result is ready)."""
  for _ in range(warmup):
    function()
  times = []
  for _ in range(max(repeats, 1)):
    started = time.perf_counter()
    function()
    times.append(time.perf_counter() - started)
  return statistics.median(times)


# --- training -------------------------------------------------------------------------------------
def jax_training(setup: bench_step.Setup, batch: dict, repeats: int, seed: int) -> dict:
  """JAX's step: median seconds and the first step's loss, from the parameters of `seed`."""
  state = step_lib.create_train_state(setup.model, setup.optimizer, seed)
  compiled = bench_step.step_function(setup).lower(state, jax.device_put(batch)).compile()
  state, metrics = compiled(state, batch)
  first_loss = float(metrics["loss"])

  def step():
    nonlocal state
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)

  seconds = median_call(step, repeats)
  return {"step_s": seconds, "examples_per_s": setup.batch / seconds, "first_loss": first_loss}


def torch_model(setup: bench_step.Setup, params, directory: str):
  """The PyTorch port of `setup.model` with `params`, through the safetensors export."""
  from press_jax import torch_port  # pylint: disable=import-outside-toplevel

  params_lib.save_safetensors(directory, setup.model, params)
  return torch_port.load(directory)


def torch_training(setup: bench_step.Setup, model, batch: dict, repeats: int,
                   compile_model: bool) -> dict:
  """The port's training step (eager or torch.compile): median seconds and first loss."""
  import torch  # pylint: disable=import-outside-toplevel

  from press_jax import torch_port  # pylint: disable=import-outside-toplevel

  train = setup.experiment.train
  loss_config = setup.loss_config
  optimizer_config = train.optimizer
  model.train()
  optimizer = torch.optim.AdamW(
      model.parameters(), lr=optimizer_config.peak_learning_rate,
      betas=(optimizer_config.b1, optimizer_config.b2),
      weight_decay=optimizer_config.weight_decay)
  mixture, sources, mask = (torch.from_numpy(np.asarray(batch[key]))
                            for key in ("mixture", "sources", "mask"))
  forward_fn = model
  started = time.perf_counter()
  if compile_model:
    forward_fn = torch.compile(model)

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    outputs = forward_fn(mixture, mask)
    loss, _ = torch_port.press_loss(outputs, sources, mask, block_length=loss_config.block_length,
                                    exit_weights=loss_config.exit_weights,
                                    permutation=loss_config.permutation)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer_config.clip_norm)
    optimizer.step()
    return float(loss.detach())

  first_loss = step()  # Compiles under torch.compile.
  compile_s = time.perf_counter() - started if compile_model else None
  seconds = median_call(step, repeats)
  result = {"step_s": seconds, "examples_per_s": setup.batch / seconds, "first_loss": first_loss}
  if compile_s is not None:
    result["compile_s"] = compile_s
  return result


# --- inference ------------------------------------------------------------------------------------
def inference_inputs(sample_rate: int, seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  batch = bench_step.speech_like_batch(1, 2, int(round(seconds * sample_rate)), sample_rate,
                                       seed)
  return batch["mixture"], batch["mask"]


def jax_inference(model, params, exit_number: int, mixture, mask,
                  export_kernel: bool = False) -> Callable[[], Any]:
  """A blocking call through exit k: the model as configured, or (`export_kernel`) the
  function the exports trace, with their recurrence kernel. Compiled by its first call."""
  if export_kernel:
    function = jax.jit(forward.graph_function(model, params, exit_number))
  else:
    arrays = jax.tree_util.tree_map(jax.numpy.asarray, params)
    function = jax.jit(lambda mixture, mask: forward.forward_through_exit(
        model, arrays, mixture, mask, exit_number=exit_number))
  return lambda: jax.block_until_ready(function(mixture, mask))


def onnx_inference(model, params, exit_number: int, mixture, mask, directory: str,
                   as_converted: bool = False) -> dict[str, Callable[[], Any]]:
  """Calls of exit k's ONNX graph as press-export writes it ('onnxruntime') and
  (`as_converted`) of jax2onnx's graph without `onnx_rewrites` ('onnxruntime_as_converted')."""
  calls = {}
  for rewrite in (True, False) if as_converted else (True,):
    path = f"{directory}/{'' if rewrite else 'converted_'}{onnx_graphs.exit_file(exit_number)}"
    onnx_graphs.save(path, onnx_graphs.export_exit(model, params, exit_number, rewrite=rewrite))
    session = onnx_graphs.load(path)
    calls["onnxruntime" if rewrite else "onnxruntime_as_converted"] = (
        lambda session=session: onnx_graphs.call(session, mixture, mask))
  return calls


def interleaved_medians(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median wall seconds of each call over `repeats` rounds, the runtimes alternated round by
  round so that every runtime meets the machine's same phases (its speed moves 1.5-2x within
  minutes; timed one after the other, the same graphs read 1.2x and 1.9x JAX's time in two
  runs). In a round each runtime makes one untimed call, then the timed one: warm, as calls
  back to back are (timed straight after another runtime's call, the demo's JAX calls of ~1 ms
  per s of audio measured 1.7-2x slower, with or without a pause between)."""
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(max(repeats, 1)):
    for name, call in calls.items():
      call()
      started = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - started)
  return {name: statistics.median(seconds) for name, seconds in times.items()}


def torch_inference(ported, exit_number: int, mixture, mask) -> Callable[[], Any]:
  import torch  # pylint: disable=import-outside-toplevel

  ported.eval()
  mixture_t, mask_t = torch.from_numpy(mixture), torch.from_numpy(mask)

  def call():
    with torch.no_grad():
      ported(mixture_t, mask_t, max_exit=exit_number)

  return call


# --- one config -----------------------------------------------------------------------------------
def unavailable_extras() -> dict[str, str]:
  missing = {}
  if importlib.util.find_spec("torch") is None:
    missing["torch"] = "torch is not installed (pip install press_jax[torch])"
  onnx_missing = onnx_graphs.missing_extra()
  if onnx_missing:
    missing["onnxruntime"] = onnx_missing
  return missing


def bench_config(name: str, *, crop_seconds: float | None, audio_seconds: float, repeats: int,
                 seed: int, torch_compile: bool, onnx_as_converted: bool = False
                 ) -> dict[str, Any]:
  sets = [f"data.crop_seconds={crop_seconds}"] if crop_seconds else []
  setup = bench_step.make_setup(name, sets)
  config = setup.model_config
  missing = unavailable_extras()
  log(f"{setup.experiment.name}: batch {setup.batch} x {setup.samples} samples (training), "
      f"{audio_seconds} s of audio (inference), {config.exits} exits")
  batch = bench_step.speech_like_batch(setup.batch, config.speakers, setup.samples,
                                       config.sample_rate, seed)
  result: dict[str, Any] = {
      "config": setup.experiment.name, "batch": setup.batch, "crop_samples": setup.samples,
      "audio_seconds": audio_seconds, "exits": config.exits, "repeats": repeats,
      "remat": setup.experiment.train.remat, "unavailable": missing}

  jax_train = jax_training(setup, batch, repeats, seed)
  log(f"JAX train step {jax_train['step_s'] * 1e3:.1f} ms")
  result["jax_train"] = jax_train
  result["jax_train_examples_per_s"] = jax_train["examples_per_s"]

  # The parameters every runtime uses: the JAX initialisation of `seed`.
  params = step_lib.create_train_state(setup.model, setup.optimizer, seed).params
  params = jax.device_get(params)
  with tempfile.TemporaryDirectory(prefix="bench_runtimes_") as directory:
    torch_modes: dict[str, Any] = {}
    if "torch" not in missing:
      import torch  # pylint: disable=import-outside-toplevel

      result["torch_threads"] = torch.get_num_threads()
      result["torch"] = torch.__version__
      modes = ("eager", "compile") if torch_compile else ("eager",)
      for mode in modes:
        try:
          ported = torch_model(setup, params, directory)
          torch_modes[mode] = torch_training(setup, ported, batch, repeats, mode == "compile")
          log(f"PyTorch ({mode}) train step {torch_modes[mode]['step_s'] * 1e3:.1f} ms")
        except Exception as error:  # noqa: BLE001 - torch.compile may not work on a machine
          torch_modes[mode] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"
                                        [:300]}
          log(f"PyTorch ({mode}) failed: {torch_modes[mode]['error']}")
    result["torch_train"] = torch_modes
    rates = [mode["examples_per_s"] for mode in torch_modes.values() if "examples_per_s" in mode]
    best = max(rates) if rates else None
    result["torch_train_examples_per_s"] = best
    result["train_ratio"] = jax_train["examples_per_s"] / best if best else None

    mixture, mask = inference_inputs(config.sample_rate, audio_seconds, seed)
    ported = torch_model(setup, params, directory) if "torch" not in missing else None
    inference = []
    for exit_number in range(1, config.exits + 1):
      calls = {"jax": jax_inference(setup.model, params, exit_number, mixture, mask),
               "jax_export_kernel": jax_inference(setup.model, params, exit_number, mixture,
                                                  mask, export_kernel=True)}
      if "onnxruntime" not in missing:
        calls.update(onnx_inference(setup.model, params, exit_number, mixture, mask, directory,
                                    as_converted=onnx_as_converted))
      if ported is not None:
        calls["torch"] = torch_inference(ported, exit_number, mixture, mask)
      seconds = interleaved_medians(calls, repeats)
      row = {"exit": exit_number, **{f"{name}_rtf": value / audio_seconds
                                     for name, value in seconds.items()}}
      row.setdefault("onnxruntime_rtf", None)
      row.setdefault("torch_rtf", None)
      row["onnxruntime_vs_jax"] = (None if row["onnxruntime_rtf"] is None
                                   else row["onnxruntime_rtf"] / row["jax_rtf"])
      log(f"exit {exit_number}: RTF JAX {row['jax_rtf']:.4f} (export kernel "
          f"{row['jax_export_kernel_rtf']:.4f}), onnxruntime "
          f"{_number(row['onnxruntime_rtf'], '.4f')}, PyTorch {_number(row['torch_rtf'], '.4f')}")
      inference.append(row)
  result["inference"] = inference
  result["matmul_gflops"] = bench_step.matmul_gflops()
  result["jax"] = jax.__version__
  result["onnx"] = onnx_graphs.versions()
  return result


def _number(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_result(result: dict[str, Any]) -> str:
  lines = [f"config {result['config']}: training batch {result['batch']} x "
           f"{result['crop_samples']} samples, one device; inference {result['audio_seconds']} s "
           f"of audio, batch 1 (matmul reference {result['matmul_gflops']:.1f} GFLOP/s)",
           f"  {'runtime':22s} {'step ms':>9s} {'examples/s':>11s} {'first loss':>11s}"]
  rows = [("JAX", result["jax_train"])] + [
      (f"PyTorch {mode}", values) for mode, values in result["torch_train"].items()]
  for label, values in rows:
    if "error" in values:
      lines.append(f"  {label:22s} failed: {values['error']}")
      continue
    extra = f"  (compile {values['compile_s']:.0f} s)" if "compile_s" in values else ""
    lines.append(f"  {label:22s} {values['step_s'] * 1e3:9.1f} {values['examples_per_s']:11.2f} "
                 f"{values['first_loss']:11.4f}{extra}")
  lines.append(f"  train ratio (JAX / best PyTorch): {_number(result['train_ratio'], '.2f')}")
  lines.append(f"  {'exit':>4s} {'JAX RTF':>9s} {'JAX export':>11s} {'onnxruntime':>12s} "
               f"{'ORT / JAX':>10s} {'PyTorch':>9s}"
               + (f" {'ORT as converted':>17s}" if any(
                   "onnxruntime_as_converted_rtf" in row for row in result["inference"]) else ""))
  for row in result["inference"]:
    lines.append(f"  {row['exit']:4d} {row['jax_rtf']:9.4f} {row['jax_export_kernel_rtf']:11.4f} "
                 f"{_number(row['onnxruntime_rtf'], '12.4f'):>12s} "
                 f"{_number(row['onnxruntime_vs_jax'], '10.2f'):>10s} "
                 f"{_number(row['torch_rtf'], '9.4f'):>9s}"
                 + (f" {row['onnxruntime_as_converted_rtf']:17.4f}"
                    if "onnxruntime_as_converted_rtf" in row else ""))
  for extra, reason in result["unavailable"].items():
    lines.append(f"  {extra}: not measured ({reason})")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      help="comma-separated config names or files (default: demo,S)")
  parser.add_argument("--crop-seconds", type=float, default=None,
                      help="training crop length (default: each config's data.crop_seconds)")
  parser.add_argument("--audio-seconds", type=float, default=10.0,
                      help="inference input length (default 10 s)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (medians)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-torch-compile", action="store_true",
                      help="time PyTorch eager only")
  parser.add_argument("--onnx-as-converted", action="store_true",
                      help="also time jax2onnx's graphs without press_jax's ONNX rewrites "
                           "(onnxruntime_as_converted_rtf; calls alternated with the rewritten)")
  parser.add_argument("--json", action="store_true", help="one JSON object per config and line")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.audio_seconds <= 0:
    parser.error(f"--audio-seconds must be positive, got {args.audio_seconds}")
  if args.crop_seconds is not None and args.crop_seconds <= 0:
    parser.error(f"--crop-seconds must be positive, got {args.crop_seconds}")
  names = [name.strip() for name in args.configs.split(",") if name.strip()]
  if not names:
    parser.error("--configs: give at least one config")
  for name in names:
    try:
      configs.config_file(name)
    except ValueError as error:
      parser.error(f"--configs: {error}")
  malloc = allocator.configure()  # For every runtime of the process (press_jax/allocator.py).
  for name in names:
    result = bench_config(name, crop_seconds=args.crop_seconds,
                          audio_seconds=args.audio_seconds, repeats=args.repeats,
                          seed=args.seed, torch_compile=not args.no_torch_compile,
                          onnx_as_converted=args.onnx_as_converted)
    result["allocator"] = malloc
    print(json.dumps(result) if args.json else format_result(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
