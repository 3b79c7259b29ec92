"""Export: forward through one exit, safetensors names, StableHLO parity, numpy exit rule, CLI."""

from __future__ import annotations

import configparser
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import calibration as calibration_lib
from press_jax import exit_rule, model_dir
from press_jax.cli import export as cli
from press_jax.export import directory as export_dir
from press_jax.export import exit_rule_numpy, params as params_lib, stablehlo
from press_jax.export.forward import export_model, forward_through_exit
from press_jax.models import press_net
from tests import model_util
from press_jax.types import ExitOutputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=16, attention_heads=2, rnn_expansion=1.0, ffn_expansion=1.0,
            attention_ffn_expansion=1.0, encoder_channels=16, block_length=400)
# tests/test_dynamic.py's shapes: one stage per scan group (attention after every RNN block),
# three stages per group (the demo's layout), mask heads and cumulative exits with a deeper
# last stage (stage_blocks (1, 1, 2)), and cumulative exits without encoder blocks.
CONFIGS = {
    "one_stage_per_group": dict(TINY, encoder_blocks=1, decoder_blocks=4, exits=4,
                                attention_every=1),
    "three_stages_per_group": dict(TINY, encoder_blocks=1, decoder_blocks=3, exits=3,
                                   attention_every=3, mixture_consistency=True,
                                   frame_norm=False),
    "mask_head_cumulative": dict(TINY, encoder_blocks=1, decoder_blocks=4, exits=3,
                                 stage_blocks=(1, 1, 2),
                                 attention_every=3, waveform_head="mask",
                                 cumulative_exits=True),
    "cumulative_one_stage": dict(TINY, encoder_blocks=0, decoder_blocks=2, exits=2,
                                 attention_every=1, cumulative_exits=True),
}


def model_and_params(name, seed=0):
  return model_util.randomised_model(CONFIGS[name], seed)


def inputs(batch=2, samples=2237, seed=0):
  """A mixture and a mask whose later items end earlier (padding at the end)."""
  return model_util.padded_mixture(batch, samples, seed)


