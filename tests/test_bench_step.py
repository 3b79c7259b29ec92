"""bench_step: the step benchmark's JSON on a reduced tiny config, and the recurrence mode.

In-process, so the compiles use conftest.py's XLA flags and the session's compilation cache
(~35 s on 2 CPU cores for both tests).
"""

import json

import pytest

from experiments import bench_step


def test_step_json_on_a_reduced_tiny_config(capsys):
  assert bench_step.main(["--config", "tiny", "--config.data.crop_seconds=0.25",
                          "--config.train.batch_size_per_device=1", "--json",
                          "--repeats", "1"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1, lines
  result = json.loads(lines[0])
  assert set(bench_step.RESULT_KEYS) <= result.keys()
  assert result["config"] == "tiny"
  assert result["recurrence"] in bench_step.recurrence_implementations()
  if result["recurrence"] == "sequential":  # Its lax.scan loop is counted analytically.
    assert "analytically" in result["flops_method"]
  assert result["shape"]["samples"] == 2000 and result["shape"]["batch"] == 1
  assert result["step_s"] > 0 and result["gflop_per_step"] > 0 and result["matmul_gflops"] > 0
  assert result["achieved_gflops"] == pytest.approx(result["gflop_per_step"] / result["step_s"])
  assert result["ratio"] == pytest.approx(result["achieved_gflops"] / result["matmul_gflops"])
  parts = result["parts"]
  assert set(parts) == set(bench_step.PART_NAMES)
  # tiny: one encoder and two decoder RNN blocks, one attention block, two exits.
  expected_calls = {"encoder": 1, "speaker_split": 1, "rnn_mixers": 3, "recurrence": 3,
                    "feed_forwards": 4, "speaker_attention": 1, "waveform_heads": 2,
                    "variance_heads": 2, "loss_pit": 1, "optimizer_update": 1}
  assert {name: entry["calls"] for name, entry in parts.items()} == expected_calls
  for name, entry in parts.items():
    assert entry["forward_ms"] > 0 and entry["forward_backward_ms"] > 0, name
    assert entry["step_forward_backward_ms"] == pytest.approx(
        entry["calls"] * entry["forward_backward_ms"]), name
  assert result["parts_sum_ms"] == pytest.approx(bench_step.parts_sum_ms(parts))
  assert result["other_ms"] == pytest.approx(1e3 * result["step_s"] - result["parts_sum_ms"])


def test_recurrence_json_names_every_implementation(capsys):
  assert bench_step.main(["--recurrence", "--json", "--shape", "2,64,8", "--repeats", "1"]) == 0
  captured = capsys.readouterr()
  lines = captured.out.strip().splitlines()
  assert len(lines) == 1, lines
  result = json.loads(lines[0])
  assert set(result) == set(bench_step.recurrence_implementations())
  for name, entry in result.items():
    assert entry["forward_ms"] > 0 and entry["forward_backward_ms"] > 0, name
  assert "GFLOP/s" in captured.err  # The matmul reference goes to stderr.


def test_speech_like_batch():
  batch = bench_step.speech_like_batch(3, 2, 4000, 8000, seed=1)
  assert batch["sources"].shape == (3, 2, 4000) and batch["mixture"].shape == (3, 4000)
  assert (batch["mixture"] == batch["sources"].sum(1)).all() and batch["mask"].all()
  rms = (batch["sources"] ** 2).mean(-1) ** 0.5
  assert ((rms > 0.05) & (rms < 0.2)).all()  # 0.1 RMS within +-5 dB.


def test_module_of_folds_stages_and_tells_the_pass():
  assert bench_step.module_of(
      "jit(train_step)/transpose(jvp(PressNet))/while/body/closed_call/stages/stage1_rnn0/"
      "mixer/mul") == ("PressNet/stages/stage*_rnn0", "backward")
  assert bench_step.module_of("jit(train_step)/jvp(PressNet)/encoder/conv/dot_general") == (
      "PressNet/encoder", "forward")
  assert bench_step.module_of("jit(train_step)/jvp(PressNet)/mul") == (
      "PressNet (between submodules)", "forward")
  assert bench_step.module_of("jit(train_step)/reduce_sum")[0].startswith("outside the model")
  assert bench_step.module_of("")[0].startswith("(no op_name")


def test_profile_attributes_the_step_to_modules(capsys):
  assert bench_step.main(["--config", "tiny", "--config.data.crop_seconds=0.25",
                          "--config.train.batch_size_per_device=1", "--json", "--no-parts",
                          "--profile", "--repeats", "1"]) == 0
  profile = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["profile"]
  modules = {row["module"]: row for row in profile["modules"]}
  assert profile["steps"] == 5 and profile["events_per_step"] > 0
  # tiny: an encoder, encoder blocks, decoder stages with waveform and variance heads.
  for name in ("PressNet/encoder", "PressNet/stages/stage*_waveform_head",
               "PressNet/stages/stage*_variance_head"):
    assert modules[name]["forward_ms"] > 0 and modules[name]["backward_ms"] > 0, name
  total = sum(row["forward_ms"] + row["backward_ms"] for row in profile["modules"])
  assert total == pytest.approx(profile["thread_ms_per_step"], rel=1e-9)
