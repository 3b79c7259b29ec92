"""bfloat16 compute (`PressConfig.dtype`): what runs in which dtype, and how far it is from float32.

docs/model.md, "Precision": the matmuls run in bfloat16 with float32 parameters; the residual
stream, norms, recurrence, softmax, variance heads, likelihood, exit probabilities and the
model's outputs stay float32. Every comparison below runs the float32 and the bfloat16 model
on the same parameters and inputs in the same test (no stored numbers).

Parameters are "trained-looking" (`trained_looking_params`): at initialisation LayerScale is
1e-5, so every residual branch is switched off and bfloat16 would only be exercised in the
encoder and the heads. XLA:CPU emulates bfloat16 (slowly): inputs are short (0.5 s).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from press_jax import config as config_lib
from press_jax import exit_rule, likelihoods, optim
from press_jax import train_step as step_lib
from press_jax.models import layers, press_net, recurrence
from tests.model_util import padded_mixture

SAMPLES = 4000  # 0.5 s at 8 kHz.

# bfloat16 keeps 8 significant bits: one rounding is off by at most u = 2^-8 = 0.39 % (RMS
# about u / sqrt(3) = 0.23 %). Along the model's path of ~10-40 matmuls and elementwise maps
# these compound; measured relative RMS errors of the means: tiny 1.1-1.2 %, S 1.3-2.0 %
# (exits 1 -> 4), i.e. 34-39 dB below the signal. The bar, 5 % (26 dB), leaves 2.5x margin.
MEAN_RELATIVE_TOLERANCE = 0.05
# log_var and log_alpha are logs: an absolute error is a relative error of the variance or alpha.
# Measured max |difference|: tiny 0.0015, S 0.0029 (0.3 %); the bar is 0.03 (3 %).
LOG_TOLERANCE = 0.03
# A float32 run of the same model is exact to ~1e-6; bfloat16 must be visibly coarser than that,
# or the dtype did not reach the matmuls.
MIN_BFLOAT16_DIFFERENCE = 1e-4


# --- parameters and inputs --------------------------------------------------------------------
def trained_looking_params(model: press_net.PressNet, samples: int, seed: int = 0):
  """Parameters of `model`'s shapes, drawn as a trained network's might look (no init compile).

  Kernels (..., fan_in, fan_out): N(0, 1 / fan_in) (unit gain); biases N(0, 0.1^2); RMSNorm
  scales and the recurrence's skip 1 + N(0, 0.1^2); LayerScale 0.2 (1 + N(0, 0.25^2)), not
  1e-5, so every residual branch contributes. All float32.
  """
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, samples), jnp.float32))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [getattr(key, "key", str(key)) for key in path]
    shape = leaf.shape
    if names[-1] == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(shape[-2])
    elif names[-1] == "bias":
      value = 0.1 * rng.standard_normal(shape)
    elif names[-1] == "scale" and names[-2].endswith("_scale"):  # LayerScale
      value = 0.2 * (1.0 + 0.25 * rng.standard_normal(shape))
    elif names[-1] in ("scale", "skip"):  # RMSNorm, the mixer's skip
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      raise ValueError(f"trained_looking_params: no rule for parameter {names}")
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def with_graded_variance_heads(config: config_lib.PressConfig, params):
  """`params` with each exit's variance head predicting errors ~5 dB below the previous exit's.

  The output layer's variance bias is shifted to -(3 + 1.2 e) (variance ~ e^-(3 + 1.2 e) of the
  normalised mixture: -13 dB at the first exit, -29 dB at the fourth), its alpha bias by +4
  (alpha ~ 4), and the kernel tripled so that blocks differ by several dB: what a trained model
  predicts, where random heads would predict ~0 dB everywhere and every choice is trivial.
  """
  stages = dict(params["stages"])
  for position in range(config.stages_per_group):
    name = f"stage{position}_variance_head"
    head = dict(stages[name])
    output = dict(head["output"])
    bias = np.array(output["bias"])  # (groups, 2)
    for group in range(config.groups):
      exit_index = group * config.stages_per_group + position
      bias[group] += [-(3.0 + 1.2 * exit_index), 4.0]
    output["bias"] = jnp.asarray(bias)
    output["kernel"] = 3.0 * output["kernel"]
    head["output"] = output
    stages[name] = head
  return {**params, "stages": stages}


@functools.lru_cache(maxsize=None)
def _apply(config: config_lib.PressConfig):
  model = press_net.PressNet(config)
  return jax.jit(lambda params, mixture, mask: model.apply({"params": params}, mixture, mask))


def _both(config: config_lib.PressConfig, params, mixture, mask):
  """(float32 outputs, bfloat16 outputs) of the same parameters and inputs."""
  return tuple(_apply(config.replace(dtype=dtype))(params, mixture, mask)
               for dtype in ("float32", "bfloat16"))


@functools.lru_cache(maxsize=None)
def _preset_outputs(preset: str):
  """(float32, bfloat16 outputs, mask) of the preset on a padded 0.5 s batch of 2."""
  config = config_lib.preset(preset)
  params = trained_looking_params(press_net.PressNet(config), SAMPLES)
  mixture, mask = padded_mixture(2, SAMPLES, seed=1, shortening=900)
  return (*_both(config, params, mixture, mask), mask)


def _relative_rms(actual, expected, weight):
  """Per exit: ||(actual - expected) w|| / ||expected w|| over (batch, speakers, samples)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  error = (((actual - expected) * weight) ** 2).sum(axis=(1, 2, 3))
  return np.sqrt(error / ((expected * weight) ** 2).sum(axis=(1, 2, 3)))


