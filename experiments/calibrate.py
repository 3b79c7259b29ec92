"""Post-calibration of a trained model on the validation split, stored beside its parameters.

Run (after `make demo`; ~2 minutes on 2 CPU cores):
  python -m experiments.calibrate --model-dir runs/demo
Fits per-exit scale factors on alpha and beta by maximising the Student-t likelihood of the
validation blocks' errors (`calibration.fit_post_calibration`), writes them to
`<parameters>/post_calibration.json` (for runs/demo: runs/demo/model/), where
`press_jax.model_dir.load` finds them: `experiments.evaluate`, `press-separate` and the exit rule
then apply them. Prints, per exit, the KS distance of the PIT values to uniform and the CRPS
(dB) of the predicted error variance, on validation and test, for each model it finds: before
full-length fine-tuning (<workdir>/train), after it (the final model), and after
post-calibration. Writes the table to <workdir>/calibration.json and the paper's Fig. 5, PIT
histograms per exit for each of those models, to <workdir>/plots/calibration_stages_<split>.png.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from experiments import configs, main, plots
from press_jax import allocator, calibration, compilation_cache, compute, evaluation, model_dir


def evaluate_split(experiment, loaded, split, max_batches, post_calibration=None):
  """(Evaluator summary's per-exit calibration, the evaluator) of one model on one split."""
  costs = compute.exit_costs(loaded.model.config)
  evaluator = evaluation.Evaluator(
      loaded.model, loaded.params, [c.gmac_per_s for c in costs], policy=None,
      with_sdr=False, post_calibration=post_calibration)  # Exits and calibration only.
  summary = evaluator.run(main.eval_iterator_factory(experiment.data, split, max_batches)())
  return [{"exit": e["exit"], "pit_ks": e["calibration"]["pit_ks"],
           "crps_db": e["calibration"]["crps_db"], "si_snri_db": e["si_snri_db"],
           "pit_histogram": e["calibration"]["pit_histogram"]}
          for e in summary["per_exit"]], evaluator


def format_table(rows) -> str:
  lines = [f"{'model':<26} {'split':<11} {'exit':>4} {'PIT KS':>7} {'CRPS dB':>8} "
           f"{'SI-SNRi':>8}"]
  for row in rows:
    lines.append(f"{row['model']:<26} {row['split']:<11} {row['exit']:>4} {row['pit_ks']:>7.3f} "
                 f"{row['crps_db']:>8.3f} {row['si_snri_db']:>8.2f}")
  return "\n".join(lines)


def calibration_study(experiment, directory: str, splits, max_batches=None, *,
                      shared: bool = False, store: bool = True) -> dict:
  """Fig. 5's models on `splits`: before fine-tuning (<directory>/train, when there), the final
  model, and the final model with a post-calibration fitted on the validation split.

  `directory`: a main-job work directory, a saved model or a training work directory. With
  `store`, the fitted factors are written beside the parameters (where model_dir.load finds
  them); without, they are only reported. Returns {'post_calibration', 'path' (None unless
  stored), 'rows'}: one row per model, split and exit (PIT KS, CRPS, SI-SNRi, PIT histogram).
  """
  loaded = model_dir.load(directory)
  data = experiment.data
  # Fit on validation with the stored calibration removed (the fit starts from the raw model).
  raw = model_dir.LoadedModel(model=loaded.model, params=loaded.params, calibration=None,
                              directory=loaded.directory, kind=loaded.kind)
  rows = []
  before_finetuning = os.path.join(directory, "train")
  models = [("final model", raw, None)]
  if os.path.abspath(loaded.directory) != os.path.abspath(before_finetuning) and os.path.isdir(
      before_finetuning):
    try:
      models.insert(0, ("before fine-tuning", model_dir.load(before_finetuning), None))
    except model_dir.ModelDirError:
      pass
  _, validation = evaluate_split(experiment, raw, data.validation_split, max_batches)
  statistics = validation.block_statistics()
  fitted = calibration.fit_post_calibration(
      statistics["error_energy"], statistics["count"], statistics["log_var"],
      statistics["log_alpha"], per_exit=not shared)
  path = None
  if store:
    path = os.path.join(loaded.directory, model_dir.POST_CALIBRATION_FILE)
    if jax.process_index() == 0:  # Every host fits the same factors (gathered blocks).
      calibration.save_post_calibration(path, fitted)
  models.append(("final + post-calibration", raw, fitted))
  for name, model, factors in models:
    for split in splits:
      per_exit, _ = evaluate_split(experiment, model, split, max_batches, factors)
      rows += [{"model": name, "split": split, **entry} for entry in per_exit]
  return {"post_calibration": fitted.to_dict(), "path": path, "rows": rows}


def main_cli(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", required=True,
                      help="a main-job work directory (runs/demo), a saved model or a training "
                           "work directory")
  parser.add_argument("--config", default="demo",
                      help="the experiment whose data settings to use: " + configs.CONFIG_HELP)
  parser.add_argument("--max-batches", type=int, default=None,
                      help="at most this many batches per split (default: all)")
  parser.add_argument("--shared", action="store_true",
                      help="one pair of factors for all exits instead of one per exit")
  args, experiment = configs.parse_command_line(parser, argv)
  compilation_cache.enable()
  allocator.configure()
  try:
    loaded = model_dir.load(args.model_dir)
  except model_dir.ModelDirError as error:
    parser.error(f"--model-dir {error}")
  main.build_data(experiment.data)
  data = experiment.data
  table = calibration_study(experiment, args.model_dir,
                            (data.validation_split, data.test_split), args.max_batches,
                            shared=args.shared)
  rows, fitted, path = table["rows"], table["post_calibration"], table["path"]
  lead_host = jax.process_index() == 0
  out = os.path.join(args.model_dir if os.path.isdir(args.model_dir) else loaded.directory,
                     "calibration.json")
  if not lead_host:
    return table
  with open(out, "w") as handle:
    json.dump(table, handle, indent=1)
  figure_dir = os.path.join(os.path.dirname(out), plots.PLOT_DIR)
  os.makedirs(figure_dir, exist_ok=True)
  figures = [plots.calibration_stages(rows, split, os.path.join(
      figure_dir, f"calibration_stages_{split}.png")) for split in (data.validation_split,
                                                                    data.test_split)]
  print(format_table(rows))
  print(f"\npost-calibration: {path}\n  log alpha scale {np.round(fitted['log_alpha_scale'], 3).tolist()}"
        f"\n  log beta scale  {np.round(fitted['log_beta_scale'], 3).tolist()}"
        f"\ntable: {out}\nfigures: {', '.join(figures)}", flush=True)
  return table


if __name__ == "__main__":
  main_cli()
