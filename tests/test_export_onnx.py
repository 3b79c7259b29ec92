"""ONNX export (jax2onnx, run with onnxruntime): parity with the JAX model, the graphs, the CLI.

The tests that convert or run graphs need the optional extra `onnx` (installed by `make setup`,
whose `dev` extra includes it) and are skipped with the reason when it is missing; the error
cases run either way.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from experiments.configs.demo import DEMO_MODEL
from press_jax.cli import export as cli
from press_jax.export import directory as export_dir
from press_jax.export import onnx_graphs
from press_jax.export import onnx_rewrites
from press_jax.models import press_net
from tests import model_util
from tests.test_export import assert_usage_error, run_cli, saved_model  # noqa: F401 (fixture)

MISSING = onnx_graphs.missing_extra()
needs_onnx = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
TOLERANCE = 1e-4  # max |onnxruntime - JAX|, float32 (issue 13).
# The tiny preset (traced with the two-pass recurrence, checked against the associative one it
# is configured with), the demo's model (mask heads, three stages per scan group, mixture
# consistency) and cumulative exits with one stage per group (a scan over two groups).
CONFIGS = {
    "tiny": dict(recurrence="associative"),
    "demo": dict(DEMO_MODEL),
    "cumulative": dict(width=16, attention_heads=2, rnn_expansion=1.0, ffn_expansion=1.0,
                       attention_ffn_expansion=1.0, encoder_channels=16, block_length=400,
                       encoder_blocks=0, decoder_blocks=2, exits=2, attention_every=1,
                       cumulative_exits=True),
}
# Three lengths per block length: shorter than a block, ragged, whole blocks (the cumulative
# config, there for its scan over two stage groups and cumulative exits, runs the ragged one).
LENGTHS = {2000: (777, 2837, 4000), 400: (123, 837, 1200)}
# Parameters perturbed by N(0, 0.1^2) so that the exits differ while the outputs stay O(1)
# (max |mean| 4 to 6 on unit-RMS input). At model_util's default 0.3 the demo's outputs reach ~40
# and float32 rounding alone moves them by ~1e-3: two XLA compilations of the same model (the
# associative and the sequential kernel) differ by 8e-4 there, onnxruntime by 4e-3, and against
# a float64 run JAX's float32 is off by 1.9e-3, onnxruntime's by 3.5e-3 (docs/export.md).
SCALE = 0.1


def parity_inputs(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A batch of three at 8 kHz: white noise; two harmonic "voices" (f0 140 and 225 Hz, syllable
  envelopes) over a little noise, as press_synth mixes two speakers; the same kind of mixture
  padded after 60 % of its length (mask 0 there)."""
  rng = np.random.default_rng(seed)
  time = np.arange(samples) / 8000.0

  def voice(f0, rate, phase):
    envelope = 0.5 * (1.0 + np.sin(2 * np.pi * rate * time + phase)) ** 2
    tone = sum(np.sin(2 * np.pi * f0 * h * time + rng.uniform(0, 2 * np.pi)) / h
               for h in (1, 2, 3, 4))
    return envelope * tone

  def two_voices():
    return (voice(140.0, 3.1, rng.uniform(0, 6)) + 0.7 * voice(225.0, 4.3, rng.uniform(0, 6))
            + 0.01 * rng.standard_normal(samples))

  mixture = np.stack([rng.standard_normal(samples), two_voices(), 0.2 * two_voices()])
  mask = np.ones((3, samples))
  mask[2, max(1, int(0.6 * samples)):] = 0.0
  return mixture.astype(np.float32), mask.astype(np.float32)


@functools.lru_cache(maxsize=None)
def model_and_params(name: str):
  return model_util.randomised_model(CONFIGS[name], seed=1, scale=SCALE)


@functools.lru_cache(maxsize=None)
def sessions(name: str):
  """{0: the all-exits graph, k: exit k's graph} as onnxruntime sessions, and their protos."""
  model, params = model_and_params(name)
  protos = {0: onnx_graphs.export_all_exits(model, params)}
  for k in range(1, model.config.exits + 1):
    protos[k] = onnx_graphs.export_exit(model, params, k)
  import onnxruntime  # noqa: PLC0415 (the optional extra)

  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  return {k: onnxruntime.InferenceSession(p.SerializeToString(), options,
                                          providers=["CPUExecutionProvider"])
          for k, p in protos.items()}, protos


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, mixture, mask):
  outputs = model.apply({"params": params}, mixture, mask)
  return outputs.mean, outputs.log_var, outputs.log_alpha