# --- where each dtype is used -----------------------------------------------------------------
# Modules whose output is their last Dense's (a residual branch, added in float32 by the caller).
_BRANCHES = (layers.LinearRNNMixer, layers.GatedFeedForward, layers.SpeakerAttention)


@pytest.mark.parametrize("frame_norm,waveform_head", [(True, "mapping"), (False, "mask")])
def test_dtype_of_every_module_output(frame_norm, waveform_head):
  """Traced (no compile) with every module's call intercepted: Dense outside the variance heads
  in bfloat16 with float32 kernels; norms take and give float32; every other module gives
  float32 except the residual branches (their last Dense); the model's outputs are float32."""
  config = config_lib.preset("tiny", dtype="bfloat16", frame_norm=frame_norm,
                             waveform_head=waveform_head)
  model = press_net.PressNet(config)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      module = context.module
      dtypes = lambda tree: {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)  # noqa
                             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}
      calls.append((module, "/".join(module.path), dtypes(args), dtypes(out)))
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((2, SAMPLES), jnp.float32)))
  outputs = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, SAMPLES), jnp.float32)),
                           variables)
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(variables)} == {"float32"}
  assert [str(x.dtype) for x in (outputs.mean, outputs.log_var, outputs.log_alpha)] == [
      "float32"] * 3

  dense = [call for call in calls if isinstance(call[0], nn.Dense)]
  assert len(dense) > 20
  for module, path, _, out in dense:
    expected = "float32" if "variance_head" in path else "bfloat16"
    assert module.param_dtype == jnp.float32, path
    assert out == {expected}, f"{path}: Dense output {out}, expected {expected}"
  for module, path, inputs, out in calls:
    if isinstance(module, nn.RMSNorm):
      assert inputs == out == {"float32"}, f"{path}: RMSNorm {inputs} -> {out}"
    elif isinstance(module, _BRANCHES):
      assert out == {"bfloat16"}, f"{path}: {type(module).__name__} gives {out}"
    elif not isinstance(module, nn.Dense):
      assert out <= {"float32"}, f"{path}: {type(module).__name__} gives {out}"


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (scan, while, pjit bodies) included."""
  for equation in jaxpr.eqns:
    yield equation
    for value in equation.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else [value]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _dtypes(variables) -> list[str]:
  return [str(v.aval.dtype) for v in variables]


def _traced(module, *inputs):
  """The jaxpr of module.apply on `inputs` (parameters from an abstract init)."""
  variables = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return jax.make_jaxpr(lambda v, *x: module.apply(v, *x))(variables, *inputs).jaxpr


def test_loops_carry_float32_in_a_bfloat16_model():
  """The sequential recurrence's frame loop and the scans over blocks and stage groups."""
  config = config_lib.preset("tiny", dtype="bfloat16", recurrence="sequential")
  jaxpr = _traced(press_net.PressNet(config), jnp.zeros((1, 2000), jnp.float32))
  loops = [e for e in _equations(jaxpr) if e.primitive.name in ("scan", "while")]
  carried = {dtype for e in loops for dtype in _dtypes(e.outvars)}
  assert len(loops) >= 3 and "float32" in carried and "bfloat16" not in carried, carried


