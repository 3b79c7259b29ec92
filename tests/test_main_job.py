"""The main job end to end (corpus build, train, fine-tune, evaluate, report) on a tiny corpus."""

import dataclasses
import json
import os

import pytest

from experiments import configs, main


def tiny_experiment(data_dir, steps, finetune_steps, with_sdr):
  base = configs.get("tiny")
  return dataclasses.replace(
      base,
      train=dataclasses.replace(
          base.train, steps=steps, log_every=2, eval_every=0, checkpoint_every=2,
          optimizer=dataclasses.replace(base.train.optimizer, warmup_steps=1,
                                        total_steps=steps)),
      data=dataclasses.replace(base.data, builder_config="clean_8k_n6-2-3", data_dir=str(data_dir),
                               eval_batch_size_per_device=1, crop_seconds=0.5),
      finetune=configs.FinetuneConfig(min_steps=finetune_steps, steps_fraction=0.0),
      with_sdr=with_sdr, max_test_batches=None)


def check_outputs(workdir, summary, test_utterances):
  with open(os.path.join(workdir, "results.json")) as handle:
    results = json.load(handle)
  assert [row["exit"] for row in results] == [1, 2]
  for row in results:
    assert set(row) == {"exit", "si_snri_db", "params", "gmac_per_s"}
  assert results[0]["params"] < results[1]["params"]
  assert results[0]["gmac_per_s"] < results[1]["gmac_per_s"]
  assert summary["utterances"] == test_utterances
  assert all(0.0 <= e["silent_stream_fraction"] <= 1.0 for e in summary["per_exit"])
  for name in ("evaluation.json", "plots/learning_curve.png", "plots/quality_vs_compute.png",
               "plots/calibration.png", "plots/exit_map.png", "plots/calibration_stages_test.png",
               "train/train_history.json", "finetune/train_history.json",
               "model/config.json", "model/params.msgpack"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "train", "tensorboard"))
  # evaluation.json keeps its layout (keys and their order) across evaluator changes.
  with open(os.path.join(workdir, "evaluation.json")) as handle:
    written = json.load(handle)
  assert list(written) == ["utterances", "per_exit", "dynamic", "policies", "post_calibration",
                           "seconds", "model_dir", "split", "training", "calibration_stages"]
  # Fig. 5 on test: the three stages, the post-calibration reported but not stored.
  stages = written["calibration_stages"]
  assert stages["path"] is None and not os.path.exists(
      os.path.join(workdir, "model", "post_calibration.json"))
  assert list(dict.fromkeys(row["model"] for row in stages["rows"])) == [
      "before fine-tuning", "final model", "final + post-calibration"]
  assert {row["split"] for row in stages["rows"]} == {"test"}
  final = [row for row in stages["rows"] if row["model"] == "final model"]
  # The same model and split as the main evaluation: the same PIT distance per exit.
  assert [row["pit_ks"] for row in final] == pytest.approx(
      [e["calibration"]["pit_ks"] for e in written["per_exit"]], abs=1e-4)
  for entry in written["per_exit"]:
    assert list(entry) == ["exit", "si_snr_db", "si_snri_db", "gmac_per_s",
                           "silent_stream_fraction", "calibration", "params"]
    assert list(entry["calibration"]) == ["blocks", "pit_ks", "crps_db", "pit_histogram"]
  for entry in written["dynamic"]:
    assert list(entry) == ["target_db", "confidence", "si_snri_db", "gmac_per_s", "mean_exit",
                           "regret_db", "oracle_gmac_per_s", "oracle_regret_db",
                           "static_regret_db", "exit_histogram"]
  parameters = {"dynamic": ["target_db", "confidence"], "static": ["exit"], "uniform": ["seed"],
                "oracle": ["target_db"], "similarity": ["threshold_db"],
                "patience": ["threshold_db", "patience"]}
  for row in written["policies"]:
    assert list(row) == (["policy"] + parameters[row["policy"]] + [
        "si_snri_db", "gmac_per_s", "mean_exit", "regret_db"]
        + ([] if row["policy"] == "static" else ["above_static_db"]))
  assert {row["policy"] for row in written["policies"]} == set(parameters)


