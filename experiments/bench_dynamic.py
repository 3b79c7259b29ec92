"""What early exits save: wall-clock against GMAC over a sweep of target levels, and speed.

Run (after `make demo`; ~3 minutes on 2 CPU cores):
  python -m experiments.bench_dynamic                      # the demo's model, runs/demo
  python -m experiments.bench_dynamic --model-dir DIR --json
  python -m experiments.bench_dynamic --speed-config S     # also: S at its last exit, memory
  python -m experiments.bench_dynamic --conditions snr_ref # the rule on the variance alone

Part 1 (the model of --model-dir): the first --utterances test utterances are separated the way
`press-separate` does it (chunks with context, one while loop per chunk that stops at the first
accepted exit), once per target level and once at the last exit (the static reference). Per
target it prints the mean exit, the GMAC/s spent (context included), the measured wall-clock per
second of audio, the real-time factor, the SI-SNRi (PIT, whole utterances) and
saving_ratio = (wall saving) / (GMAC saving), both against always running the last exit. It also
prints the quality cost of chunking: SI-SNRi at the last exit, chunked against whole-utterance.
--conditions as press-separate's: with snr or snri (the default has all three) every stage's
waveform head runs, since the rule reads each exit's estimate; with snr_ref alone only the
variance heads run per stage and a waveform head only for an exit some block accepted, so the
GMAC spent follows the mean exit (counted from what each window ran).
Timing: every policy (the reference and each target) makes one untimed pass, then three rounds
in which each makes one timed pass in turn; the fastest of each is kept (`run_policies`).

Part 2 (--speed-config): a randomly initialised preset at its last exit on --speed-seconds of
audio: achieved GFLOP/s (2 x analytic MACs / wall time) beside a 2048^2 float32 matmul measured
in the same run; then peak resident memory after streaming 10 s and after 10 minutes of input
through the same separator (flat = bounded memory).

--json prints {"targets": [{target_db, mean_exit, gmac_per_s, wall_s_per_audio_s, si_snri_db,
saving_ratio}, ...], ...} with the list as the issue asks under "targets".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_step, configs, main as main_job
from press_jax import allocator, exit_rule, metrics, model_dir, separation
from press_jax.models import press_net


def log(message: str) -> None:
  print(f"[bench_dynamic] {message}", file=sys.stderr, flush=True)


def test_utterances(count: int, split: str = "test"):
  """(mixture, sources) pairs, full length, from the demo's dataset (built if needed)."""
  data = configs.get("demo").data
  with contextlib.redirect_stdout(sys.stderr):  # Keep stdout for the report / JSON.
    main_job.build_data(data)
  utterances = []
  for batch in main_job.eval_iterator_factory(data, split, None)():
    flat = {name: np.asarray(batch[name]).reshape(-1, *np.shape(batch[name])[2:])
            for name in ("mixture", "sources", "mask")}
    keep = (np.asarray(batch["example_mask"]).reshape(-1) > 0 if "example_mask" in batch
            else np.ones(flat["mixture"].shape[0], bool))
    for mixture, sources, mask, use in zip(flat["mixture"], flat["sources"], flat["mask"], keep):
      if use:
        length = int(mask.sum())
        utterances.append((mixture[:length], sources[:, :length]))
      if len(utterances) >= count:
        return utterances
  return utterances


def si_snri(estimate: np.ndarray, sources: np.ndarray, mixture: np.ndarray) -> float:
  values, _ = metrics.pit_si_snr(jnp.asarray(estimate)[None], jnp.asarray(sources)[None])
  mixture_snr = metrics.si_snr(jnp.asarray(mixture)[None, None].repeat(sources.shape[0], 1),
                               jnp.asarray(sources)[None])
  return float(jnp.mean(values - mixture_snr))


def separate_all(loaded, utterances, settings: separation.SeparationSettings):
  """Separate every utterance with `settings`: ([(estimate, report)], wall seconds)."""
  started = time.perf_counter()
  outputs = [separation.separate(loaded.model, loaded.params, mixture, settings,
                                 loaded.calibration) for mixture, _ in utterances]
  return outputs, time.perf_counter() - started