@pytest.mark.parametrize("implementation", recurrence.RECURRENCE_IMPLEMENTATIONS)
def test_only_the_mixers_two_dense_layers_compute_in_bfloat16(implementation):
  """Gates, recurrence (any kernel), skip and output gate of a bfloat16 LinearRNNMixer are
  float32: what produces bfloat16 is the two Dense layers (matmul, bias add) and casts. (Each
  matmul is a `custom_vjp_call` wrapping its dot_general: press_jax.models.dense.)"""
  mixer = layers.LinearRNNMixer(16, jnp.bfloat16, implementation, 8)
  jaxpr = _traced(mixer, jnp.ones((2, 20, 8), jnp.float32), jnp.ones((2, 20), jnp.float32))
  narrow = [e.primitive.name for e in _equations(jaxpr) if "bfloat16" in _dtypes(e.outvars)]
  # (With 'two_pass' the output projection's result is also moved back from the chunk-position
  # layout, transpose / reshape / slice: data movement, no arithmetic.)
  assert set(narrow) <= {"dot_general", "add", "convert_element_type", "reshape",
                         "custom_vjp_call", "transpose", "slice"}, narrow
  assert narrow.count("dot_general") == 2 and narrow.count("add") == 2, narrow
  assert narrow.count("custom_vjp_call") == 2, narrow


def test_attention_logits_and_softmax_are_float32():
  """The four matmuls of a bfloat16 SpeakerAttention take bfloat16; the logits come out of
  theirs in float32 (accumulated, not rounded), and the softmax runs in float32."""
  attention = layers.SpeakerAttention(2, jnp.bfloat16)
  equations = list(_equations(_traced(attention, jnp.ones((1, 2, 5, 8), jnp.float32))))
  products = [e for e in equations if e.primitive.name == "dot_general"]
  assert len(products) == 4
  assert all(_dtypes(e.invars) == ["bfloat16"] * 2 for e in products)
  assert sorted(_dtypes(e.outvars)[0] for e in products) == ["bfloat16"] * 3 + ["float32"]
  softmax = [e for e in equations if e.primitive.name in ("exp", "reduce_max")]
  assert softmax and all(_dtypes(e.outvars) == ["float32"] for e in softmax)


@pytest.mark.parametrize("implementation", recurrence.RECURRENCE_IMPLEMENTATIONS)
def test_recurrence_of_bfloat16_inputs_accumulates_in_float32(implementation):
  """States equal the float32 recurrence of the same (bfloat16-valued) inputs, rounded once;
  a recurrence carried in bfloat16 (written out here) is measurably worse."""
  rng = np.random.default_rng(0)
  shape = (2, 300, 8)  # Decays near 1: hundreds of frames of memory.
  decay = jnp.asarray(rng.uniform(0.97, 0.999, shape), jnp.bfloat16)
  drive = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  run = jax.jit(functools.partial(recurrence.linear_recurrence, implementation=implementation,
                                  chunk=16))
  both = jax.jit(functools.partial(recurrence.bidirectional_recurrence,
                                   implementation=implementation))
  states = run(decay, drive)
  reference = run(decay.astype(jnp.float32), drive.astype(jnp.float32))
  assert states.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(states, np.float32),
                                np.asarray(reference.astype(jnp.bfloat16), np.float32))

  def bfloat16_step(state, inputs):
    state = inputs[0] * state + inputs[1]
    return state, state

  _, carried = jax.lax.scan(bfloat16_step, jnp.zeros((2, 8), jnp.bfloat16),
                            (jnp.swapaxes(decay, 0, 1), jnp.swapaxes(drive, 0, 1)))
  carried = np.asarray(jnp.swapaxes(carried, 0, 1), np.float32)
  scale = np.abs(np.asarray(reference)).max()
  ours = np.abs(np.asarray(states, np.float32) - np.asarray(reference)).max() / scale
  naive = np.abs(carried - np.asarray(reference)).max() / scale
  assert ours < 0.25 * naive, (ours, naive)

  forward, backward = both(decay, drive)
  expected = both(decay.astype(jnp.float32), drive.astype(jnp.float32))
  for got, want in zip((forward, backward), expected):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(want.astype(jnp.bfloat16), np.float32))
  gradients = jax.jit(jax.grad(lambda a, b: run(a, b).astype(jnp.float32).sum(), (0, 1)))(
      decay, drive)
  assert [g.dtype for g in gradients] == [jnp.bfloat16, jnp.bfloat16]


