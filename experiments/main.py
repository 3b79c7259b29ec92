"""The main job: build the corpus, train, fine-tune on full-length audio, evaluate, report.

Run:
  python -m experiments.main                              # = --config demo --workdir runs/demo
  python -m experiments.main --config S --workdir runs/S --config.train.batch_size_per_device=2
Every stage resumes: a finished stage is skipped, an interrupted one continues from its last
checkpoint. Outputs in the work directory:
  train/, finetune/      checkpoints, TensorBoard events, train_history.json
  model/                 the final parameters (config.json + params.msgpack), for
                         `press-separate --model <workdir>` and press_jax.model_dir.load
  results.json           [{"exit", "si_snri_db", "params", "gmac_per_s"}, ...] on the test split
  evaluation.json        everything measured (per-exit SI-SNR/SDRi, exit policies, regret)
  plots/                 learning curve, SI-SNRi vs GMAC/s, regret vs GMAC/s
Multi-host: pass --coordinator-address/--num-processes/--process-id (or the JAX_* variables);
under `srun` with several tasks the processes join through SLURM's variables alone, and with
PRESS_AUTO_DISTRIBUTED=1 (TPU pods) JAX finds the other hosts itself (press_jax.distributed).
Every host evaluates its shard of each split; the summary (the same on every host, written by
process 0) covers the whole split (press_jax.evaluation, docs/training.md "Evaluation").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

import data_pipelines
from experiments import configs, plots
from press_jax import (allocator, checkpointing, compilation_cache, compute, distributed, evaluation,
                       optim)
from press_jax import model_dir as model_dir_lib
from press_jax import train as train_lib
from press_jax.models import press_net

log = logging.getLogger("experiments.main")


def data_arguments(data: configs.DataConfig) -> dict:
  return {"data_dir": data.data_dir, "config": data.builder_config,
          "manual_dir": data.manual_dir}


def build_data(data: configs.DataConfig) -> None:
  """Prepare the dataset once (press_synth is synthesised; others read the user's corpus).

  With several processes the lead one builds it and the others wait for it (two builders
  racing on one directory fail), which needs the data directory on storage every host sees.
  """
  started = time.perf_counter()
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      data_pipelines.build_dataset(data.dataset, data.data_dir, data.manual_dir,
                                   data.builder_config)
    multihost_utils.sync_global_devices("experiments.main: dataset prepared")
  data_pipelines.build_dataset(data.dataset, data.data_dir, data.manual_dir,
                               data.builder_config)
  print(f"[data] {data.dataset}/{data.builder_config} ready "
        f"({time.perf_counter() - started:.1f} s)", flush=True)


def eval_iterator_factory(data: configs.DataConfig, split: str, max_batches: int | None):
  """A callable returning a fresh full-length pass over `split` (at most max_batches)."""

  def make():
    iterator = data_pipelines.make_eval_iterator(
        data.dataset, split=split, batch_size_per_device=data.eval_batch_size_per_device,
        bucket_seconds=data.bucket_seconds, **data_arguments(data))
    for index, batch in enumerate(iterator):
      if max_batches is not None and index >= max_batches:
        return
      yield batch

  return make


def first_mixture(data: configs.DataConfig, split: str):
  """The first utterance's mixture (samples,) of `split`, unpadded (for the exit map)."""
  source, _, _ = data_pipelines.open_split(data.dataset, data.data_dir, split,
                                           config=data.builder_config, manual_dir=data.manual_dir)
  return np.asarray(source[0]["mixture"], np.float32)


def run_training(experiment: configs.ExperimentConfig, workdir: str) -> str:
  """Stage 1: train on random crops. Returns the stage's work directory."""
  stage_dir = os.path.join(workdir, "train")
  config, data = experiment.train, experiment.data
  iterator = data_pipelines.make_train_iterator(
      data.dataset, split="train", batch_size_per_device=config.batch_size_per_device,
      crop_seconds=data.crop_seconds, seed=config.seed, dynamic_mixing=data.dynamic_mixing,
      speed_perturbation=data.speed_perturbation,
      cache_bytes=int(data.train_cache_gib * 2**30), **data_arguments(data))
  print(f"[train] {config.model} for {config.steps} steps, batch "
        f"{config.batch_size_per_device} x {jax.device_count()} devices, "
        f"{data.crop_seconds} s crops -> {stage_dir}", flush=True)
  train_lib.train(config, stage_dir, iterator,
                  eval_iterator_factory(data, data.validation_split,
                                        data.max_validation_batches),
                  sample_rate=iterator.sample_rate,
                  extra_meta={"experiment": experiment.name})
  return stage_dir


def finetune_config(experiment: configs.ExperimentConfig, init_from: str) -> train_lib.TrainConfig:
  """The full-length fine-tuning stage as a TrainConfig starting from a finished run."""
  finetune = experiment.finetune
  steps = max(finetune.min_steps, round(finetune.steps_fraction * experiment.train.steps))
  return dataclasses.replace(
      experiment.train, steps=steps, batch_size_per_device=finetune.batch_size_per_device,
      init_from=init_from, eval_every=0, time_limit_s=None,
      log_every=max(1, min(experiment.train.log_every, steps // 4)),
      checkpoint_every=max(1, min(experiment.train.checkpoint_every, steps)),
      optimizer=optim.OptimizerConfig(
          peak_learning_rate=finetune.peak_learning_rate,
          warmup_steps=min(finetune.warmup_steps, steps), total_steps=steps,
          b1=experiment.train.optimizer.b1, b2=experiment.train.optimizer.b2,
          weight_decay=experiment.train.optimizer.weight_decay,
          clip_norm=experiment.train.optimizer.clip_norm))


def run_finetuning(experiment: configs.ExperimentConfig, workdir: str, init_from: str) -> str:
  """Stage 2: fine-tune on whole utterances (padded to length buckets, masked)."""
  stage_dir = os.path.join(workdir, "finetune")
  config, data = finetune_config(experiment, init_from), experiment.data
  iterator = data_pipelines.make_full_length_iterator(
      data.dataset, split="train", batch_size_per_device=config.batch_size_per_device,
      bucket_seconds=data.bucket_seconds, shuffle=True, seed=config.seed, num_epochs=None,
      **data_arguments(data))
  print(f"[finetune] full-length utterances for {config.steps} steps -> {stage_dir}", flush=True)
  train_lib.train(config, stage_dir, iterator, sample_rate=iterator.sample_rate,
                  extra_meta={"experiment": experiment.name, "stage": "finetune"})
  return stage_dir


def run_evaluation(experiment: configs.ExperimentConfig, model_dir: str, split: str,
                   max_batches: int | None) -> dict:
  """Stage 3: every exit and the exit policies on `split` (at most `max_batches` batches)."""
  loaded = model_dir_lib.load(model_dir)
  model, params = loaded.model, loaded.params
  costs = compute.exit_costs(model.config)
  started = time.perf_counter()
  summary = evaluation.evaluate(
      model, params, eval_iterator_factory(experiment.data, split, max_batches)(),
      [c.gmac_per_s for c in costs], experiment.policy, with_sdr=experiment.with_sdr,
      post_calibration=loaded.calibration)
  summary["post_calibration"] = loaded.calibration is not None
  for entry, cost in zip(summary["per_exit"], costs):
    entry["params"] = cost.params
  summary["seconds"] = time.perf_counter() - started
  summary["model_dir"] = model_dir
  summary["split"] = split
  return summary


def save_final_model(stage_dir: str, directory: str) -> None:
  """The last stage's parameters as a saved model (press_net.save), what press-separate reads.

  Every process restores the checkpoint (orbax synchronises the processes); the lead one writes.
  """
  model, params = checkpointing.load_model(stage_dir)
  if jax.process_index() == 0:
    press_net.save(directory, model, params)


def write_results(workdir: str, summary: dict) -> str:
  """results.json (the per-exit table) and evaluation.json (everything)."""
  results = [{"exit": e["exit"], "si_snri_db": round(e["si_snri_db"], 3),
              "params": e["params"], "gmac_per_s": round(e["gmac_per_s"], 4)}
             for e in summary["per_exit"]]
  path = os.path.join(workdir, "results.json")
  with open(path, "w") as handle:
    json.dump(results, handle, indent=1)
  with open(os.path.join(workdir, "evaluation.json"), "w") as handle:
    json.dump(summary, handle, indent=1)
  return path


def format_report(summary: dict) -> str:
  """The per-exit table and the dynamic policy's operating points."""
  has_sdr = "sdri_db" in summary["per_exit"][0]
  lines = [f"{summary.get('split', 'test').capitalize()} split: {summary['utterances']} "
           "utterances",
           f"{'exit':>4} {'SI-SNRi (dB)':>13} {'SDRi (dB)':>10} {'params (M)':>11} {'GMAC/s':>8}"]
  for e in summary["per_exit"]:
    sdr = f"{e['sdri_db']:>10.2f}" if has_sdr else f"{'-':>10}"
    lines.append(f"{e['exit']:>4} {e['si_snri_db']:>13.2f} {sdr} {e['params'] / 1e6:>11.3f} "
                 f"{e['gmac_per_s']:>8.3f}")
  lines.append("Calibration of the predicted error variance, KS distance of the PIT values to "
               "uniform (0 = calibrated), per exit: " + ", ".join(
                   f"{e['calibration']['pit_ks']:.3f}" for e in summary["per_exit"]))
  training = summary.get("training")
  if training and training.get("replanned_steps") and training["steps"] >= training[
      "replanned_steps"]:
    lines.append(f"NOTE: training was re-planned to fit its time limit "
                 f"({training['time_limit_s']:.0f} s): {training['steps']} of "
                 f"{training['planned_steps']} planned steps, the learning rate decayed to 0 at "
                 "the last (train/schedule.json). The run was bounded by time: the numbers "
                 "above are those of the steps this machine fitted, fully annealed.")
  elif training and training["steps"] < training["planned_steps"]:
    lines.append(f"WARNING: training stopped at its time limit ({training['time_limit_s']:.0f} s) "
                 f"after {training['steps']} of {training.get('replanned_steps') or training['planned_steps']} "
                 "steps: this machine is slower than the config was sized for, and the numbers "
                 "above are those of a shorter run than the config's docstring promises.")
  silent = [e.get("silent_stream_fraction", 0.0) for e in summary["per_exit"]]
  if any(silent):
    lines.append("WARNING: silent output streams (estimate > 30 dB below its source), share per "
                 "exit: " + ", ".join(f"{s:.0%}" for s in silent) + ". Training fell into the "
                 "likelihood's silent-stream solution; see docs/model.md, mixture consistency.")
  lines.append(f"Dynamic exits (confidence p = {summary['dynamic'][0]['confidence']}):")
  lines.append(f"{'t (dB)':>7} {'SI-SNRi':>8} {'GMAC/s':>8} {'mean exit':>10} {'regret':>7} "
               f"{'oracle GMAC/s':>14} {'oracle regret':>14}")
  for d in summary["dynamic"]:
    lines.append(f"{d['target_db']:>7.1f} {d['si_snri_db']:>8.2f} {d['gmac_per_s']:>8.3f} "
                 f"{d['mean_exit']:>10.2f} {d['regret_db']:>7.2f} {d['oracle_gmac_per_s']:>14.3f}"
                 f" {d['oracle_regret_db']:>14.2f}")
  if summary.get("policies"):
    lines.append("Every policy (regret at the middle target; above static: SI-SNRi minus the "
                 "static-exit curve at equal GMAC/s):")
    targets = list(summary["policies"][0]["regret_db"])
    middle = targets[len(targets) // 2]
    lines.append(f"{'policy':<28} {'SI-SNRi':>8} {'GMAC/s':>8} {'mean exit':>10} "
                 f"{'regret@' + middle:>11} {'above static':>13}")
    for row in summary["policies"]:
      name = row["policy"] + "".join(
          f" {k}={v:g}" for k, v in row.items()
          if k in ("target_db", "confidence", "exit", "threshold_db", "patience", "seed"))
      above = row.get("above_static_db")
      lines.append(f"{name:<28} {row['si_snri_db']:>8.2f} {row['gmac_per_s']:>8.3f} "
                   f"{row['mean_exit']:>10.2f} {row['regret_db'][middle]:>11.2f} "
                   + (f"{above:>13.2f}" if above is not None else f"{'-':>13}"))
  return "\n".join(lines)


def run(experiment: configs.ExperimentConfig, workdir: str) -> dict:
  """All stages; returns the evaluation summary."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "experiment.json"), "w") as handle:
    json.dump(experiment.to_dict(), handle, indent=1, default=str)
  started = time.perf_counter()
  build_data(experiment.data)
  model_dir = run_training(experiment, workdir)
  trained_steps = checkpointing.make_manager(model_dir).latest_step() or 0
  if experiment.finetune is not None:
    model_dir = run_finetuning(experiment, workdir, model_dir)
  summary = run_evaluation(experiment, model_dir, experiment.data.test_split,
                           experiment.max_test_batches)
  plan = train_lib.read_schedule(os.path.join(workdir, "train"))
  summary["training"] = {"steps": trained_steps, "planned_steps": experiment.train.steps,
                         "replanned_steps": plan["steps"] if plan and plan["replans"] else None,
                         "time_limit_s": experiment.train.time_limit_s}
  save_final_model(model_dir, os.path.join(workdir, "model"))
  stages = None
  if experiment.calibration_figure:  # Collective (every process evaluates), like the above.
    from experiments import calibrate  # pylint: disable=import-outside-toplevel (imports main)

    stages = calibrate.calibration_study(
        experiment, workdir, (experiment.data.test_split,), experiment.max_test_batches,
        store=False)
    summary["calibration_stages"] = stages
  if jax.process_index() == 0:
    results_path = write_results(workdir, summary)
    plot_paths = plots.plot_run(workdir, summary)
    if stages is not None:
      plot_paths.append(plots.calibration_stages(
          stages["rows"], experiment.data.test_split, os.path.join(
              workdir, plots.PLOT_DIR, f"calibration_stages_{experiment.data.test_split}.png")))
    plot_paths.append(os.path.join(workdir, plots.PLOT_DIR, "exit_map.png"))
    plots.exit_map_of_mixture(os.path.join(workdir, "model"),
                              first_mixture(experiment.data, experiment.data.test_split),
                              plot_paths[-1])
    print(format_report(summary))
    print(f"\nresults:     {results_path}\nevaluation:  {os.path.join(workdir, 'evaluation.json')}"
          f"\ncheckpoints: {os.path.join(workdir, 'train', 'checkpoints')}, "
          f"{os.path.join(workdir, 'finetune', 'checkpoints')}\n"
          f"model:       {os.path.join(workdir, 'model')} (press-separate --model {workdir} "
          "--out-dir OUT FILES...)\n"
          f"tensorboard: tensorboard --logdir {workdir}\nplots:       "
          + ", ".join(plot_paths)
          + f"\ntotal time:  {time.perf_counter() - started:.0f} s", flush=True)
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help=configs.CONFIG_HELP)
  parser.add_argument("--workdir", default=os.path.join("runs", "demo"))
  parser.add_argument("--coordinator-address")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args, experiment = configs.parse_command_line(parser, argv)
  logging.basicConfig(level=logging.WARNING)
  compilation_cache.enable()  # A re-run or a resumed run loads its programs from disk.
  allocator.configure()  # Large host buffers without page faults (press_jax/allocator.py).
  distributed.initialize_from_flags_or_environment(
      args.coordinator_address, args.num_processes, args.process_id)
  run(experiment, args.workdir)


if __name__ == "__main__":
  main()
