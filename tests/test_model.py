"""PRESS-Net modules: shapes, framing, recurrence, padding and scale behaviour, bad input."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import config as config_lib
from press_jax import validation
from press_jax.models import layers, recurrence, press_net
from press_jax.types import ExitOutputs
from tests import model_util


@functools.lru_cache(maxsize=None)
def tiny_model_and_params():
  model = press_net.create("tiny")
  return model, press_net.init_params(model, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def tiny_apply():
  model, _ = tiny_model_and_params()
  return jax.jit(lambda params, x, mask: model.apply({"params": params}, x, mask))


def randomise(params, key, scale=0.3):
  """Random parameters (LayerScale at 1e-5 would make every exit nearly identical)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def test_outputs_are_stacked_exits():
  model, params = tiny_model_and_params()
  mixture = jax.random.normal(jax.random.key(1), (3, 2500))
  outputs = tiny_apply()(params, mixture, jnp.ones_like(mixture))
  config = model.config
  assert isinstance(outputs, ExitOutputs)
  assert outputs.mean.shape == (config.exits, 3, config.speakers, 2500)
  blocks = -(-2500 // config.block_length)
  assert outputs.log_var.shape == (config.exits, 3, config.speakers, blocks)
  assert outputs.log_alpha.shape == (config.exits, 3, config.speakers, blocks)
  assert np.all(np.isfinite(outputs.mean)) and np.all(np.isfinite(outputs.log_var))
  # alpha >= alpha_floor, and beta = alpha * exp(log_var).
  assert np.all(outputs.alpha >= config.alpha_floor * 0.999)
  np.testing.assert_allclose(outputs.beta, outputs.alpha * np.exp(outputs.log_var), rtol=1e-5)


@pytest.mark.parametrize("implementation", layers.RECURRENCE_IMPLEMENTATIONS)
def test_recurrence_gradient_matches_autodiff_of_the_scan(implementation):
  """Each kernel's hand-written adjoint equals JAX's own derivative of the associative scan.

  (Forward values and gradients against a numpy loop: tests/test_recurrence.py.)
  """
  key_a, key_b, key_c = jax.random.split(jax.random.key(12), 3)
  decay = jax.random.uniform(key_a, (3, 29, 4))
  drive = jax.random.normal(key_b, (3, 29, 4))
  weights = jax.random.normal(key_c, (2, 3, 29, 4))

  def objective(recurrence, decay, drive):
    forward, backward = recurrence(decay, drive)
    return jnp.sum(weights[0] * forward) + jnp.sum(weights[1] * jnp.sin(backward))

  def reference(decay, drive):
    return (recurrence._associative(decay, drive, False),
            recurrence._associative(decay, drive, True))

  ours = jax.grad(functools.partial(objective, functools.partial(
      layers.bidirectional_recurrence, implementation=implementation, chunk=8)), (0, 1))(
          decay, drive)
  expected = jax.grad(functools.partial(objective, reference), (0, 1))(decay, drive)
  for a, b in zip(ours, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,samples", [(16, 4, 1001), (32, 8, 999), (16, 4, 16)])
def test_framing_is_a_strided_convolution_and_overlap_add_its_transpose(kernel, stride, samples):
  key_x, key_w, key_f = jax.random.split(jax.random.key(3), 3)
  signal = jax.random.normal(key_x, (2, samples))
  weights = jax.random.normal(key_w, (kernel,))
  frames = press_net.frame_signal(signal, kernel, stride)
  assert frames.shape[1] == press_net.num_frames(samples, kernel, stride)
  # Independent reference: lax.conv with the same zero padding.
  pad = kernel - stride
  count = frames.shape[1]
  right = (count - 1) * stride + kernel - samples - pad
  reference = jax.lax.conv_general_dilated(
      signal[:, None, :], weights[None, None, :], (stride,), [(pad, right)])[:, 0]
  np.testing.assert_allclose(frames @ weights, reference, rtol=1e-4, atol=1e-4)
  # overlap_add is the adjoint of framing: <frame(x), y> == <x, overlap_add(y)>.
  y = jax.random.normal(key_f, frames.shape)
  lhs = jnp.vdot(frames, y)
  rhs = jnp.vdot(signal, press_net.overlap_add(y, stride, samples))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


@pytest.mark.parametrize("kernel,stride,samples,frames", [
    (16, 4, 1001, None), (160, 40, 8000, None), (32, 8, 999, None), (16, 4, 16, None),
    (16, 4, 900, 260)])  # The last: more frames than the samples need (cropped).
def test_overlap_add_written_out_gradient_is_autodiffs(kernel, stride, samples, frames):
  """overlap_add's custom gradient against autodiff of the plain pad-and-sum, and (for the
  frame count the model uses) against framing, its adjoint."""
  count = frames or press_net.num_frames(samples, kernel, stride)
  key_y, key_g = jax.random.split(jax.random.key(4))
  y = jax.random.normal(key_y, (2, 3, count, kernel))
  cotangent = jax.random.normal(key_g, (2, 3, samples))
  value, pullback = jax.vjp(lambda x: press_net.overlap_add(x, stride, samples), y)
  reference_value, reference_pullback = jax.vjp(
      lambda x: press_net._overlap_add(x, stride, samples), y)
  np.testing.assert_array_equal(value, reference_value)
  np.testing.assert_allclose(pullback(cotangent)[0], reference_pullback(cotangent)[0],
                             rtol=0, atol=0)
  if frames is None:
    framed = press_net.frame_signal(cotangent.reshape(6, samples), kernel, stride)
    np.testing.assert_array_equal(pullback(cotangent)[0].reshape(framed.shape), framed)


@pytest.mark.parametrize("waveform_head", ["mapping", "mask"])
def test_padding_never_changes_the_valid_outputs(waveform_head):
  if waveform_head == "mapping":
    model, params = tiny_model_and_params()
    apply = tiny_apply()
  else:
    model = press_net.create("tiny", waveform_head=waveform_head)
    params = press_net.init_params(model, jax.random.key(0))
    apply = jax.jit(lambda params, x, mask: model.apply({"params": params}, x, mask))
  params = randomise(params, jax.random.key(4))
  length, padded_length = 1700, 2600
  signal = jax.random.normal(jax.random.key(5), (1, length))
  alone = apply(params, signal, jnp.ones_like(signal))
  padded = jnp.pad(signal, ((0, 0), (0, padded_length - length)), constant_values=7.0)
  mask = (jnp.arange(padded_length) < length).astype(jnp.float32)[None]
  together = apply(params, padded, mask)
  np.testing.assert_allclose(together.mean[..., :length], alone.mean, rtol=2e-4, atol=2e-5)
  assert np.all(together.mean[..., length:] == 0)
  blocks = alone.log_var.shape[-1]
  np.testing.assert_allclose(together.log_var[..., :blocks], alone.log_var, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(together.log_alpha[..., :blocks], alone.log_alpha, rtol=1e-4,
                             atol=1e-4)


def test_mask_head_masks_and_decodes_the_encoder_basis():
  """MaskHead against numpy: sigmoid mask x basis, then a transposed convolution by loops."""
  kernel, stride, samples, width, channels = 16, 4, 203, 8, 12
  key_s, key_b, key_p = jax.random.split(jax.random.key(21), 3)
  frames = press_net.num_frames(samples, kernel, stride)
  streams = jax.random.normal(key_s, (2, 2, frames, width))
  basis = jax.random.normal(key_b, (2, frames, channels))
  head = press_net.MaskHead(kernel, stride, frame_norm=False)
  params = randomise(head.init(key_p, streams, basis, samples)["params"], key_p, 0.5)
  got = np.asarray(head.apply({"params": params}, streams, basis, samples))

  p = jax.tree_util.tree_map(np.asarray, params)
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  glu = np.asarray(streams) @ p["glu"]["kernel"] + p["glu"]["bias"]
  value, gate = glu[..., :width], glu[..., width:]
  mask = sigmoid((value * sigmoid(gate)) @ p["mask"]["kernel"] + p["mask"]["bias"])
  decoded = (mask * np.asarray(basis)[:, None]) @ p["transposed_conv"]["kernel"]
  expected = np.zeros((2, 2, (frames - 1) * stride + kernel))
  for f in range(frames):  # frame f starts at f * stride - (kernel - stride) in the signal
    expected[..., f * stride:f * stride + kernel] += decoded[..., f, :]
  expected = expected[..., kernel - stride:kernel - stride + samples]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_mask_head_model_keeps_its_own_decoder_per_exit():
  model = press_net.create("tiny", waveform_head="mask")
  params = press_net.init_params(model, jax.random.key(0))
  heads = [name for name in params["stages"] if name.endswith("waveform_head")]
  assert heads and all(
      params["stages"][name]["transposed_conv"]["kernel"].shape[-2:]
      == (model.config.encoder_channels, model.config.encoder_kernel) for name in heads)
  with pytest.raises(ValueError, match="waveform_head"):
    config_lib.preset("tiny", waveform_head="masks")


def _segment_sum_pooling(hidden, frame_block, frame_weight, blocks):
  """The variance head's pooling as first written (a per-utterance segment_sum)."""
  weighted = hidden * frame_weight[:, None, :, None]
  return jax.vmap(lambda f, ids: jax.ops.segment_sum(
      f.transpose(1, 0, 2), ids, num_segments=blocks).transpose(1, 0, 2))(weighted, frame_block)


def test_block_pooling_matches_the_segment_sum_it_replaced():
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(2, 2, 23, 5)), jnp.float32)
  frame_block = jnp.asarray(np.sort(rng.integers(0, 4, (2, 23)), axis=1))
  frame_weight = jnp.asarray(rng.uniform(size=(2, 23)), jnp.float32)
  np.testing.assert_allclose(press_net.pool_blocks(hidden, frame_block, frame_weight, 4),
                             _segment_sum_pooling(hidden, frame_block, frame_weight, 4),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", layers.RECURRENCE_IMPLEMENTATIONS)
def test_outputs_equal_the_associative_reference_for_every_kernel(implementation):
  """Swapping the recurrence kernel leaves the model's outputs as the associative scan's."""
  model, params = tiny_model_and_params()
  params = randomise(params, jax.random.key(14))
  signal = jax.random.normal(jax.random.key(15), (2, 2600))
  mask = (jnp.arange(2600)[None] < jnp.array([[2600], [1900]])).astype(jnp.float32)
  swapped = press_net.PressNet(model.config.replace(recurrence=implementation))
  ours = swapped.apply({"params": params}, signal, mask)

  reference = press_net.PressNet(model.config.replace(recurrence="associative")).apply(
      {"params": params}, signal, mask)
  for name in ("mean", "log_var", "log_alpha"):
    np.testing.assert_allclose(getattr(ours, name), getattr(reference, name), rtol=2e-5,
                               atol=2e-5 * float(np.abs(getattr(reference, name)).max()))


def test_scaling_the_mixture_scales_means_and_variances():
  _, params = tiny_model_and_params()
  params = randomise(params, jax.random.key(6))
  signal = jax.random.normal(jax.random.key(7), (2, 1500))
  mask = jnp.ones_like(signal)
  base = tiny_apply()(params, signal, mask)
  louder = tiny_apply()(params, 10.0 * signal, mask)
  scale = float(np.abs(base.mean).max())
  np.testing.assert_allclose(louder.mean, 10.0 * base.mean, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(louder.log_var, base.log_var + 2 * np.log(10.0), atol=1e-3)
  np.testing.assert_allclose(louder.log_alpha, base.log_alpha, atol=1e-4)


def test_exits_differ_after_training_like_parameters():
  _, params = tiny_model_and_params()
  params = randomise(params, jax.random.key(8))
  signal = jax.random.normal(jax.random.key(9), (1, 1200))
  outputs = tiny_apply()(params, signal, jnp.ones_like(signal))
  assert not np.allclose(outputs.mean[0], outputs.mean[1])


def test_cumulative_exit_parameters():
  log_var = jax.random.normal(jax.random.key(10), (3, 1, 2, 4))
  log_alpha = jax.random.normal(jax.random.key(11), (3, 1, 2, 4))
  new_log_var, new_log_alpha = press_net.cumulative_exit_parameters(log_var, log_alpha)
  alpha = np.exp(np.asarray(log_alpha, np.float64))
  beta = alpha * np.exp(np.asarray(log_var, np.float64))
  alpha_c = np.cumsum(alpha, 0)
  beta_c = 1.0 / np.cumsum(1.0 / beta, 0)
  np.testing.assert_allclose(np.exp(new_log_alpha), alpha_c, rtol=1e-5)
  np.testing.assert_allclose(np.exp(new_log_var), beta_c / alpha_c, rtol=1e-5)


def test_cumulative_option_runs_in_the_model():
  model = press_net.create("tiny", cumulative_exits=True)
  params = press_net.init_params(model, jax.random.key(0))
  outputs = jax.jit(model.apply)({"params": params}, jnp.ones((1, 1200)) * 0.1)
  assert np.all(np.diff(np.asarray(outputs.log_alpha), axis=0) > 0)


def test_without_frame_norm_the_main_path_keeps_each_frames_level():
  """frame_norm=False drops the three main-path RMSNorms (and their parameters); a frame of the
  encoder's output then scales with the mixture's local level, which RMSNorm removes."""
  model = press_net.create("tiny", frame_norm=False)
  params = press_net.init_params(model, jax.random.key(0))
  assert "norm" not in params["encoder"] and "norm" not in params["speaker_split"]
  assert "norm" in press_net.init_params(press_net.create("tiny"), jax.random.key(0))["encoder"]
  signal = np.array(jax.random.normal(jax.random.key(16), (1, 4000)))
  signal[:, 2000:] *= 0.01  # The second half 40 dB quieter.
  for frame_norm, expect_ratio in ((False, 1e-2), (True, 1.0)):
    encoder = press_net.Encoder(64, 16, 4, 32, frame_norm=frame_norm)
    encoder_params = encoder.init(jax.random.key(1), signal)
    latent = np.asarray(encoder.apply(encoder_params, signal))
    loud = np.sqrt(np.mean(latent[0, 50:450] ** 2))
    quiet = np.sqrt(np.mean(latent[0, 550:950] ** 2))
    assert 0.3 * expect_ratio < quiet / loud < 3.0 * expect_ratio
  # The padding guarantee holds without the norms too.
  apply = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
  params = randomise(params, jax.random.key(17))
  alone = apply(params, signal[:, :3000], np.ones((1, 3000), np.float32))
  padded = np.pad(signal, ((0, 0), (0, 600)), constant_values=5.0)
  mask = (np.arange(4600) < 3000).astype(np.float32)[None]
  together = apply(params, padded, mask)
  np.testing.assert_allclose(together.mean[..., :3000], alone.mean, rtol=2e-4,
                             atol=2e-5 * float(np.abs(alone.mean).max()))


def test_mixture_consistency_makes_every_exit_sum_to_the_mixture():
  """Same parameters with and without the option: the shift is the residual's equal share."""
  plain_model, params = tiny_model_and_params()
  params = randomise(params, jax.random.key(3))
  model = press_net.create("tiny", mixture_consistency=True)
  mixture = np.asarray(jax.random.normal(jax.random.key(4), (2, 2600)))
  mask = np.ones_like(mixture)
  mask[1, 1900:] = 0.0  # Second utterance padded.
  plain = np.asarray(plain_model.apply({"params": params}, mixture, mask).mean, np.float64)
  consistent = np.asarray(model.apply({"params": params}, mixture, mask).mean, np.float64)
  valid = mixture * mask
  # Reference in numpy: x_j + (mixture - sum_k x_k) / S on valid samples, zero on padding.
  expected = plain + (valid[None] - plain.sum(axis=2))[:, :, None, :] / 2.0
  np.testing.assert_allclose(consistent, expected * mask[None, :, None, :], atol=2e-5)
  np.testing.assert_allclose(consistent.sum(axis=2), np.broadcast_to(valid, (2,) + valid.shape),
                             atol=2e-5)
  assert np.abs(plain.sum(axis=2) - valid).max() > 0.1  # Without it they do not sum up.


def test_sixteen_kilohertz_preset_scales_the_framing():
  config = config_lib.preset("tiny", sample_rate=16000)
  assert (config.encoder_stride, config.encoder_kernel, config.block_length) == (8, 32, 4000)
  model = press_net.PressNet(config)
  params = press_net.init_params(model, jax.random.key(0))
  outputs = jax.jit(model.apply)({"params": params}, jnp.ones((1, 6000)) * 0.1)
  assert outputs.mean.shape == (config.exits, 1, 2, 6000)
  assert outputs.log_var.shape[-1] == 2


def test_s_preset_16k_uses_stride_8_kernel_32():
  config = config_lib.preset("S", sample_rate=16000)
  assert (config.encoder_stride, config.encoder_kernel, config.block_length) == (8, 32, 4000)


def test_exit_ablation_keeps_the_backbone():
  from press_jax import compute
  counts = {exits: compute.params_per_exit(config_lib.preset("S", exits=exits))[-1]
            for exits in (4, 6, 12)}
  assert counts[4] < counts[6] < counts[12]
  assert counts[12] / counts[4] < 1.05  # Only heads are added.


def test_save_and_load_round_trip(tmp_path):
  model, params = tiny_model_and_params()
  press_net.save(str(tmp_path), model, params)
  loaded_model, loaded_params = press_net.load(str(tmp_path))
  assert loaded_model.config == model.config
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded_params)):
    np.testing.assert_array_equal(a, b)


def test_load_names_the_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    press_net.load(str(tmp_path / "nowhere"))


def test_unknown_preset_and_bad_config():
  with pytest.raises(ValueError, match="unknown preset"):
    press_net.create("XL")
  with pytest.raises(ValueError, match="decoder_blocks"):
    config_lib.preset("S", exits=5)
  with pytest.raises(ValueError, match="encoder_kernel"):
    config_lib.preset("S", encoder_kernel=18)


@pytest.mark.parametrize("overrides,message", [
    (dict(decoder_blocks=4, exits=3, stage_blocks=(1, 2)), r"one positive int per exit \(3\)"),
    (dict(decoder_blocks=4, exits=3, stage_blocks=(1, 1, 1)), r"summing to decoder_blocks \(4\)"),
    (dict(decoder_blocks=4, exits=3, stage_blocks=(0, 2, 2)), "stage_blocks"),
    (dict(decoder_blocks=4, exits=3), "multiple of exits"),
])
def test_unequal_stage_depths_are_validated(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.preset("tiny", **overrides)


def test_unequal_stage_depths_layout_and_round_trip():
  """stage_blocks (1, 1, 2): one scan step of three stages, RNN blocks counted across them."""
  config = config_lib.preset("tiny", decoder_blocks=4, exits=3, stage_blocks=[1, 1, 2],
                             attention_every=3)
  assert config.stage_blocks == (1, 1, 2) and (config.stages_per_group, config.groups) == (3, 1)
  assert [config.stage_layout(s) for s in range(3)] == [
      ("rnn",), ("rnn",), ("rnn", "attention", "rnn")]
  assert config_lib.PressConfig.from_dict(json.loads(config.to_json())) == config
  with pytest.raises(ValueError, match="unequal depth"):
    config.blocks_per_stage
  model = press_net.create("tiny", **config.to_dict())
  names = sorted(press_net.parameter_shapes(config)["stages"])
  assert [n for n in names if "_rnn" in n] == ["stage0_rnn0", "stage1_rnn0", "stage2_rnn0",
                                               "stage2_rnn1"]
  mixture = model_util.padded_mixture(2, 2237)[0]
  outputs = model.apply({"params": press_net.init_params(model, jax.random.key(0))}, mixture)
  assert outputs.mean.shape == (3, 2, 2, 2237)


@pytest.mark.parametrize("mixture,kwargs,message", [
    (np.zeros(800, np.float32), {}, r"expected shape \(batch, samples\).*\[None\]"),
    (np.zeros((1, 2, 800), np.float32), {}, r"expected shape \(batch, samples\)"),
    (np.zeros((1, 800), np.int16), {}, "floating-point.*int16"),
    (np.array([[0.0] * 100 + [np.nan] + [0.0] * 100], np.float32), {}, "NaN/inf.*sample 100"),
    (np.array([[0.0] * 100 + [np.inf] * 3], np.float32), {}, "NaN/inf"),
    (np.zeros((1, 10), np.float32), {}, "shorter than one encoder frame"),
    (np.zeros((1, 800), np.float32), {"sample_rate": 16000}, "8000 Hz.*16000"),
    (np.zeros((1, 800), np.float32), {"mask": np.ones((1, 700))}, "mask: expected shape"),
    (np.zeros((1, 800), np.float32), {"mask": np.r_[np.zeros(10), np.ones(790)][None]},
     "valid samples followed by padding"),
])
def test_bad_mixtures_raise_clear_errors(mixture, kwargs, message):
  with pytest.raises(ValueError, match=message):
    validation.check_waveforms(mixture, config_lib.preset("tiny"), **kwargs)


def test_sources_must_match_the_model_speakers():
  config = config_lib.preset("tiny")
  with pytest.raises(ValueError, match="2 speakers, got 3"):
    validation.check_sources(np.zeros((1, 3, 800)), np.zeros((1, 800)), config)
  with pytest.raises(ValueError, match="do not match"):
    validation.check_sources(np.zeros((1, 2, 700)), np.zeros((1, 800)), config)


def test_two_pass_mixer_in_chunk_positions_equals_the_associative_one():
  """LinearRNNMixer with 'two_pass' runs in the chunk-position layout (its own code path):
  outputs and every parameter's gradient equal the associative mixer's, rows padded."""
  x = jax.random.normal(jax.random.key(21), (3, 45, 8))
  mask = (jnp.arange(45)[None] < jnp.array([[45], [30], [7]])).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(22), (3, 45, 8))
  params = layers.LinearRNNMixer(12, recurrence="associative").init(jax.random.key(23), x, mask)
  params = randomise(params, jax.random.key(24))

  def loss(implementation, params):
    mixer = layers.LinearRNNMixer(12, recurrence=implementation, recurrence_chunk=8)
    return jnp.sum(jnp.sin(mixer.apply(params, x, mask)) * weights)

  for value, expected in zip(jax.value_and_grad(functools.partial(loss, "two_pass"))(params),
                             jax.value_and_grad(functools.partial(loss, "associative"))(params)):
    for a, b in zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