# --- bfloat16 against float32 ---------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "S"])
def test_forward_is_within_tolerance_of_float32(preset):
  reference, outputs, mask = _preset_outputs(preset)
  for name in ("mean", "log_var", "log_alpha"):
    assert getattr(outputs, name).dtype == jnp.float32, name
  relative = _relative_rms(outputs.mean, reference.mean, mask[None, :, None, :])
  log_errors = {name: float(np.abs(np.asarray(getattr(outputs, name))
                                   - np.asarray(getattr(reference, name))).max())
                for name in ("log_var", "log_alpha")}
  print(f"{preset}: mean relative RMS error per exit {np.round(relative, 4).tolist()}, "
        f"max |log difference| {log_errors}")
  assert np.all(relative < MEAN_RELATIVE_TOLERANCE), relative
  assert np.all(relative > MIN_BFLOAT16_DIFFERENCE), relative
  for name, error in log_errors.items():
    assert MIN_BFLOAT16_DIFFERENCE < error < LOG_TOLERANCE, (name, error)
  # Not a trivial comparison: the exits differ from each other by far more than the tolerance.
  mean = np.asarray(reference.mean)
  spread = _relative_rms(mean[:-1], np.broadcast_to(mean[-1:], mean[:-1].shape),
                         mask[None, :, None, :])
  assert np.all(spread > 10 * MEAN_RELATIVE_TOLERANCE), spread
  assert np.asarray(reference.log_var).std() > 10 * LOG_TOLERANCE


def test_exit_choices_agree_with_float32_on_most_blocks():
  """The exit rule on a fixed input, 23 targets x 40 blocks: the share of blocks whose chosen exit
  is the same in bfloat16 as in float32. Measured: 917 / 920 = 0.997 (the largest change of an
  exit probability 0.0075); asserted: >= 0.95."""
  config = config_lib.preset("tiny", decoder_blocks=4, exits=4, attention_every=2,
                             block_length=400)
  params = with_graded_variance_heads(
      config, trained_looking_params(press_net.PressNet(config), SAMPLES, seed=2))
  mixture, mask = padded_mixture(4, SAMPLES, seed=2, shortening=0)
  reference, outputs = _both(config, params, mixture, mask)

  @jax.jit
  def choose(outputs, target_db):
    selection = exit_rule.select_exits(
        outputs, mixture, mask, block_length=config.block_length, target_db=target_db,
        confidence=0.8, sample_rate=config.sample_rate)
    return selection.exit_index, selection.probabilities

  agree = total = mixed_targets = 0
  chosen = set()
  largest_probability_change = 0.0
  for target_db in np.arange(8.0, 31.0, 1.0):
    expected, expected_probabilities = map(np.asarray, choose(reference, target_db))
    got, probabilities = map(np.asarray, choose(outputs, target_db))
    assert probabilities.dtype == np.float32
    agree += int((got == expected).sum())
    total += expected.size
    chosen |= set(expected.ravel().tolist())
    mixed_targets += len(set(expected.ravel().tolist())) > 1
    largest_probability_change = max(largest_probability_change,
                                     float(np.abs(probabilities - expected_probabilities).max()))
  share = agree / total
  print(f"exit choices equal to float32's: {agree}/{total} = {share:.4f}; largest change of an "
        f"exit probability {largest_probability_change:.4f}")
  # The choices are not trivial: every exit is chosen somewhere, and for several targets the
  # blocks of one target disagree among themselves.
  assert chosen == set(range(config.exits)), chosen
  assert mixed_targets >= 5, mixed_targets
  assert share >= 0.95, share


