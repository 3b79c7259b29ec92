"""Evaluate a trained work directory on any split: the main job's per-exit table and policies.

Run (the validation/test comparison in the README, "What a larger budget does"):
  python -m experiments.evaluate --config demo_long --model-dir runs/demo_long/train \\
      --split validation
Prints the report the main job prints for its test split and writes the full summary to --out
(default <model-dir>/evaluation_<split>.json). The data settings (dataset, builder config,
buckets, exit policies) come from --config and its --config.x=y overrides; the model from the checkpoint.
Multi-host: pass --coordinator-address/--num-processes/--process-id (or the JAX_* variables);
every host evaluates its shard and process 0 writes the summary of the whole split.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

from experiments import configs, main
from press_jax import allocator, compilation_cache, distributed, model_dir


def main_cli(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", required=True,
                      help="a model directory: a training stage's work directory (checkpoints/), a saved "
           "model, or a main-job work directory; a stored post-calibration is applied")
  parser.add_argument("--split", required=True, help="e.g. train, validation, test")
  parser.add_argument("--config", default="demo",
                      help="the experiment whose data settings to use: " + configs.CONFIG_HELP)
  parser.add_argument("--max-batches", type=int, default=None,
                      help="evaluate at most this many batches (default: the whole split)")
  parser.add_argument("--out", help="summary JSON (default <model-dir>/evaluation_<split>.json)")
  parser.add_argument("--coordinator-address")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args, experiment = configs.parse_command_line(parser, argv)
  compilation_cache.enable()
  allocator.configure()
  distributed.initialize_from_flags_or_environment(
      args.coordinator_address, args.num_processes, args.process_id)
  try:
    model_dir.resolve(args.model_dir)
  except model_dir.ModelDirError as error:
    parser.error(f"--model-dir {error}")
  if args.max_batches is not None and args.max_batches < 1:
    parser.error(f"--max-batches must be >= 1, got {args.max_batches}")
  main.build_data(experiment.data)
  summary = main.run_evaluation(experiment, args.model_dir, args.split, args.max_batches)
  out = args.out or os.path.join(args.model_dir, f"evaluation_{args.split}.json")
  if jax.process_index() != 0:  # Every host holds the same summary of the whole split.
    return summary
  with open(out, "w") as handle:
    json.dump(summary, handle, indent=1)
  print(main.format_report(summary))
  print(f"\nsummary: {out}", flush=True)
  return summary


if __name__ == "__main__":
  main_cli()
