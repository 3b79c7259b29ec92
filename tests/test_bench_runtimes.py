"""bench_runtimes: the peer comparison's JSON on a reduced tiny config (JAX, PyTorch, onnxruntime).

torch and the onnx extra are installed in CI (the dev extra); without them the figures are null
and `unavailable` says why, which the first test checks too. torch.compile takes ~2 minutes to
compile even the tiny model here, so CI runs eager PyTorch only; the compiled mode runs in the
slow-marked test (make test-all).
"""

import json

import pytest

from experiments import bench_runtimes

REDUCED = ["--configs", "tiny", "--crop-seconds", "0.25", "--audio-seconds", "0.5",
           "--repeats", "1", "--json"]
KEYS = {"config", "jax_train_examples_per_s", "torch_train_examples_per_s", "train_ratio",
        "inference"}


def run(capsys, argv):
  assert bench_runtimes.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1, lines
  return json.loads(lines[0])


def check(result, modes):
  assert KEYS <= result.keys() and result["config"] == "tiny"
  missing = result["unavailable"]
  assert result["jax_train_examples_per_s"] > 0
  assert result["jax_train_examples_per_s"] == pytest.approx(
      result["batch"] / result["jax_train"]["step_s"])
  assert [row["exit"] for row in result["inference"]] == [1, 2]  # tiny: 2 exits
  for row in result["inference"]:
    assert row["jax_rtf"] > 0 and row["jax_export_kernel_rtf"] > 0
    assert (row["onnxruntime_rtf"] is None) == ("onnxruntime" in missing)
    if row["onnxruntime_rtf"] is not None:
      assert row["onnxruntime_vs_jax"] == pytest.approx(row["onnxruntime_rtf"] / row["jax_rtf"])
    assert (row["torch_rtf"] is None) == ("torch" in missing)
    for key in ("onnxruntime_rtf", "torch_rtf"):
      assert row[key] is None or row[key] > 0
  if "torch" in missing:
    assert result["train_ratio"] is None
    return
  assert set(result["torch_train"]) == set(modes)
  rates = [mode["examples_per_s"] for mode in result["torch_train"].values()
           if "examples_per_s" in mode]
  assert result["torch_train_examples_per_s"] == max(rates)
  assert result["train_ratio"] == pytest.approx(
      result["jax_train_examples_per_s"] / result["torch_train_examples_per_s"])
  # Like with like: both frameworks' first step computes the same loss on the same batch from
  # the same parameters (two implementations of the model and the Student-t likelihood).
  jax_loss = result["jax_train"]["first_loss"]
  for mode in result["torch_train"].values():
    if "first_loss" in mode:
      assert mode["first_loss"] == pytest.approx(jax_loss, rel=1e-4, abs=1e-5)


def test_reduced_run_reports_every_runtime(capsys):
  result = run(capsys, REDUCED + ["--no-torch-compile", "--onnx-as-converted"])
  check(result, modes=("eager",))
  for row in result["inference"]:  # jax2onnx's graphs without press_jax's rewrites, beside.
    if row["onnxruntime_rtf"] is not None:
      assert row["onnxruntime_as_converted_rtf"] > 0


@pytest.mark.slow
def test_reduced_run_with_torch_compile(capsys):
  result = run(capsys, REDUCED)
  check(result, modes=("eager", "compile"))
  compiled = result["torch_train"]["compile"]
  assert "error" in compiled or compiled["compile_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--configs", "L"], "unknown experiment 'L'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--audio-seconds", "-1"], "--audio-seconds must be positive"),
])
def test_bad_arguments_are_one_line(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    bench_runtimes.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err.strip().splitlines()[-1]
