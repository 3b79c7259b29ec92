"""The PyTorch port (press_jax.torch_port) against the JAX model, through the real export path.

Each configuration (the tiny preset, preset S, the demo's model and a variant with the other
switches) gets random parameters from `press_net.init_params`, perturbed (`perturbed`) so that
every block and head matters, saved with `press_net.save` and exported with
`press-export DIR --format safetensors`; the port loads that directory. Parity: max |torch - jax| / max(1, max |jax|) per output, float32, at most
PARITY (1e-5); measured values are in docs/export.md ("PyTorch port").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments.configs.demo import DEMO_MODEL
from press_jax import likelihoods
from press_jax import torch_port
from press_jax.cli import export as cli
from press_jax.export import params as params_lib
from press_jax.models import press_net
from press_jax.torch_port import likelihoods as torch_likelihoods
from press_jax.torch_port import recurrence as torch_recurrence
from press_jax.types import ExitOutputs
from tests import model_util

# On 2 busy cores torch's intra-op threads wait on each other (2 threads ran preset S 7x slower
# than 1 here); the tests run torch on one.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = 1e-5  # max abs difference relative to max(1, max |jax|), per output
LOSS_PARITY = 1e-5  # relative
CONFIGS = {
    "tiny": ("tiny", {}),
    "S": ("S", {}),
    "demo": ("tiny", dict(DEMO_MODEL)),
    # The other switches: no encoder blocks, no attention, stages of unequal depth, cumulative
    # exits, no input normalisation, three speakers.
    "variant": ("tiny", dict(width=16, encoder_channels=16, rnn_expansion=1.0, ffn_expansion=1.0,
                             encoder_blocks=0, attention_every=0, decoder_blocks=3,
                             stage_blocks=(1, 2), cumulative_exits=True,
                             normalize_input=False, speakers=3)),
}
# Two lengths per configuration: a multiple of the block length (2000) and of every stride, and
# one that is a multiple of neither (stride 4 and 40); the second item of each batch is padded.
LENGTHS = {"tiny": (4000, 4817), "S": (4000, 5003), "demo": (4000, 4817), "variant": (4817,)}


def perturbed(flat: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
  """Every tensor plus noise: 0.5 x its own std, or 0.1 for constant ones (LayerScale 1e-5,
  norm scales, biases), so each block changes the outputs by O(0.1-1) while float32 rounding
  of the network stays near 1e-6 (measured against float64 torch; 3x larger noise puts the
  float32 computation itself, JAX's included, 1e-5 to 1e-4 off)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name in sorted(flat):
    value = flat[name]
    std = float(np.std(value)) or 0.1 / 0.5
    out[name] = (value + 0.5 * std * rng.standard_normal(value.shape)).astype(np.float32)
  return out


def inputs(samples: int, batch: int = 2, seed: int = 0):
  """A mixture and a mask whose later items end earlier (padding at the end)."""
  return model_util.padded_mixture(batch, samples, seed, shortening=1234)


def relative_difference(got, expected) -> tuple[float, float]:
  """(max |got - expected| / max(1, max |expected|), max |got - expected|)."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape, (got.shape, expected.shape)
  difference = float(np.max(np.abs(got - expected)))
  return difference / max(1.0, float(np.max(np.abs(expected)))), difference


def export(tmp_path_factory, name):
  """(JAX model, params, export directory) of configuration `name` (perturbed parameters)."""
  preset, overrides = CONFIGS[name]
  model = press_net.create(preset, **overrides)
  flat = perturbed(params_lib.flatten_params(
      model.config, press_net.init_params(model, jax.random.key(0))))
  params = params_lib.unflatten_params(model, flat)
  saved = str(tmp_path_factory.mktemp(f"saved_{name}"))
  press_net.save(saved, model, params)
  out = os.path.join(str(tmp_path_factory.mktemp(f"export_{name}")), "export")
  assert cli.main([saved, "--format", "safetensors", "--out", out]) == 0
  return model, params, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{name: (JAX model, params, export directory)}, built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = export(tmp_path_factory, name)
    return cache[name]

  return get


@pytest.fixture(scope="module")
def tiny_outputs(exported):
  """The tiny configuration's JAX and torch outputs, sources and mask at 4817 samples."""
  model, params, directory = exported("tiny")
  mixture, mask = inputs(4817)
  reference = jax.jit(model.apply)({"params": params}, mixture, mask)
  with torch.no_grad():
    ported = torch_port.load(directory)(torch.from_numpy(mixture), torch.from_numpy(mask))
  sources = np.random.default_rng(3).standard_normal((2, 2, 4817)).astype(np.float32) * mask[:,
                                                                                           None]
  return reference, ported, sources, mask


# --- forward parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_jax(exported, name):
  model, params, directory = exported(name)
  ported = torch_port.load(directory)
  assert not ported.training and ported.config == model.config
  apply = jax.jit(model.apply)
  recurrences = ("chunked", "sequential") if name == "tiny" else ("chunked",)
  for samples in LENGTHS[name]:
    mixture, mask = inputs(samples)
    reference = apply({"params": params}, mixture, mask)
    for recurrence in recurrences:
      ported.set_recurrence(recurrence)
      with torch.no_grad():
        got = ported(torch.from_numpy(mixture), torch.from_numpy(mask))
      for field in ("mean", "log_var", "log_alpha"):
        relative, absolute = relative_difference(getattr(got, field), getattr(reference, field))
        print(f"{name} {samples} {recurrence} {field}: relative {relative:.2e}, "
              f"abs {absolute:.2e}")
        assert relative <= PARITY, (name, samples, recurrence, field, relative)
  if name != "demo":
    return  # (tiny's and S's stride is 4: one compile less each)
  # Without a mask (all samples valid), 37 samples: fewer than one stride of the demo's.
  mixture, _ = inputs(37, batch=1)
  reference = apply({"params": params}, mixture)
  with torch.no_grad():
    got = ported(torch.from_numpy(mixture))
  for field in ("mean", "log_var", "log_alpha"):
    assert relative_difference(getattr(got, field), getattr(reference, field))[0] <= PARITY


@pytest.mark.parametrize("name", ["demo", "variant"])
def test_max_exit_computes_the_first_exits_only(exported, name):
  """forward(max_exit=k) equals the first k exits of JAX's full pass (cumulative exits too)."""
  model, params, directory = exported(name)
  ported = torch_port.load(directory)
  mixture, mask = inputs(LENGTHS[name][0])
  reference = jax.jit(model.apply)({"params": params}, mixture, mask)
  for max_exit in range(1, model.config.exits + 1):
    with torch.no_grad():
      got = ported(torch.from_numpy(mixture), torch.from_numpy(mask), max_exit=max_exit)
    for field in ("mean", "log_var", "log_alpha"):
      assert getattr(got, field).shape[0] == max_exit
      relative, _ = relative_difference(getattr(got, field),
                                        np.asarray(getattr(reference, field))[:max_exit])
      assert relative <= PARITY, (name, max_exit, field, relative)
  with pytest.raises(ValueError, match=rf"max_exit must be in 1\.\.{model.config.exits}"):
    ported(torch.from_numpy(mixture), max_exit=model.config.exits + 1)


def test_parameter_names_are_the_exports_for_preset_m():
  """The port's named_parameters are exactly the export's flat names and shapes (`load` checks
  this for the other configurations; M's outputs are not compared here: a ~1 min run)."""
  model = press_net.create("M")
  template = jax.tree_util.tree_map(lambda spec: np.zeros(spec.shape, spec.dtype),
                                    params_lib.parameter_template(model))
  flat = params_lib.flatten_params(model.config, template)
  ported = torch_port.PressNet(model.config)
  assert {n: tuple(p.shape) for n, p in ported.named_parameters()} == {
      n: v.shape for n, v in flat.items()}


def test_recurrence_kernels_match_jax():
  """Both torch kernels against press_jax.models.recurrence, with resets (zero decays)."""
  from press_jax.models import recurrence as jax_recurrence

  rng = np.random.default_rng(0)
  decay = rng.uniform(0.0, 1.0, (3, 203, 5)).astype(np.float32)
  decay[:, 150:] = 0.0  # padding frames reset the state
  drive = rng.standard_normal((3, 203, 5)).astype(np.float32)
  expected = jax_recurrence.bidirectional_recurrence(decay, drive, implementation="sequential")
  for implementation, chunk in (("sequential", None), ("chunked", None), ("chunked", 7)):
    got = torch_recurrence.bidirectional_recurrence(
        torch.from_numpy(decay), torch.from_numpy(drive), implementation, chunk)
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g.numpy(), np.asarray(e), rtol=1e-5, atol=1e-6)