# --- parity -----------------------------------------------------------------------------------
@needs_onnx
@pytest.mark.parametrize("name", ["tiny", "demo", "cumulative"])
def test_onnx_graphs_equal_jax(name):
  """Every graph, three lengths (one for the third config), noise and two-voice mixtures (one of
  them padded): within 1e-4 of the JAX model."""
  model, params = model_and_params(name)
  graphs, _ = sessions(name)
  worst = {}
  lengths = LENGTHS[model.config.block_length]
  for samples in (lengths if name != "cumulative" else lengths[1:2]):
    mixture, mask = parity_inputs(samples, seed=samples)
    expected = [np.asarray(x) for x in _apply(model, params, mixture, mask)]
    for k, session in graphs.items():
      got = onnx_graphs.call(session, mixture, mask)
      want = expected if k == 0 else [x[k - 1] for x in expected]
      for field, a, b in zip(onnx_graphs.OUTPUT_NAMES, got, want):
        assert a.shape == b.shape and a.dtype == np.float32, (name, k, samples, field)
        difference = float(np.max(np.abs(a - b)))
        worst[(k, field)] = max(worst.get((k, field), 0.0), difference)
        assert difference <= TOLERANCE, (name, f"exit {k or 'all'}", samples, field, difference)
  mean = np.asarray(expected[0])
  assert np.max(np.abs(mean[0] - mean[-1])) > 0.1  # The exits differ.
  print(f"{name}: max |onnxruntime - JAX| per (graph, output), 0 = all exits:",
        {f"{k}/{f}": f"{v:.1e}" for (k, f), v in sorted(worst.items())})


@needs_onnx
def test_onnx_graphs_take_any_batch_and_length():
  """One graph for every shape: batch 1 and 4, lengths 1 to 4001, against the model."""
  model, params = model_and_params("tiny")
  graphs, _ = sessions("tiny")
  for batch, samples in [(1, 1), (4, 401), (2, 4001)]:
    mixture = np.random.default_rng(samples).standard_normal((batch, samples)).astype(np.float32)
    mask = np.ones_like(mixture)
    expected = _apply(model, params, mixture, mask)
    for got, want in zip(onnx_graphs.call(graphs[0], mixture), expected):
      np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=TOLERANCE)
    got = onnx_graphs.call(graphs[2], mixture, mask)
    np.testing.assert_allclose(got[0], np.asarray(expected[0][1]), rtol=0, atol=TOLERANCE)


# --- the graphs -------------------------------------------------------------------------------
@needs_onnx
def test_onnx_graph_structure():
  import onnx  # noqa: PLC0415 (the optional extra)

  model, _ = model_and_params("demo")
  _, protos = sessions("demo")
  config = model.config
  blocks = f"floordiv(samples + {config.block_length - 1}, {config.block_length})"
  for k, proto in protos.items():
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    described = onnx_graphs.describe(proto)
    assert [(i["name"], i["dtype"], i["shape"]) for i in described["inputs"]] == [
        ("mixture", "float32", ["batch", "samples"]), ("mask", "float32", ["batch", "samples"])]
    lead = [str(config.exits)] if k == 0 else []
    assert [(o["name"], o["shape"]) for o in described["outputs"]] == [
        ("mean", lead + ["batch", "2", "samples"]), ("log_var", lead + ["batch", "2", blocks]),
        ("log_alpha", lead + ["batch", "2", blocks])]
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["graph"] == ("every exit" if k == 0 else f"exit {k}")
    assert metadata["block_length"] == str(config.block_length)
    # The recurrence is the two-pass kernel: its sweeps over one chunk's frames are ONNX Scans
    # (jax2onnx's Loops, rewritten: press_jax/export/onnx_rewrites.py), nothing unrolled over
    # time; the rewrites' counts are in the metadata.
    assert metadata["recurrence"] == "two_pass"
    assert "Scan" in {n.op_type for n in proto.graph.node}
    counts = dict(entry.rsplit(" ", 1) for entry in metadata["rewrites"].split(", "))
    assert set(counts) == set(onnx_rewrites.ONNX_REWRITES)
    assert all(int(value) > 0 for value in counts.values()), counts

  def parameter_bytes(proto):
    return sum(len(t.raw_data) for t in proto.graph.initializer)

  # Per-exit graphs embed only what their exit needs: fewer parameters for earlier exits.
  sizes = [parameter_bytes(protos[k]) for k in range(1, config.exits + 1)]
  assert sizes == sorted(sizes) and sizes[0] < sizes[-1] <= parameter_bytes(protos[0]), sizes


def test_opset_range():
  assert onnx_graphs.check_opset(17) == 17 and onnx_graphs.check_opset(23) == 23
  for bad in (16, 24, 17.5, True):
    with pytest.raises(ValueError, match=r"opset must be an integer in 17\.\.23"):
      onnx_graphs.check_opset(bad)