def max_difference(a, b):
  """max |a - b| relative to max(1, max |b|): float32 rounding of the outputs is ~1e-7."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, mixture, mask):
  return model.apply({"params": params}, mixture, mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _through_exit(model, params, mixture, mask, exit_number):
  return forward_through_exit(model, params, mixture, mask, exit_number=exit_number)


# --- forward_through_exit ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_through_exit_equals_model(name):
  model, params = model_and_params(name)
  mixture, mask = inputs()
  expected = _apply(model, params, mixture, mask)
  for k in range(1, model.config.exits + 1):
    got = _through_exit(model, params, mixture, mask, k)
    assert isinstance(got, ExitOutputs) and got.mean.shape[0] == 1
    for field in ("mean", "log_var", "log_alpha"):
      want = getattr(expected, field)[k - 1:k]
      np.testing.assert_allclose(np.asarray(getattr(got, field)), np.asarray(want),
                                 rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())),
                                 err_msg=f"{name}, exit {k}, {field}")


def test_forward_through_exit_rejects_bad_exit_numbers():
  model, params = model_and_params("cumulative_one_stage")
  mixture, _ = inputs(batch=1, samples=400)
  for bad in (0, 3, 1.5):
    with pytest.raises(ValueError, match=r"exit_number must be an integer in 1\.\.2"):
      forward_through_exit(model, params, mixture, exit_number=bad)


# --- safetensors ------------------------------------------------------------------------------
def test_flat_names_unstack_exits_and_encoder_blocks():
  model, params = model_and_params("three_stages_per_group")
  config = model.config
  assert config.stages_per_group == 3 and config.groups == 1
  flat = params_lib.flatten_params(config, params)
  assert not [n for n in flat if n.startswith("stages") or "stage0_" in n]
  for name in ("encoder.conv.kernel", "encoder.projection.kernel", "encoder.projection.bias",
               "encoder_blocks.0.block.mixer.in_projection.kernel",
               "encoder_blocks.0.block.mixer.skip", "speaker_split.expand.kernel",
               "exit1.rnn0.mixer.in_projection.kernel", "exit2.waveform_head.glu.kernel",
               "exit3.rnn0.mixer.out_projection.bias", "exit3.attention0.attention.qkv.kernel",
               "exit3.variance_head.output.kernel"):
    assert name in flat, name
  # Dense kernels are (in, out); exit 3 is stage 2 of group 0.
  assert flat["encoder.projection.kernel"].shape == (config.encoder_channels, config.width)
  assert flat["exit3.variance_head.output.kernel"].shape == (config.variance_width, 2)
  np.testing.assert_array_equal(
      flat["exit3.attention0.attention.qkv.kernel"],
      np.asarray(params["stages"]["stage2_attention0"]["attention"]["qkv"]["kernel"][0]))
  total = sum(v.size for v in flat.values())
  assert total == sum(np.size(x) for x in jax.tree_util.tree_leaves(params))

  model, params = model_and_params("one_stage_per_group")
  flat = params_lib.flatten_params(model.config, params)
  assert model.config.groups == 4
  stacked = params["stages"]["stage0_attention0"]["feed_forward"]["expand"]["kernel"]
  for e in range(1, 5):  # exit e = scan group e - 1, stage 0
    np.testing.assert_array_equal(flat[f"exit{e}.attention0.feed_forward.expand.kernel"],
                                  np.asarray(stacked[e - 1]))


@pytest.mark.parametrize("name", ["three_stages_per_group", "one_stage_per_group"])
def test_safetensors_round_trip_is_bit_exact(tmp_path, name):
  model, params = model_and_params(name)
  params_lib.save_safetensors(str(tmp_path), model, params)
  loaded_model, loaded = params_lib.load_safetensors(str(tmp_path))  # config from the metadata
  assert loaded_model.config == model.config
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mixture, mask = inputs()
  got, want = _apply(model, loaded, mixture, mask), _apply(model, params, mixture, mask)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unflatten_names_what_does_not_fit():
  model, params = model_and_params("cumulative_one_stage")
  flat = params_lib.flatten_params(model.config, params)
  missing = dict(flat)
  del missing["exit2.waveform_head.glu.kernel"]
  with pytest.raises(ValueError, match=r"'exit2\.waveform_head\.glu\.kernel' is missing"):
    params_lib.unflatten_params(model, missing)
  extra = dict(flat, **{"exit9.rnn0.skip": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"does not have, e\.g\. 'exit9\.rnn0\.skip'"):
    params_lib.unflatten_params(model, extra)
  wrong = dict(flat, **{"encoder.conv.kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"'encoder\.conv\.kernel' is float32\[3, 3\]"):
    params_lib.unflatten_params(model, wrong)


# --- StableHLO --------------------------------------------------------------------------------
# Three lengths (ragged, whole blocks, shorter than a block) and two batch sizes; batch 3 pads
# its later items (the last item of length 123 keeps one valid sample).
SHAPES = [(1, 837), (3, 1200), (3, 123)]


def round_trip(exported):
  return jax.export.deserialize(exported.serialize())


def round_trip_checked(exported):
  """The deserialised artefact, asserting it holds the exported program byte for byte."""
  loaded = round_trip(exported)
  assert loaded.mlir_module_serialized == exported.mlir_module_serialized
  # Symbolic dimensions of two scopes never compare equal: compare them by name.
  assert str(loaded.in_avals) == str(exported.in_avals)
  assert str(loaded.out_avals) == str(exported.out_avals)
  return loaded


def assert_graph_equals_model(got, want, what, tolerance=1e-5):
  """Graph outputs against the jitted model's at that exit; returns the worst relative error."""
  worst = 0.0
  for a, b in zip(got, want):
    assert a.shape == b.shape, what
    worst = max(worst, max_difference(a, b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tolerance,
                               atol=tolerance * max(1.0, float(np.abs(b).max())), err_msg=what)
  return worst


def test_stablehlo_round_trip_equals_jax_every_graph():
  """Three lengths and two batch sizes, the all-exits graph and every per-exit graph, against
  the jitted model with the graphs' recurrence kernel (per-exit graphs: that exit of it)."""
  model, params = model_and_params("three_stages_per_group")
  graphs = {0: round_trip_checked(stablehlo.export_all_exits(model, params))}
  for k in range(1, model.config.exits + 1):
    graphs[k] = round_trip_checked(stablehlo.export_exit(model, params, k))
  traced = export_model(model)  # The same network with the graphs' recurrence kernel.
  worst = {}
  for batch, samples in SHAPES:
    mixture, mask = inputs(batch, samples, seed=samples + batch)
    full = _apply(traced, params, mixture, mask)
    full = (full.mean, full.log_var, full.log_alpha)
    for k, graph in graphs.items():
      want = full if k == 0 else tuple(x[k - 1] for x in full)
      worst[k] = max(worst.get(k, 0.0), assert_graph_equals_model(
          stablehlo.call(graph, mixture, mask), want, f"graph {k}, shape {(batch, samples)}"))
  # The graph embeds the parameters as constants and a per-exit graph stops at its exit: XLA
  # fuses them differently from the jitted model, so float32 rounding differs (docs/export.md).
  print("max |StableHLO - jitted JAX| / max(1, |JAX|) per graph (0 = all exits):", worst)
  assert max(worst.values()) <= 5e-6, worst


@pytest.mark.parametrize("name", ["one_stage_per_group", "mask_head_cumulative",
                                  "cumulative_one_stage"])
def test_stablehlo_round_trip_other_layouts(name):
  model, params = model_and_params(name)
  mixture, mask = inputs(2, 1001)
  full = _apply(export_model(model), params, mixture, mask)
  full = (full.mean, full.log_var, full.log_alpha)
  got = stablehlo.call(round_trip_checked(stablehlo.export_all_exits(model, params)),
                       mixture, mask)
  assert assert_graph_equals_model(got, full, f"{name}: all exits") <= 5e-6
  k = model.config.exits
  got = stablehlo.call(round_trip_checked(stablehlo.export_exit(model, params, k)),
                       mixture, mask)
  last = tuple(x[k - 1] for x in full)
  assert assert_graph_equals_model(got, last, f"{name}: exit {k}") <= 5e-6


def test_per_exit_graphs_hold_only_what_the_exit_needs():
  """One stage = an RNN block (4 dot_generals) + an attention block (6); heads are 5 more."""
  model, params = model_and_params("one_stage_per_group")
  counts = []
  for k in (1, 2, 3):
    exported = stablehlo.export_exit(model, params, k)
    assert [str(a.shape) for a in exported.in_avals] == ["(batch, samples)"] * 2
    assert len(exported.out_avals) == 3 and exported.out_avals[0].ndim == 3
    module = exported.mlir_module()
    counts.append(len(re.findall(r"= stablehlo\.dot_general", module)))
    # Only the groups used are embedded, sliced: no (groups=4, 16, 48) stacked kernel.
    assert "tensor<4x16x48xf32>" not in module and "tensor<16x48xf32>" in module
  # Frame context 1 (one-hot block counts) + encoder 2 + encoder block 4 + speaker split 2 +
  # stage 10 + heads 5 (pooling included).
  assert counts == [24, 34, 44], counts


# --- the numpy exit rule ----------------------------------------------------------------------
def random_outputs(exits=3, batch=2, speakers=2, samples=2237, block_length=400, seed=0):
  rng = np.random.default_rng(seed)
  blocks = -(-samples // block_length)
  mixture, mask = inputs(batch, samples, seed)
  mean = (rng.standard_normal((exits, batch, speakers, samples))
          * rng.uniform(0.05, 1.0, (exits, batch, speakers, 1))).astype(np.float32)
  log_var = rng.normal(-3.0, 1.5, (exits, batch, speakers, blocks)).astype(np.float32)
  log_alpha = rng.normal(0.5, 1.0, (exits, batch, speakers, blocks)).astype(np.float32)
  return ExitOutputs(mean=jnp.asarray(mean), log_var=jnp.asarray(log_var),
                     log_alpha=jnp.asarray(log_alpha)), mixture, mask


def assert_same_rule(outputs, mixture, mask, block_length, chosen_exits, **settings):
  want = exit_rule.select_exits(outputs, mixture, mask, block_length=block_length,
                                sample_rate=8000, **settings)
  got = exit_rule_numpy.select_exits(
      np.asarray(outputs.mean), np.asarray(outputs.log_var), np.asarray(outputs.log_alpha),
      mixture, mask, block_length=block_length, sample_rate=8000, **settings)
  np.testing.assert_array_equal(got.block_valid, np.asarray(want.block_valid))
  np.testing.assert_array_equal(got.exit_index, np.asarray(want.exit_index), err_msg=str(settings))
  # 'exact' goes through jax's float32 betainc, which is accurate to ~1e-4 at T/2 = 200
  # (scipy's float64 one agrees with jax's float64 one to 1e-12).
  tolerance = 2e-4 if settings.get("method") == "exact" else 1e-5
  np.testing.assert_allclose(got.probabilities, np.asarray(want.probabilities), atol=tolerance,
                             err_msg=str(settings))
  reference = np.asarray(want.waveform)
  np.testing.assert_allclose(got.waveform, reference,
                             atol=1e-5 * max(1.0, np.abs(reference).max()))
  chosen_exits.update(np.asarray(want.exit_index)[np.asarray(want.block_valid)].tolist())


@pytest.mark.parametrize("method", exit_rule.PROBABILITY_METHODS)
def test_numpy_rule_matches_jax_on_random_outputs(method):
  outputs, mixture, mask = random_outputs()
  chosen = set()
  for conditions in (exit_rule.CONDITIONS, ("snr_ref",), ("snr", "snri")):
    for target_db in (-5.0, 0.0, 3.0, 10.0, 25.0):
      for confidence in (0.3, 0.6, 0.9):
        assert_same_rule(outputs, mixture, mask, 400, chosen, target_db=target_db,
                         confidence=confidence, conditions=conditions, method=method,
                         crossfade_ms=10.0)
  assert_same_rule(outputs, mixture, mask, 400, chosen, target_db=5.0, confidence=0.5,
                   reference_power=0.02, crossfade_ms=0.0, method=method)
  assert chosen == {0, 1, 2}  # The sweep reached every exit.


def test_numpy_rule_matches_jax_on_model_outputs():
  model, params = model_and_params("three_stages_per_group")
  mixture, mask = inputs(2, 2237)
  outputs = _apply(model, params, mixture, mask)
  calibration = calibration_lib.PostCalibration(
      log_alpha_scale=jnp.asarray([0.3, -0.2, 0.1]), log_beta_scale=jnp.asarray([0.5, 0.0, -1.0]))
  log_var, log_alpha = exit_rule_numpy.apply_post_calibration(
      np.asarray(outputs.log_var), np.asarray(outputs.log_alpha), calibration.to_dict())
  calibrated = calibration_lib.apply_post_calibration(outputs, calibration)
  np.testing.assert_allclose(log_var, np.asarray(calibrated.log_var), atol=1e-5)
  np.testing.assert_allclose(log_alpha, np.asarray(calibrated.log_alpha), atol=1e-5)
  chosen = set()
  for target_db in (-10.0, 0.0, 5.0, 20.0):
    for confidence in (0.2, 0.5, 0.9):
      assert_same_rule(calibrated, mixture, mask, 400, chosen, target_db=target_db,
                       confidence=confidence)
  assert len(chosen) > 1


def test_exit_rule_file_runs_without_jax(tmp_path):
  shutil.copyfile(exit_rule_numpy.__file__, tmp_path / "press_exit_rule.py")
  script = (
      "import sys\n"
      "for name in ('jax', 'jaxlib', 'flax', 'press_jax'): sys.modules[name] = None\n"
      f"sys.path.insert(0, {str(tmp_path)!r})\n"
      "import numpy as np, press_exit_rule as rule\n"
      "rng = np.random.default_rng(0)\n"
      "mean = rng.standard_normal((2, 1, 2, 900)); mix = mean[0].sum(1)\n"
      "lv = rng.normal(-3, 1, (2, 1, 2, 3)); la = rng.normal(0, 1, (2, 1, 2, 3))\n"
      "s = rule.select_exits(mean, lv, la, mix, block_length=400, sample_rate=8000,\n"
      "                      target_db=0.0, confidence=0.5)\n"
      "print(s.waveform.shape, s.exit_index.shape)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "(1, 2, 900) (1, 3)"


# --- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  return model_util.save_small_model(str(tmp_path_factory.mktemp("model")))


def run_cli(capsys, *argv):
  status = cli.main([*map(str, argv)])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def assert_usage_error(result, *fragments):
  status, _, err = result
  assert status == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("press-export: error: "), err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_cli_safetensors_export(tmp_path, capsys, saved_model):
  calibration_lib.save_post_calibration(
      os.path.join(saved_model, model_dir.POST_CALIBRATION_FILE),
      calibration_lib.PostCalibration(log_alpha_scale=jnp.asarray([0.25]),
                                      log_beta_scale=jnp.asarray([-0.5])))
  try:
    out = tmp_path / "exported"
    status, stdout, err = run_cli(capsys, saved_model, "--format", "safetensors", "--out", out)
  finally:
    os.remove(os.path.join(saved_model, model_dir.POST_CALIBRATION_FILE))
  assert status == 0, err
  assert sorted(os.listdir(out)) == ["press_config.json", "press_exit_rule.py",
                                     "press_params.safetensors"]
  assert not [p for p in os.listdir(tmp_path) if p != "exported"]  # no temporary left
  manifest = json.loads((out / "press_config.json").read_text())
  model, params = press_net.load(saved_model)
  assert manifest["config"] == model.config.to_dict()
  assert (manifest["sample_rate"], manifest["exits"], manifest["block_length"]) == (8000, 2, 400)
  assert manifest["post_calibration"] == {"log_alpha_scale": [0.25], "log_beta_scale": [-0.5]}
  assert manifest["jax_version"] == jax.__version__ and manifest["press_jax_version"]
  assert "stablehlo" not in manifest
  for entry in manifest["files"]:
    if entry["name"] != "press_config.json":
      data = (out / entry["name"]).read_bytes()
      assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["description"]
  loaded_model, loaded = params_lib.load_safetensors(str(out))
  assert loaded_model.config == model.config
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (out / "press_exit_rule.py").read_bytes() == open(exit_rule_numpy.__file__, "rb").read()
  settings = exit_rule_numpy.load_settings(str(out / "press_config.json"))
  assert settings["block_length"] == 400 and settings["calibration"]["log_beta_scale"] == [-0.5]


def test_cli_stablehlo_export_and_overwrite(tmp_path, capsys, saved_model):
  out = tmp_path / "exported"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out),
                     str(out), "not empty", "--overwrite")
  status, stdout, err = run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out,
                                "--exits", "2", "--overwrite")
  assert status == 0, err
  assert sorted(os.listdir(out)) == ["press_all_exits.stablehlo", "press_config.json",
                                     "press_exit2.stablehlo", "press_exit_rule.py",
                                     "press_params.safetensors"]
  manifest = json.loads((out / "press_config.json").read_text())
  section = manifest["stablehlo"]
  assert section["per_exit_graphs"] == [2]
  assert [i["name"] for i in section["inputs"]] == ["mixture", "mask"]
  differences = section["verification"]["max_abs_difference"]
  assert set(differences) == {"press_all_exits.stablehlo", "press_exit2.stablehlo"}
  assert max(max(d.values()) for d in differences.values()) < 1e-5
  model, params = press_net.load(saved_model)
  mixture, mask = inputs(2, 950)
  got = stablehlo.call(stablehlo.load(str(out / "press_exit2.stablehlo")), mixture, mask)
  want = _apply(model, params, mixture, mask)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want.mean[1]), atol=1e-5)