# --- loss -------------------------------------------------------------------------------------
def _jax_loss(outputs, sources, mask, **loss_options):
  config = likelihoods.LossConfig(kind="student_t", **loss_options)

  def loss(mean, log_var, log_alpha):
    value, aux = likelihoods.press_loss(ExitOutputs(mean, log_var, log_alpha), sources, mask,
                                        config)
    return value, aux["permutation"]

  (value, permutation), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                           has_aux=True))(*outputs)
  return float(value), [np.asarray(g) for g in grads], np.asarray(permutation)


def _torch_loss(outputs, sources, mask, **loss_options):
  tensors = [torch.tensor(np.asarray(x), requires_grad=True) for x in outputs]
  value, aux = torch_likelihoods.press_loss(
      tensors, torch.from_numpy(sources), None if mask is None else torch.from_numpy(mask),
      **loss_options)
  value.backward()
  return float(value.detach()), [t.grad.numpy() for t in tensors], aux


def synthetic_outputs(seed=0, exits=3, batch=2, speakers=2, samples=2517, block_length=400):
  """Outputs that reach every branch of the Student-t form: estimates near and far from the
  targets, log_alpha from -3 (gammaln) to 9 (Stirling), log_var from -8 to 3."""
  rng = np.random.default_rng(seed)
  blocks = -(-samples // block_length)
  sources = rng.standard_normal((batch, speakers, samples)).astype(np.float32)
  noise = rng.standard_normal((exits, batch, speakers, samples)) * np.logspace(
      -3, 0.5, exits)[:, None, None, None]
  mean = (sources[None, :, ::-1] + noise).astype(np.float32)  # swapped speakers
  log_var = rng.uniform(-8, 3, (exits, batch, speakers, blocks)).astype(np.float32)
  log_alpha = rng.uniform(-3, 9, (exits, batch, speakers, blocks)).astype(np.float32)
  mask = np.ones((batch, samples), np.float32)
  mask[1, samples - 611:] = 0.0
  return (mean, log_var, log_alpha), sources, mask


@pytest.mark.parametrize("options", [
    dict(block_length=400),
    dict(block_length=400, permutation="per_exit", exit_weights=(0.5, 1.0, 2.0)),
])
def test_loss_and_gradients_match_jax(options):
  outputs, sources, mask = synthetic_outputs()
  expected, expected_grads, expected_permutation = _jax_loss(outputs, sources, mask, **options)
  got, grads, aux = _torch_loss(outputs, sources, mask, **options)
  print(f"loss {options}: jax {expected:.8g}, torch {got:.8g}, "
        f"relative {abs(got - expected) / abs(expected):.2e}")
  assert abs(got - expected) <= LOSS_PARITY * abs(expected)
  for grad, reference in zip(grads, expected_grads):
    assert np.all(np.isfinite(grad))
    scale = float(np.max(np.abs(reference)))
    assert float(np.max(np.abs(grad - reference))) <= 1e-4 * scale
  np.testing.assert_array_equal(aux["permutation"].numpy(), expected_permutation)


def test_loss_on_model_outputs_matches_jax(tiny_outputs):
  """The same JAX model outputs into both losses, then each side's own outputs into its loss."""
  reference, ported, sources, mask = tiny_outputs
  outputs = (reference.mean, reference.log_var, reference.log_alpha)
  expected, _, _ = _jax_loss(outputs, sources, mask, block_length=2000)
  got, grads, _ = _torch_loss(outputs, sources, mask, block_length=2000)
  assert abs(got - expected) <= LOSS_PARITY * abs(expected), (got, expected)
  assert all(np.all(np.isfinite(g)) for g in grads)
  own, _ = torch_likelihoods.press_loss(ported, torch.from_numpy(sources),
                                        torch.from_numpy(mask), block_length=2000)
  print(f"loss on tiny's outputs: jax {expected:.8g}, torch on the same {got:.8g}, torch on its "
        f"own outputs {float(own):.8g}")
  assert abs(float(own) - expected) <= LOSS_PARITY * abs(expected), (float(own), expected)


# --- training -----------------------------------------------------------------------------------
def test_gradients_reach_every_parameter_and_training_reduces_the_loss(exported):
  _, _, directory = exported("tiny")
  model = torch_port.load(directory).train()
  mixture, mask = inputs(2000)
  rng = np.random.default_rng(5)
  sources = torch.from_numpy(rng.standard_normal((2, 2, 2000)).astype(np.float32) * 0.5)
  mixture = sources.sum(1)
  mask = torch.from_numpy(mask[:, :2000])

  def loss_fn():
    outputs = model(mixture, mask)
    return torch_likelihoods.press_loss(outputs, sources, mask,
                                        block_length=model.config.block_length)[0]

  loss = loss_fn()
  loss.backward()
  for name, parameter in model.named_parameters():
    assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert float(parameter.grad.abs().max()) > 0, name
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  losses = []
  for _ in range(4):
    optimizer.zero_grad()
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    losses.append(float(loss.detach()))
  with torch.no_grad():
    final = float(loss_fn())
  print("torch training losses:", [round(x, 4) for x in losses], "final", round(final, 4))
  assert final < losses[0] and all(np.isfinite(losses))


# --- loader errors ------------------------------------------------------------------------------
def _copy(directory, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(directory, target)
  return target


def _rewrite(directory, change):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(directory, params_lib.PARAMS_FILE)
  flat = dict(load_file(path))
  change(flat)
  save_file(flat, path)


def _one_line_error(kind, directory, *fragments):
  with pytest.raises(kind) as caught:
    torch_port.load(directory)
  message = str(caught.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def test_loader_errors(exported, tmp_path):
  _, _, directory = exported("tiny")
  _one_line_error(FileNotFoundError, tmp_path / "missing", "missing", "no such export directory")
  (tmp_path / "empty").mkdir()
  _one_line_error(FileNotFoundError, tmp_path / "empty", "press_params.safetensors", "not found")

  name = "exit1.rnn0.mixer.in_projection.kernel"
  copy = _copy(directory, tmp_path / "missing_tensor")
  _rewrite(copy, lambda flat: flat.pop(name))
  _one_line_error(ValueError, copy, "press_params.safetensors", repr(name), "missing")

  copy = _copy(directory, tmp_path / "extra_tensor")
  _rewrite(copy, lambda flat: flat.update({"exit9.rnn0.skip": np.ones(3, np.float32)}))
  _one_line_error(ValueError, copy, "press_params.safetensors", "'exit9.rnn0.skip'",
                  "the config does not have")

  copy = _copy(directory, tmp_path / "misshapen")
  _rewrite(copy, lambda flat: flat.update({name: flat[name][:, :-1].copy()}))
  _one_line_error(ValueError, copy, "press_params.safetensors", repr(name), "the config needs")

  copy = _copy(directory, tmp_path / "float64")
  _rewrite(copy, lambda flat: flat.update({name: flat[name].astype(np.float64)}))
  _one_line_error(ValueError, copy, repr(name), "float64", "float32")

  copy = _copy(directory, tmp_path / "corrupt")
  (copy / params_lib.PARAMS_FILE).write_bytes(b"not a safetensors file")
  _one_line_error(ValueError, copy, "press_params.safetensors", "not a readable safetensors")

  config_path = params_lib.CONFIG_FILE
  copy = _copy(directory, tmp_path / "bad_json")
  (copy / config_path).write_text("{ not json")
  _one_line_error(ValueError, copy, "press_config.json", "not readable JSON")

  def edit_manifest(target, change):
    manifest = json.loads((target / config_path).read_text())
    change(manifest)
    (target / config_path).write_text(json.dumps(manifest))

  copy = _copy(directory, tmp_path / "unknown_field")
  edit_manifest(copy, lambda manifest: manifest["config"].update(frobnicate=1))
  _one_line_error(ValueError, copy, "press_config.json", "frobnicate")

  copy = _copy(directory, tmp_path / "bfloat16")
  edit_manifest(copy, lambda manifest: manifest["config"].update(dtype="bfloat16"))
  _one_line_error(ValueError, copy, "'bfloat16'", "float32 only")

  copy = _copy(directory, tmp_path / "naming")
  edit_manifest(copy, lambda manifest: manifest["parameters"].update(naming_version="2"))
  _one_line_error(ValueError, copy, "press_config.json", "naming version")

  copy = _copy(directory, tmp_path / "other_config")  # a config the tensors do not fit
  edit_manifest(copy, lambda manifest: manifest["config"].update(width=48))
  _one_line_error(ValueError, copy, "press_params.safetensors", "the config needs")

  copy = _copy(directory, tmp_path / "metadata_only")  # press_config.json is optional
  os.remove(copy / config_path)
  assert torch_port.load(copy).export_manifest is None


def test_press_jax_imports_without_torch():
  """`import press_jax` (and the model, the export) never imports torch."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "import press_jax, press_jax.models, press_jax.export, press_jax.likelihoods\n"
          "assert sys.modules['torch'] is None\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
