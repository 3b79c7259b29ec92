"""Compare training recipes at equal wall-clock: train for N seconds, then validate.

Run (what the README's table of demo variants was measured with, 300 s each on 2 CPU cores):
  python -m experiments.budget_probe --seconds 300 --workdir runs/probe/lr3e-3 \\
      --config demo --config.train.optimizer.peak_learning_rate=3e-3
Prints one JSON line {"config", "sets", "steps", "train_s", "validation_si_snri_db"} and appends
it to --results (default runs/probe/results.jsonl). Only the crop-training stage runs (no
fine-tuning, no test split); validation uses the config's `data.max_validation_batches`.
An existing work directory is resumed, not restarted: give each probe its own.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from experiments import configs, main
from press_jax import allocator, checkpointing, evaluation


def probe(experiment: configs.ExperimentConfig, workdir: str, seconds: float) -> dict:
  """Train `experiment` for at most `seconds` (checkpointed), then validate its last params."""
  experiment = configs.override(experiment, [f"train.time_limit_s={seconds}",
                                             "train.eval_every=0"])
  main.build_data(experiment.data)
  started = time.perf_counter()
  stage_dir = main.run_training(experiment, workdir)
  train_seconds = time.perf_counter() - started
  model, params = checkpointing.load_model(stage_dir)
  data = experiment.data
  # The trainer's validation: the one evaluator, exits only.
  result = evaluation.Evaluator(model, policy=None, with_calibration=False).run(
      main.eval_iterator_factory(data, data.validation_split, data.max_validation_batches)(),
      params=params)
  return {"steps": checkpointing.make_manager(stage_dir).latest_step(),
          "train_s": round(train_seconds, 1),
          "validation_utterances": result["utterances"],
          "validation_si_snri_db": [round(e["si_snri_db"], 3) for e in result["per_exit"]]}


def main_cli(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help=configs.CONFIG_HELP)
  parser.add_argument("--seconds", type=float, default=300.0, help="training wall-time budget")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--results", default=os.path.join("runs", "probe", "results.jsonl"))
  args, experiment = configs.parse_command_line(parser, argv)
  if args.seconds <= 0:
    parser.error(f"--seconds must be positive, got {args.seconds}")
  allocator.configure()  # As the main job trains (press_jax/allocator.py).
  row = {"config": args.config, "sets": args.config_overrides, **probe(experiment, args.workdir, args.seconds)}
  print(json.dumps(row), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, "a") as handle:
    handle.write(json.dumps(row) + "\n")
  return row


if __name__ == "__main__":
  main_cli()