def policy_row(loaded, utterances, outputs, wall: float) -> dict:
  """Totals of one policy's pass over the utterances, timed at `wall` seconds."""
  audio_seconds = sum(m.size for m, _ in utterances) / loaded.model.config.sample_rate
  gmac = sum(report["gmac"] for _, report in outputs)
  exits = [block["exit"] for _, report in outputs for block in report["blocks"]]
  quality = [si_snri(estimate, sources, mixture)
             for (estimate, _), (mixture, sources) in zip(outputs, utterances)]
  return {"mean_exit": float(np.mean(exits)), "gmac_per_s": gmac / audio_seconds,
          "wall_s_per_audio_s": wall / audio_seconds,
          "real_time_factor": wall / audio_seconds, "si_snri_db": float(np.mean(quality)),
          "exits_run_mean": float(np.mean([r["exits_run_mean"] for _, r in outputs])),
          "waveform_heads_run_mean": float(np.mean([r["waveform_heads_run_mean"]
                                                    for _, r in outputs]))}


def run_policies(loaded, utterances, settings: dict[str, separation.SeparationSettings],
                 rounds: int = 3) -> dict[str, dict]:
  """Each policy once untimed (compiling its window), then `rounds` rounds in which every policy
  makes one timed pass in turn, the fastest pass of each kept.

  Interleaved, so that the machine's drift (its speed moves by 2x between runs, and by 10-20 %
  within minutes) falls on every policy alike rather than on whichever ran at a slow moment.
  """
  outputs = {name: separate_all(loaded, utterances, s)[0] for name, s in settings.items()}
  walls = {name: [] for name in settings}
  for round_index in range(rounds):
    log(f"timed round {round_index + 1} of {rounds}")
    for name, policy in settings.items():
      walls[name].append(separate_all(loaded, utterances, policy)[1])
  return {name: policy_row(loaded, utterances, outputs[name], min(walls[name]))
          for name in settings}


def whole_utterance_si_snri(loaded, utterances) -> float:
  """SI-SNRi of the last exit on each whole utterance (padded to one length, masked)."""
  model, params = loaded.model, loaded.params
  forward = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
  longest = max(m.size for m, _ in utterances)
  values = []
  for mixture, sources in utterances:
    padded = np.zeros((1, longest), np.float32)
    padded[0, :mixture.size] = mixture
    mask = np.zeros_like(padded)
    mask[0, :mixture.size] = 1.0
    outputs = forward(params, padded, mask)
    values.append(si_snri(np.asarray(outputs.mean[-1, 0, :, :mixture.size]), sources, mixture))
  return float(np.mean(values))


