"""press-separate: separate recordings with a trained PRESS-Net, stopping early per block.

  press-separate --model runs/demo --out-dir separated mixture.wav more/ ...

Writes, for every input `<name>.<ext>`: `<name>_s1.wav`, `<name>_s2.wav`, ... (32-bit float WAV
at the input's sample rate, or the model's with --keep-model-rate) and `<name>_exits.json` (per
block: the exit taken and its probability; per window: the stages computed and their GMAC; per
file: mean GMAC/s and the real-time factor), each under a temporary name renamed when complete.
Files that fail are reported in one line each and skipped; the exit status is 1 if any failed.
By default the decoder stages run in a while loop that stops at the first accepted exit
(press_jax.dynamic); --masked computes every exit and picks, --exit K takes exit K everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np

PROGRAM = "press-separate"


def parse_arguments(argv):
  parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="audio files (wav, flac, ogg, ...) or directories of them")
  parser.add_argument("--model", required=True, metavar="MODEL_DIR",
                      help="a saved model, a training work directory or a main-job work "
                           "directory (e.g. runs/demo)")
  parser.add_argument("--out-dir", required=True, help="where the separated files go")
  parser.add_argument("--target-db", type=float, default=10.0,
                      help="target level t of the exit rule, dB (default 10)")
  parser.add_argument("--confidence", type=float, default=0.9,
                      help="confidence p in (0, 1) of the exit rule (default 0.9)")
  parser.add_argument("--conditions", default="snr,snri,snr_ref",
                      help="comma-separated exit conditions (any suffices; default all three); "
                           "snr_ref alone runs an exit's waveform head only where a block "
                           "accepts it (docs/inference.md)")
  parser.add_argument("--probabilities", choices=("approximate", "exact"),
                      default="approximate",
                      help="exit probabilities: the paper's large-T form or the exact one")
  parser.add_argument("--max-exit", type=int, help="deepest exit to run (1-based)")
  parser.add_argument("--exit", type=int, dest="static_exit",
                      help="take this exit (1-based) for every block: no early exit")
  parser.add_argument("--masked", action="store_true",
                      help="compute every exit and pick one per block (saves no compute)")
  parser.add_argument("--chunk-seconds", type=float, default=4.0)
  parser.add_argument("--context-seconds", type=float, default=0.5,
                      help="audio seen on each side of a chunk; also the crossfade length")
  parser.add_argument("--channel", type=int,
                      help="use this channel (0-based) of multi-channel input instead of the mean")
  parser.add_argument("--keep-model-rate", action="store_true",
                      help="write at the model's sample rate instead of the input's")
  parser.add_argument("--plot", action="store_true",
                      help="also write <name>_exits.png: the exit map over the spectrogram "
                           "(keeps the input in memory)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
  return parser, parser.parse_args(argv)


def check_out_dir(path: str) -> str | None:
  """An error message if `path` cannot be the output directory, else None (created if absent)."""
  if os.path.exists(path) and not os.path.isdir(path):
    return f"--out-dir {path}: exists and is not a directory"
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".press-separate-"):
      pass
  except OSError as error:
    return f"--out-dir {path}: not writable ({error.strerror or error})"
  return None


def output_names(path: str, out_dir: str, speakers: int) -> tuple[list[str], str, str]:
  name = os.path.splitext(os.path.basename(path))[0]
  sources = [os.path.join(out_dir, f"{name}_s{j + 1}.wav") for j in range(speakers)]
  return sources, os.path.join(out_dir, f"{name}_exits.json"), os.path.join(
      out_dir, f"{name}_exits.png")


def write_json(path: str, value) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    json.dump(value, handle, indent=1)
  os.replace(temporary, path)


def separate_file(path, loaded, settings, arguments, progress):
  """Separates one file; returns its report (raises AudioError / OSError on failure)."""
  from press_jax import audio, separation

  config = loaded.model.config
  reader = audio.AudioReader(path, config.sample_rate, arguments.channel,
                             min_samples=config.encoder_kernel)
  notices = []
  if reader.downmixed:
    notices.append(f"{reader.channels} channels downmixed by the mean (--channel picks one)")
  output_rate = config.sample_rate if arguments.keep_model_rate else reader.sample_rate
  output_samples = (reader.model_samples if arguments.keep_model_rate else reader.frames)
  sources, exits_path, plot_path = output_names(path, arguments.out_dir, config.speakers)
  writer = audio.SourceWriter(sources, config.sample_rate, output_rate, output_samples)
  separator = separation.ChunkedSeparator(loaded.model, loaded.params, settings,
                                          loaded.calibration)
  geometry = separator.geometry
  total_windows = max(1, -(-reader.model_samples // geometry.chunk))
  bar = progress(total=total_windows, desc=os.path.basename(path), unit="chunk", leave=False)
  kept = [] if arguments.plot else None
  started = time.perf_counter()
  try:
    def pieces():
      for piece in reader.pieces():
        if kept is not None:
          kept.append(piece)
        yield piece

    for piece in pieces():
      for output in separator.feed(piece):
        writer.write(output)
        bar.update(1)
    for output in separator.finish():
      writer.write(output)
      bar.update(1)
    seconds = time.perf_counter() - started
    writer.commit()
  except BaseException:
    writer.abort()
    raise
  finally:
    reader.close()
    bar.close()
  summary = separator.summary()
  report = {
      "input": os.path.abspath(path), "sample_rate": reader.sample_rate,
      "channels": reader.channels, "notices": notices, "outputs": sources,
      "output_sample_rate": output_rate, "model": os.path.abspath(loaded.directory),
      "settings": {"target_db": settings.target_db, "confidence": settings.confidence,
                   "conditions": list(settings.conditions), "max_exit": settings.max_exit,
                   "static_exit": settings.static_exit,
                   "probabilities": settings.probabilities,
                   "path": "masked" if settings.masked else "dynamic",
                   "chunk_seconds": geometry.chunk / config.sample_rate,
                   "context_seconds": geometry.context / config.sample_rate,
                   "post_calibration": loaded.calibration is not None},
      "seconds": summary["seconds"], "mean_exit": summary["mean_exit"],
      "gmac_per_s": summary["gmac_per_s"],
      "gmac_per_s_at_last_exit": summary["last_exit_gmac_per_s"],
      "processing_s": seconds,
      "real_time_factor": seconds / summary["seconds"] if summary["seconds"] else None,
      "blocks": [block for record in separator.records for block in record.blocks],
      "windows": [{"index": r.index, "start_s": r.start_s, "exits_run": r.exits_run,
                   "waveform_heads_run": r.waveform_heads_run, "gmac": r.gmac} for r in separator.records],
  }
  write_json(exits_path, report)
  if kept is not None:
    from press_jax import plots
    plots.exit_map(np.concatenate(kept), config.sample_rate, report["blocks"],
                   config.block_length / config.sample_rate, config.exits, plot_path)
  return report


def main(argv=None) -> int:
  parser, arguments = parse_arguments(argv)

  def fail(message: str, status: int = 2) -> int:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    return status

  conditions = tuple(c.strip() for c in arguments.conditions.split(",") if c.strip())
  if not 0.0 < arguments.confidence < 1.0:
    return fail(f"--confidence: expected a probability in (0, 1), got {arguments.confidence}")
  if not np.isfinite(arguments.target_db) or abs(arguments.target_db) > 100:
    return fail(f"--target-db: expected a level in [-100, 100] dB, got {arguments.target_db}")
  if arguments.static_exit is not None and arguments.max_exit is not None:
    return fail("--exit and --max-exit exclude each other")
  error = check_out_dir(arguments.out_dir)
  if error:
    return fail(error)

  from press_jax import (  # JAX: after the checks.
      allocator, audio, compilation_cache, model_dir, separation)
  compilation_cache.enable()
  allocator.configure()
  try:
    loaded = model_dir.load(arguments.model)
  except model_dir.ModelDirError as error:
    return fail(f"--model {error}")
  settings = separation.SeparationSettings(
      chunk_seconds=arguments.chunk_seconds, context_seconds=arguments.context_seconds,
      target_db=arguments.target_db, confidence=arguments.confidence, conditions=conditions,
      max_exit=arguments.max_exit, static_exit=arguments.static_exit, masked=arguments.masked,
      probabilities=arguments.probabilities)
  try:
    settings.validate(loaded.model.config)
  except ValueError as error:
    return fail(str(error))

  if arguments.no_progress:
    class progress:  # noqa: N801 - a do-nothing stand-in for tqdm
      def __init__(self, *args, **kwargs):
        pass

      def update(self, *args):
        pass

      def close(self):
        pass
  else:
    from tqdm import tqdm as progress

  # Compile the window once before the files, so that each file's real-time factor is its own.
  started = time.perf_counter()
  warm = separation.ChunkedSeparator(loaded.model, loaded.params, settings, loaded.calibration)
  for _ in warm.feed(np.zeros(warm.geometry.window + 1, np.float32)):
    pass
  compile_s = time.perf_counter() - started
  files = audio.expand_inputs(arguments.inputs)
  if not files:
    return fail("no audio files found in " + ", ".join(arguments.inputs))
  failed, done = [], []
  file_bar = progress(total=len(files), desc="files", unit="file")
  for path in files:
    try:
      report = separate_file(path, loaded, settings, arguments, progress)
      done.append(report)
      for notice in report["notices"]:
        print(f"{PROGRAM}: {path}: {notice}", file=sys.stderr)
    except KeyboardInterrupt:
      raise
    except (audio.AudioError, OSError, ValueError) as error:
      failed.append(path)
      print(f"{PROGRAM}: error: {error}", file=sys.stderr)
      if arguments.debug:
        traceback.print_exc()
    except Exception as error:  # A bug, or something this list does not know yet.
      failed.append(path)
      print(f"{PROGRAM}: error: {path}: {type(error).__name__}: {error}", file=sys.stderr)
      if arguments.debug:
        traceback.print_exc()
    file_bar.update(1)
  file_bar.close()
  for report in done:
    print(f"{report['input']}: {report['seconds']:.1f} s, mean exit {report['mean_exit']:.2f}, "
          f"{report['gmac_per_s']:.3f} GMAC/s (last exit {report['gmac_per_s_at_last_exit']:.3f}),"
          f" real-time factor {report['real_time_factor']:.3f}")
  print(f"{PROGRAM}: {len(done)} of {len(files)} files separated into {arguments.out_dir} "
        f"(compiling took {compile_s:.1f} s, not counted in the real-time factors)"
        + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
