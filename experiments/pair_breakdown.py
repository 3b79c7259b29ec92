"""Per-exit SI-SNRi on press_synth grouped by the genders of each mixture's two speakers.

Run (after `make demo`; ~40 s for a split of 200 utterances on 2 CPU cores):
  python -m experiments.pair_breakdown --model-dir runs/demo --split test [--json]
Prints, per group (male-male, female-female, male-female, all) and exit, the mean SI-SNRi over
the group's utterances (PIT, full length), and the ten hardest speaker pairs at the last exit.
The README's demo section uses it to show where the test split's gap comes from: the embedded
corpus's test speakers hold more same-gender pairs with similar voices than validation does.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

import data_pipelines
from data_pipelines import loaders
from experiments import configs, main
from press_jax import evaluation, model_dir

GROUPS = ("male-male", "female-female", "male-female")


def speaker_genders(data: configs.DataConfig) -> dict[str, str]:
  """speaker id -> 'male' / 'female', from the press_synth build's metadata."""
  _, info, _ = loaders.open_split(data.dataset, data.data_dir, data.validation_split,
                                  config=data.builder_config)
  speakers = (info.metadata or {}).get("speakers")
  if not speakers:
    raise SystemExit(f"{data.dataset}/{data.builder_config}: no speaker metadata "
                     "(only press_synth records speaker genders).")
  return {speaker["speaker_id"]: speaker["gender"] for speaker in speakers}


def pair_group(example_id: str, genders: dict[str, str]) -> tuple[str, str]:
  """('male-female', 'spk03+spk71') from an id like 'test_00012_spk03_spk71'."""
  first, second = example_id.split("_")[-2:]
  pair = sorted([genders[first], genders[second]], reverse=True)  # male before female
  return "-".join(pair), "+".join(sorted([first, second]))


def per_utterance_si_snri(model, params, batches):
  """[(id, per-exit SI-SNRi (exits,))] of every real utterance, from the library's evaluator."""
  evaluator = evaluation.Evaluator(model, params, policy=None, with_calibration=False)
  ids = []
  for batch in batches:
    evaluator.add(batch)
    ids += [str(i) for i, keep in zip(np.ravel(batch["id"]), np.ravel(batch["example_mask"]))
            if keep > 0]
  values = evaluator.per_utterance()["si_snri"]  # (utterances, exits), in the batches' order
  if len(values) != len(ids):
    raise RuntimeError(f"pair_breakdown: {len(ids)} utterance ids but {len(values)} rows")
  return list(zip(ids, values))


def breakdown(model, params, data: configs.DataConfig, split: str) -> dict:
  """{'groups': {group: {'count', 'si_snri_db'}}, 'hardest_pairs': [...]} for `split`."""
  genders = speaker_genders(data)
  batches = data_pipelines.make_eval_iterator(
      data.dataset, split=split, batch_size_per_device=data.eval_batch_size_per_device,
      bucket_seconds=data.bucket_seconds, num_devices=1, process_index=0, process_count=1,
      **main.data_arguments(data))
  by_group, by_pair = collections.defaultdict(list), collections.defaultdict(list)
  for example_id, values in per_utterance_si_snri(model, params, batches):
    group, pair = pair_group(example_id, genders)
    by_group[group].append(values)
    by_group["all"].append(values)
    by_pair[(group, pair)].append(values[-1])
  groups = {group: {"count": len(by_group[group]),
                    "si_snri_db": [round(float(v), 3) for v in np.mean(by_group[group], axis=0)]}
            for group in (*GROUPS, "all") if by_group[group]}
  hardest = sorted(((float(np.mean(v)), group, pair, len(v))
                    for (group, pair), v in by_pair.items()))[:10]
  return {"split": split, "groups": groups,
          "hardest_pairs": [{"pair": pair, "group": group, "count": count,
                             "si_snri_db_last_exit": round(value, 3)}
                            for value, group, pair, count in hardest]}


def main_cli(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", required=True,
                      help="a saved model, a training work directory or a main-job work directory")
  parser.add_argument("--config", default="demo",
                      help="the experiment whose data settings to use: " + configs.CONFIG_HELP)
  parser.add_argument("--split", default="test")
  parser.add_argument("--json", action="store_true")
  args, experiment = configs.parse_command_line(parser, argv)
  loaded = model_dir.load(args.model_dir)
  result = {"model": args.model_dir,
            **breakdown(loaded.model, loaded.params, experiment.data, args.split)}
  if args.json:
    print(json.dumps(result))
    return result
  print(f"{args.split} split, {args.model_dir}: mean SI-SNRi (dB) per exit")
  for group, row in result["groups"].items():
    values = " / ".join(f"{v:.2f}" for v in row["si_snri_db"])
    print(f"  {group:14s} {row['count']:4d} utterances  {values}")
  print("hardest speaker pairs at the last exit:")
  for row in result["hardest_pairs"]:
    print(f"  {row['pair']:12s} {row['group']:14s} {row['count']:3d}  "
          f"{row['si_snri_db_last_exit']:.2f}")
  return result


if __name__ == "__main__":
  main_cli()