def sweep(loaded, utterances, target_dbs, confidence, chunk_seconds, context_seconds,
          conditions: tuple[str, ...] = exit_rule.CONDITIONS) -> dict:
  base = separation.SeparationSettings(chunk_seconds=chunk_seconds,
                                       context_seconds=context_seconds, confidence=confidence,
                                       conditions=tuple(conditions))
  exits = loaded.model.config.exits
  reference = separation.SeparationSettings(**{**base.__dict__, "static_exit": exits})
  settings = {"last": reference}
  for target in target_dbs:
    settings[float(target)] = separation.SeparationSettings(
        **{**base.__dict__, "target_db": float(target)})
  log(f"reference: exit {exits} everywhere; targets {', '.join(map(str, target_dbs))} dB "
      "(each once untimed, then timed rounds over all of them)")
  results = run_policies(loaded, utterances, settings)
  last = results.pop("last")
  rows = [dict(row, target_db=target) for target, row in results.items()]
  for row in rows:
    gmac_saving = 1.0 - row["gmac_per_s"] / last["gmac_per_s"]
    wall_saving = 1.0 - row["wall_s_per_audio_s"] / last["wall_s_per_audio_s"]
    row.update(gmac_saving=gmac_saving, wall_saving=wall_saving,
               saving_ratio=(wall_saving / gmac_saving) if row["mean_exit"] < exits - 1e-9
               and gmac_saving > 1e-9 else None)
  whole = whole_utterance_si_snri(loaded, utterances)
  return {"targets": rows, "last_exit": last, "whole_utterance_last_exit_si_snri_db": whole,
          "chunking_cost_db": whole - last["si_snri_db"], "utterances": len(utterances),
          "confidence": confidence, "conditions": list(conditions),
          "chunk_seconds": chunk_seconds,
          "context_seconds": context_seconds}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def speed(config_name: str, seconds: float, chunk_seconds: float, context_seconds: float,
          memory_seconds: tuple[float, ...], memory_config: str) -> dict:
  """Random-parameter preset at its last exit: GFLOP/s vs matmul, and memory vs input length."""
  rng = np.random.default_rng(0)
  # Memory against input length: a property of the streaming code, measured with a preset fast
  # enough to stream 10 minutes here (--memory-config; S takes ~1 s per second of audio).
  memory_model = press_net.create(memory_config)
  memory_params = press_net.init_params(memory_model, jax.random.key(0))
  memory = {"memory_config": memory_config, "memory": []}
  for length in memory_seconds:
    separator = separation.ChunkedSeparator(memory_model, memory_params,
                                            separation.SeparationSettings(
                                                chunk_seconds=chunk_seconds,
                                                context_seconds=context_seconds,
                                                static_exit=memory_model.config.exits))
    piece = int(memory_model.config.sample_rate)
    produced = 0
    for start in range(0, int(length * piece), piece):
      chunk = (0.1 * rng.standard_normal(piece)).astype(np.float32)
      produced += sum(out.shape[1] for out in separator.feed(chunk))
    produced += sum(out.shape[1] for out in separator.finish())
    memory["memory"].append({"audio_s": length, "peak_rss_mb": peak_rss_mb(),
                             "output_samples": produced})
    log(f"{length:.0f} s streamed: peak RSS {peak_rss_mb():.0f} MB")
  model = press_net.create(config_name)
  config = model.config
  params = press_net.init_params(model, jax.random.key(0))
  loaded = model_dir.LoadedModel(model=model, params=params, calibration=None, directory="",
                                 kind="random")
  settings = separation.SeparationSettings(chunk_seconds=chunk_seconds,
                                           context_seconds=context_seconds,
                                           static_exit=config.exits)
  rng = np.random.default_rng(0)
  wav = (0.1 * rng.standard_normal(int(seconds * config.sample_rate))).astype(np.float32)
  separation.separate(model, params, wav[:config.sample_rate], settings)  # compile
  times = []
  for _ in range(3):
    started = time.perf_counter()
    _, report = separation.separate(model, params, wav, settings)
    times.append(time.perf_counter() - started)
  wall = statistics.median(times)
  gflop = 2.0 * report["gmac"]
  matmul = bench_step.matmul_gflops()
  result = {"config": config_name, "audio_s": seconds, "wall_s": wall,
            "x_real_time": seconds / wall, "gflop": gflop, "achieved_gflops": gflop / wall,
            "matmul_gflops": matmul, "ratio": gflop / wall / matmul,
            "gmac_per_s": report["gmac_per_s"], **memory}
  del loaded
  return result