def test_main_job_reduced(tmp_path, capsys):
  experiment = tiny_experiment(tmp_path / "data", steps=2, finetune_steps=1, with_sdr=False)
  workdir = str(tmp_path / "run")
  summary = main.run(experiment, workdir)
  check_outputs(workdir, summary, test_utterances=3)
  printed = capsys.readouterr().out
  assert "SI-SNRi" in printed and "results.json" in printed and "KS distance" in printed
  # A second call finds every stage finished and only re-evaluates.
  again = main.run(experiment, workdir)
  assert again["per_exit"] == summary["per_exit"]
  # experiments.evaluate scores the same work directory on any split.
  from experiments import evaluate

  data_sets = ["--config.data.builder_config=clean_8k_n6-2-3",
               f"--config.data.data_dir={tmp_path / 'data'}",
               "--config.data.eval_batch_size_per_device=1", "--config.with_sdr=False"]
  model_dir = os.path.join(workdir, "finetune")
  on_test = evaluate.main_cli(["--config", "tiny", "--model-dir", model_dir, "--split", "test"]
                              + data_sets)
  assert [e["si_snri_db"] for e in on_test["per_exit"]] == pytest.approx(
      [e["si_snri_db"] for e in summary["per_exit"]], abs=1e-5)
  on_validation = evaluate.main_cli(["--config", "tiny", "--model-dir", model_dir, "--split",
                                     "validation"] + data_sets)
  assert on_validation["utterances"] == 2 and on_validation["split"] == "validation"
  with open(os.path.join(model_dir, "evaluation_validation.json")) as handle:
    assert json.load(handle)["utterances"] == 2
  assert "Validation split: 2 utterances" in capsys.readouterr().out
  # The final model is what press-separate reads from the work directory.
  from press_jax import model_dir as model_dir_lib

  loaded = model_dir_lib.load(workdir)
  assert loaded.kind == "saved" and loaded.directory == os.path.join(workdir, "model")
  assert model_dir_lib.load(os.path.join(workdir, "finetune")).kind == "checkpoint"
  assert loaded.calibration is None
  # experiments.calibrate fits the post-calibration beside the final model, reports every stage
  # and draws Fig. 5; the loader then finds the calibration.
  from experiments import calibrate

  table = calibrate.main_cli(["--config", "tiny", "--model-dir", workdir] + data_sets[:-1])
  assert list(dict.fromkeys(row["model"] for row in table["rows"])) == [
      "before fine-tuning", "final model", "final + post-calibration"]
  assert all(0.0 <= row["pit_ks"] <= 1.0 for row in table["rows"])
  for name in ("calibration.json", "plots/calibration_stages_validation.png",
               "plots/calibration_stages_test.png", "model/post_calibration.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert model_dir_lib.load(workdir).calibration is not None


def test_report_warns_of_silent_streams():
  def summary(silent):
    per_exit = [{"exit": e, "si_snri_db": 1.0, "params": 1000 * e, "gmac_per_s": 0.1 * e,
                 "silent_stream_fraction": fraction, "calibration": {"pit_ks": 0.1}}
                for e, fraction in ((1, silent), (2, 0.0))]
    dynamic = [{"target_db": 10.0, "confidence": 0.9, "si_snri_db": 1.0, "gmac_per_s": 0.1,
                "mean_exit": 1.0, "regret_db": 0.0, "oracle_gmac_per_s": 0.1,
                "oracle_regret_db": 0.0}]
    return {"utterances": 4, "per_exit": per_exit, "dynamic": dynamic}

  assert "silent output streams" not in main.format_report(summary(0.0))
  report = main.format_report(summary(0.25))
  assert "WARNING: silent output streams" in report and "25%, 0%" in report
  finished = dict(summary(0.0), training={"steps": 1100, "planned_steps": 1100,
                                          "time_limit_s": 840.0})
  assert "time limit" not in main.format_report(finished)
  cut = dict(finished, training=dict(finished["training"], steps=950))
  assert "WARNING: training stopped at its time limit (840 s) after 950 of 1100 steps" in (
      main.format_report(cut))
  replanned = dict(finished, training=dict(finished["training"], steps=900,
                                           replanned_steps=900))
  report = main.format_report(replanned)
  assert "NOTE: training was re-planned to fit its time limit (840 s): 900 of 1100" in report
  assert "WARNING" not in report
  short_of_the_replan = dict(finished, training=dict(finished["training"], steps=850,
                                                     replanned_steps=900))
  assert "after 850 of 900 steps" in main.format_report(short_of_the_replan)


def test_evaluate_names_a_work_directory_without_checkpoints(tmp_path, capsys):
  from experiments import evaluate

  with pytest.raises(SystemExit):
    evaluate.main_cli(["--model-dir", str(tmp_path), "--split", "test"])
  assert f"--model-dir {tmp_path}: holds no model" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_tiny_config(tmp_path):
  experiment = dataclasses.replace(
      configs.get("tiny"),
      data=dataclasses.replace(configs.get("tiny").data, builder_config="clean_8k_tiny",
                               data_dir=str(tmp_path / "data")))
  workdir = str(tmp_path / "run")
  summary = main.run(experiment, workdir)
  check_outputs(workdir, summary, test_utterances=8)


def test_budget_probe_trains_then_validates(tmp_path):
  from experiments import budget_probe

  experiment = tiny_experiment(tmp_path / "data", steps=2, finetune_steps=1, with_sdr=False)
  row = budget_probe.probe(experiment, str(tmp_path / "probe"), seconds=600)
  assert row["steps"] == 2  # The step budget ran out before the time budget.
  assert row["validation_utterances"] > 0
  assert len(row["validation_si_snri_db"]) == 2
  assert all(isinstance(v, float) for v in row["validation_si_snri_db"])


def test_budget_probe_rejects_a_non_positive_budget(tmp_path, capsys):
  from experiments import budget_probe

  with pytest.raises(SystemExit):
    budget_probe.main_cli(["--seconds", "0", "--workdir", str(tmp_path)])
  assert "--seconds must be positive, got 0.0" in capsys.readouterr().err