def test_cli_usage_errors(tmp_path, capsys, saved_model):
  out = tmp_path / "out"
  assert_usage_error(run_cli(capsys, tmp_path / "missing", "--format", "safetensors", "--out",
                             out), "missing", "no such model directory")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "tflite", "--out", out),
                     "--format tflite", "expected one of safetensors, stablehlo, onnx")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out,
                             "--exits", "1,3"), "--exits 1,3", "2 exits", "1..2")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out,
                             "--exits", "0"), "--exits 0", "1..2")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out,
                             "--exits", "first"), "--exits first", "comma-separated")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out,
                             "--platforms", "cpu,gameboy"), "--platforms", "gameboy")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "safetensors", "--out", out,
                             "--exits", "1"), "--format stablehlo or onnx only")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "safetensors", "--out", out,
                             "--platforms", "cpu"), "--format stablehlo only")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert_usage_error(run_cli(capsys, saved_model, "--format", "safetensors", "--out", a_file),
                     str(a_file), "not a directory")
  corrupt = tmp_path / "corrupt"
  shutil.copytree(saved_model, corrupt)
  (corrupt / press_net.PARAMS_FILE).write_bytes(b"\x00garbage\xff" * 10)
  assert_usage_error(run_cli(capsys, corrupt, "--format", "safetensors", "--out", out),
                     str(corrupt), "cannot load the model")
  assert not out.exists()


def test_cli_failure_leaves_nothing(tmp_path, capsys, saved_model, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("lowering exploded")

  monkeypatch.setattr(stablehlo, "export_exit", broken)
  out = tmp_path / "out"
  status, _, err = run_cli(capsys, saved_model, "--format", "stablehlo", "--out", out)
  assert status == 1 and "lowering exploded" in err and "nothing was written" in err
  assert os.listdir(tmp_path) == []


def test_console_script_and_module(tmp_path):
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, "setup.cfg"))
  scripts = setup["options.entry_points"]["console_scripts"]
  assert "press-export = press_jax.cli.export:main" in scripts
  assert "safetensors" in setup["options"]["install_requires"]
  result = subprocess.run([sys.executable, "-m", "press_jax.cli.export", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0 and "press-export" in result.stdout, result.stderr