def format_report(result: dict) -> str:
  lines = []
  if "targets" in result:
    last = result["last_exit"]
    lines += [f"{result['utterances']} test utterances, chunks of {result['chunk_seconds']} s "
              f"with {result['context_seconds']} s context, confidence {result['confidence']}, "
              f"conditions {','.join(result['conditions'])}",
              f"{'target dB':>9} {'mean exit':>9} {'GMAC/s':>8} {'wall s/s':>9} {'RTF':>7} "
              f"{'SI-SNRi':>8} {'GMAC save':>9} {'wall save':>9} {'ratio':>6}",
              f"{'last':>9} {last['mean_exit']:>9.2f} {last['gmac_per_s']:>8.4f} "
              f"{last['wall_s_per_audio_s']:>9.4f} {last['real_time_factor']:>7.4f} "
              f"{last['si_snri_db']:>8.2f} {'-':>9} {'-':>9} {'-':>6}"]
    for row in result["targets"]:
      ratio = "-" if row["saving_ratio"] is None else f"{row['saving_ratio']:.2f}"
      lines.append(f"{row['target_db']:>9.1f} {row['mean_exit']:>9.2f} "
                   f"{row['gmac_per_s']:>8.4f} {row['wall_s_per_audio_s']:>9.4f} "
                   f"{row['real_time_factor']:>7.4f} {row['si_snri_db']:>8.2f} "
                   f"{row['gmac_saving']:>9.1%} {row['wall_saving']:>9.1%} {ratio:>6}")
    lines.append(f"chunked vs whole-utterance at the last exit: "
                 f"{last['si_snri_db']:.2f} vs {result['whole_utterance_last_exit_si_snri_db']:.2f}"
                 f" dB SI-SNRi (cost {result['chunking_cost_db']:.2f} dB)")
  if "speed" in result:
    s = result["speed"]
    lines += [f"{s['config']} at its last exit, {s['audio_s']:.0f} s of audio: {s['wall_s']:.2f} s "
              f"({s['x_real_time']:.2f}x real time), {s['achieved_gflops']:.1f} GFLOP/s of "
              f"{s['matmul_gflops']:.1f} for a 2048^2 matmul (ratio {s['ratio']:.3f})"]
    for entry in s["memory"]:
      lines.append(f"  {s.get('memory_config', '')} streamed {entry['audio_s']:.0f} s: peak RSS "
                   f"{entry['peak_rss_mb']:.0f} MB")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", default="runs/demo")
  parser.add_argument("--utterances", type=int, default=100)
  parser.add_argument("--targets", default="0,5,10,15,20",
                      help="comma-separated target levels, dB")
  parser.add_argument("--confidence", type=float, default=0.9)
  parser.add_argument("--conditions", default="snr,snri,snr_ref",
                      help="comma-separated exit conditions, as press-separate's; without snr and "
                           "snri the loop runs a waveform head only where a block accepts it")
  parser.add_argument("--chunk-seconds", type=float, default=4.0)
  parser.add_argument("--context-seconds", type=float, default=0.5)
  parser.add_argument("--speed-config", help="also time this preset (e.g. S) at its last exit")
  parser.add_argument("--speed-seconds", type=float, default=10.0)
  parser.add_argument("--memory-seconds", default="10,600")
  parser.add_argument("--memory-config", default="tiny",
                      help="preset streamed for the memory figures (random parameters)")
  parser.add_argument("--no-sweep", action="store_true", help="only the --speed-config part")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  try:
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    memory = tuple(float(t) for t in args.memory_seconds.split(",") if t.strip())
  except ValueError:
    parser.error("--targets and --memory-seconds take comma-separated numbers")
  conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
  if not conditions or any(c not in exit_rule.CONDITIONS for c in conditions):
    parser.error(f"--conditions: expected a non-empty subset of "
                 f"{','.join(exit_rule.CONDITIONS)}, got {args.conditions!r}")
  if args.utterances < 1:
    parser.error("--utterances must be >= 1")
  # As press-separate runs (press_jax/allocator.py; PRESS_JAX_MALLOC=off to measure without).
  result = {"allocator": allocator.configure()}
  if not args.no_sweep:
    try:
      loaded = model_dir.load(args.model_dir)
    except model_dir.ModelDirError as error:
      parser.error(f"--model-dir {error} (run `make demo` first, or pass --model-dir)")
    utterances = test_utterances(args.utterances)
    result.update(sweep(loaded, utterances, targets, args.confidence, args.chunk_seconds,
                        args.context_seconds, conditions))
    result["model_dir"] = loaded.directory
  if args.speed_config:
    result["speed"] = speed(args.speed_config, args.speed_seconds, args.chunk_seconds,
                            args.context_seconds, memory, args.memory_config)
  print(json.dumps(result) if args.json else format_report(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