# --- press-export --format onnx ---------------------------------------------------------------
@needs_onnx
def test_cli_onnx_export(tmp_path, capsys, saved_model):  # noqa: F811 (fixture)
  out = tmp_path / "exported"
  status, stdout, err = run_cli(capsys, saved_model, "--format", "onnx", "--out", out,
                                "--exits", "2")
  assert status == 0, err
  assert sorted(os.listdir(out)) == ["press_all_exits.onnx", "press_config.json",
                                     "press_exit2.onnx", "press_exit_rule.py",
                                     "press_params.safetensors"]
  assert not [p for p in os.listdir(tmp_path) if p != "exported"]  # no temporary left
  manifest = json.loads((out / "press_config.json").read_text())
  section = manifest["onnx"]
  assert "stablehlo" not in manifest and section["opset"] == 17
  assert section["per_exit_graphs"] == [2] and section["recurrence"] == "two_pass"
  assert [i["name"] for i in section["inputs"]] == ["mixture", "mask"]
  assert section["converter"]["jax2onnx"] and section["converter"]["onnxruntime"]
  differences = section["verification"]["max_abs_difference"]
  assert set(differences) == {"press_all_exits.onnx", "press_exit2.onnx"}
  assert max(max(d.values()) for d in differences.values()) < 1e-5
  entries = {e["name"]: e for e in manifest["files"]}
  assert entries["press_exit2.onnx"]["outputs"][0]["shape"] == ["batch", "2", "samples"]
  model, params = press_net.load(saved_model)
  mixture, mask = parity_inputs(950)
  expected = _apply(model, params, mixture, mask)
  session = onnx_graphs.load(str(out / "press_exit2.onnx"))
  for got, want in zip(onnx_graphs.call(session, mixture, mask), expected):
    np.testing.assert_allclose(got, np.asarray(want[1]), rtol=0, atol=TOLERANCE)


def test_cli_onnx_usage_errors(tmp_path, capsys, saved_model, monkeypatch):  # noqa: F811
  out = tmp_path / "out"
  assert_usage_error(run_cli(capsys, saved_model, "--format", "onnx", "--out", out,
                             "--platforms", "cpu"), "--platforms", "--format stablehlo only")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "onnx", "--out", out,
                             "--opset", "12"), "--opset 12", "17..23")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "onnx", "--out", out,
                             "--opset", "new"), "--opset new", "17..23")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out,
                             "--opset", "17"), "--opset", "--format onnx only")
  assert not out.exists()
  monkeypatch.setattr(onnx_graphs, "missing_extra", lambda: "ONNX export needs the optional "
                      "'onnx' extra (jax2onnx not installed): pip install -e '.[onnx]'")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "onnx", "--out", out),
                     "--format onnx", "optional 'onnx' extra", "pip install")
  with pytest.raises(export_dir.ExportError, match="optional 'onnx' extra") as raised:
    export_dir.write_export(None, str(out), fmt="onnx")
  assert raised.value.status == 2 and not out.exists()


@needs_onnx
def test_cli_onnx_errors_need_no_conversion(tmp_path, capsys, saved_model):  # noqa: F811
  """Out-of-range exits, an existing output and a corrupt checkpoint, as for StableHLO."""
  out = tmp_path / "out"
  assert_usage_error(run_cli(capsys, saved_model, "--format", "onnx", "--out", out,
                             "--exits", "3"), "--exits 3", "2 exits", "1..2")
  out.mkdir()
  (out / "keep.txt").write_text("x")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "onnx", "--out", out),
                     str(out), "not empty", "--overwrite")
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  for name in os.listdir(saved_model):
    (corrupt / name).write_bytes(open(os.path.join(saved_model, name), "rb").read())
  (corrupt / press_net.PARAMS_FILE).write_bytes(b"\x00garbage\xff" * 10)
  assert_usage_error(run_cli(capsys, corrupt, "--format", "onnx", "--out", tmp_path / "new"),
                     str(corrupt), "cannot load the model")
  assert sorted(os.listdir(tmp_path)) == ["corrupt", "out"] and os.listdir(out) == ["keep.txt"]


@needs_onnx
def test_cli_onnx_failure_leaves_nothing(tmp_path, capsys, saved_model, monkeypatch):  # noqa
  def broken(*args, **kwargs):
    raise NotImplementedError("jax2onnx: no plugin for primitive 'x'")

  monkeypatch.setattr(onnx_graphs, "export_all_exits", broken)
  status, _, err = run_cli(capsys, saved_model, "--format", "onnx", "--out", tmp_path / "out")
  last = err.strip().splitlines()[-1]  # After the progress lines, one error line.
  assert status == 1 and last.startswith("press-export: error: exporting"), err
  assert "NotImplementedError" in last and "nothing was written" in last
  assert os.listdir(tmp_path) == []