def test_a_few_bfloat16_training_steps_are_finite_and_lower_the_loss():
  config = config_lib.preset("tiny", dtype="bfloat16")
  model = press_net.PressNet(config)
  optimizer = optim.make_optimizer(optim.OptimizerConfig(
      peak_learning_rate=3e-3, warmup_steps=0, total_steps=100))
  state = step_lib.create_train_state(model, optimizer, seed=0)
  rng = np.random.default_rng(3)
  time = np.arange(2000) / config.sample_rate
  sources = np.stack([np.sin(2 * np.pi * 220 * time) * np.hanning(2000),
                      0.5 * rng.standard_normal(2000)])[None].repeat(2, 0).astype(np.float32)
  sources[1] = sources[1, ::-1]
  batch = {"mixture": sources.sum(1), "sources": sources,
           "mask": np.ones((2, 2000), np.float32)}
  step = jax.jit(functools.partial(
      step_lib.train_step, model=model, optimizer=optimizer, axis_name=None,
      loss_config=likelihoods.LossConfig(block_length=config.block_length)))
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 1.0
    assert np.isfinite(float(metrics["grad_norm"]))
    losses.append(float(metrics["loss"]))
  print(f"bfloat16 training losses on a fixed batch: {np.round(losses, 4).tolist()}")
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] and min(losses[3:]) < min(losses[:3]), losses
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)} == {"float32"}
  assert int(state.nonfinite_steps) == 0


# --- which runs use it ----------------------------------------------------------------------
@pytest.mark.parametrize("platform,expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                               ("tpu", "bfloat16")])
def test_S_and_M_train_in_bfloat16_on_accelerators(monkeypatch, platform, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  for name in ("S", "M", "S/exits_12", "M/loss_gaussian"):
    train = configs.get(name).train
    assert train.model_config().dtype == "auto", name  # Kept until the trainer resolves it...
    assert train.model_config(resolve=True).dtype == expected, name  # ... as train() does.
  for name in ("demo", "demo_long", "tiny"):
    assert configs.get(name).train.model_config(resolve=True).dtype == "float32", name
  forced = configs.override(configs.get("S"), ["train.compute_dtype=float32"])
  assert forced.train.model_config(resolve=True).dtype == "float32"
  with pytest.raises(ValueError, match="compute_dtype"):
    configs.override(configs.get("S"), ["train.model_overrides.dtype=float32"])
  # A model built from an unresolved config resolves it when traced, on the same rule.
  assert press_net.compute_dtype(config_lib.preset("S", dtype="auto")) == jnp.dtype(expected)


def test_building_a_config_with_auto_does_not_touch_the_backend(monkeypatch):
  """A sweep's launcher validates configs (model_config()) before any jax.distributed start."""
  def refuse():
    raise AssertionError("jax.default_backend() called while building a config")

  monkeypatch.setattr(jax, "default_backend", refuse)
  config = configs.get("S").train.model_config()
  configs.get("S").train.loss_config()
  assert config.dtype == "auto"
  assert config_lib.resolve_dtype("auto", platform="gpu") == "bfloat16"
  assert config_lib.resolve_dtype("auto", platform="cpu") == "float32"
  assert config_lib.resolve_dtype("float32", platform="gpu") == "float32"
  assert config.resolved(platform="tpu").dtype == "bfloat16"
  with pytest.raises(ValueError, match="dtype must be"):
    config_lib.preset("S", dtype="bf16")
