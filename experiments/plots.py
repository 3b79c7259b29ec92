"""Figures of a run: learning curve, SI-SNRi and regret vs GMAC/s, PIT calibration histograms,
and the exit map of one test mixture (the paper's Fig. 1).

Run on a finished work directory:
  python -m experiments.plots runs/demo
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOT_DIR = "plots"
EXIT_MAP_POLICY = {"target_db": 5.0, "confidence": 0.9}  # The exit map's rule (README's example).


def _history(workdir: str, stage: str) -> list[dict]:
  path = os.path.join(workdir, stage, "train_history.json")
  if not os.path.isfile(path):
    return []
  with open(path) as handle:
    return json.load(handle)


def learning_curve(workdir: str, path: str) -> None:
  """Training SI-SNR per exit against step (crop training, then fine-tuning)."""
  figure, axes = plt.subplots(1, 2, figsize=(11, 4))
  train = [r for r in _history(workdir, "train") if "per_exit_si_snr" in r]
  last_step = train[-1]["step"] if train else 0
  finetune = [dict(r, step=r["step"] + last_step)
              for r in _history(workdir, "finetune") if "per_exit_si_snr" in r]
  for rows, style in ((train, "-"), (finetune, "--")):
    if not rows:
      continue
    exits = len(rows[0]["per_exit_si_snr"])
    for e in range(exits):
      axes[0].plot([r["step"] for r in rows], [r["per_exit_si_snr"][e] for r in rows], style,
                   color=f"C{e}", label=f"exit {e + 1}" if style == "-" else None)
    axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], style, color="k")
  evals = [r for r in _history(workdir, "train") if "eval" in r]
  for e in range(len(evals[0]["eval"]["si_snr_improvement"]) if evals else 0):
    axes[0].plot([r["step"] for r in evals], [r["eval"]["si_snr"][e] for r in evals], "o",
                 color=f"C{e}")
  axes[0].set(xlabel="step", ylabel="SI-SNR (dB)",
              title="training crops (lines), validation (dots); dashed: fine-tuning")
  axes[0].legend()
  axes[1].set(xlabel="step", ylabel="loss", title="training loss")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def quality_vs_compute(summary: dict, path: str) -> None:
  """SI-SNRi against GMAC/s (paper Fig. 3) and regret against GMAC/s (Fig. 4), every policy."""
  figure, axes = plt.subplots(1, 2, figsize=(11, 4))
  static = summary["per_exit"]
  axes[0].plot([e["gmac_per_s"] for e in static], [e["si_snri_db"] for e in static], "o-",
               color="k", label="static exits")
  table = summary.get("policies")
  if table:
    styles = {"dynamic": "s--", "oracle": "*:", "similarity": "^-.", "patience": "v-."}
    groups = {}
    for row in table:
      if row["policy"] == "dynamic":
        groups.setdefault(f"dynamic p={row['confidence']:g}", []).append(row)
      elif row["policy"] in styles:
        key = row["policy"] if row["policy"] == "oracle" else row["policy"]
        groups.setdefault(key, []).append(row)
    for index, (label, rows) in enumerate(groups.items()):
      style = styles[label.split(" ")[0]]
      axes[0].plot([r["gmac_per_s"] for r in rows], [r["si_snri_db"] for r in rows], style,
                   color=f"C{index}", label=label)
    uniform = [r for r in table if r["policy"] == "uniform"]
    for r in uniform:
      axes[0].plot([r["gmac_per_s"]], [r["si_snri_db"]], "X", color="gray", label="uniform")
    # Regret at the middle target of the sweep, every policy.
    targets = list(table[0]["regret_db"])
    target = targets[len(targets) // 2]
    for index, (label, rows) in enumerate(groups.items()):
      style = styles[label.split(" ")[0]]
      axes[1].plot([r["gmac_per_s"] for r in rows], [r["regret_db"][target] for r in rows],
                   style, color=f"C{index}", label=label)
    statics = [r for r in table if r["policy"] == "static"]
    axes[1].plot([r["gmac_per_s"] for r in statics], [r["regret_db"][target] for r in statics],
                 "o-", color="k", label="static")
    for r in uniform:
      axes[1].plot([r["gmac_per_s"]], [r["regret_db"][target]], "X", color="gray",
                   label="uniform")
    axes[1].set(xlabel="GMAC/s", ylabel=f"one-sided regret at t = {target} dB (dB)",
                title="regret vs compute")
  else:
    dynamic = summary["dynamic"]
    axes[0].plot([d["gmac_per_s"] for d in dynamic], [d["si_snri_db"] for d in dynamic], "s--",
                 label=f"dynamic (p = {dynamic[0]['confidence']})")
  axes[0].set(xlabel="GMAC/s", ylabel="SI-SNRi (dB)", title="quality vs compute (test)")
  axes[0].legend(fontsize=7)
  axes[1].legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def calibration(summary: dict, path: str) -> None:
  """Histogram of the PIT values of each exit's predicted error variance (flat = calibrated)."""
  exits = summary["per_exit"]
  figure, axes = plt.subplots(1, len(exits), figsize=(3.2 * len(exits), 3), sharey=True,
                              squeeze=False)
  for axis, entry in zip(axes[0], exits):
    density = entry["calibration"]["pit_histogram"]
    edges = np.linspace(0.0, 1.0, len(density) + 1)
    axis.bar(edges[:-1], density, width=np.diff(edges), align="edge", alpha=0.7)
    axis.axhline(1.0, color="k", linestyle=":", label="calibrated")
    axis.set(xlabel="PIT value", title=f"exit {entry['exit']}: KS "
             f"{entry['calibration']['pit_ks']:.3f}")
  axes[0][0].set(ylabel="density (test blocks)")
  axes[0][0].legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def calibration_stages(rows: list[dict], split: str, path: str) -> str:
  """The paper's Fig. 5: PIT histograms per exit (columns) for each model stage (rows).

  `rows`: experiments.calibrate's table rows ({'model', 'split', 'exit', 'pit_ks',
  'pit_histogram'}); only those of `split` are drawn. Returns `path`.
  """
  rows = [row for row in rows if row["split"] == split]
  stages = list(dict.fromkeys(row["model"] for row in rows))
  exits = sorted({row["exit"] for row in rows})
  figure, axes = plt.subplots(len(stages), len(exits), figsize=(3.0 * len(exits),
                                                                2.4 * len(stages)),
                              sharex=True, sharey=True, squeeze=False)
  for row in rows:
    axis = axes[stages.index(row["model"])][exits.index(row["exit"])]
    density = row["pit_histogram"]
    edges = np.linspace(0.0, 1.0, len(density) + 1)
    axis.bar(edges[:-1], density, width=np.diff(edges), align="edge", alpha=0.7)
    axis.axhline(1.0, color="k", linestyle=":")
    axis.set_title(f"{row['model']}, exit {row['exit']}: KS {row['pit_ks']:.3f}", fontsize=8)
  for axis in axes[-1]:
    axis.set_xlabel("PIT value")
  for line in axes:
    line[0].set_ylabel(f"density ({split})")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def exit_map_of_mixture(model_directory: str, mixture: np.ndarray, path: str) -> dict:
  """Separates `mixture` (samples,) with the dynamic rule and draws its exit map at `path`.

  The rule is EXIT_MAP_POLICY (t = 5 dB, p = 0.9) with the stored post-calibration, if any, on
  press-separate's path (`separation.separate`: 4 s chunks, the while loop). Returns the
  separation report (per block: start_s, exit, probability).
  """
  from press_jax import model_dir, plots, separation  # pylint: disable=import-outside-toplevel

  loaded = model_dir.load(model_directory)
  settings = separation.SeparationSettings(**EXIT_MAP_POLICY)
  _, report = separation.separate(loaded.model, loaded.params, mixture, settings,
                                  loaded.calibration)
  config = loaded.model.config
  plots.exit_map(mixture, config.sample_rate, report["blocks"],
                 config.block_length / config.sample_rate, config.exits, path)
  return report


def plot_run(workdir: str, summary: dict) -> list[str]:
  """All figures of a run; returns their paths."""
  directory = os.path.join(workdir, PLOT_DIR)
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, "learning_curve.png"),
           os.path.join(directory, "quality_vs_compute.png"),
           os.path.join(directory, "calibration.png")]
  learning_curve(workdir, paths[0])
  quality_vs_compute(summary, paths[1])
  calibration(summary, paths[2])
  return paths


if __name__ == "__main__":
  run_directory = sys.argv[1]
  with open(os.path.join(run_directory, "evaluation.json")) as handle:
    print("\n".join(plot_run(run_directory, json.load(handle))))
