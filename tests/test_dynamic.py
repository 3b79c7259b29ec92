"""The dynamic (while-loop) exit path against the masked path, and its jaxpr."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import calibration as calibration_lib
from press_jax import dynamic
from press_jax.models import press_net
from tests import model_util

# (name, overrides): one stage per scan step, and three stages per scan step (the demo's
# layout: one RNN block per exit, attention after the third), mask heads with a deeper last
# stage (stage_blocks (1, 1, 2)), and cumulative exits.
CONFIGS = {
    "one_stage_per_step": dict(width=16, encoder_blocks=1, decoder_blocks=4, exits=4,
                               attention_every=1, attention_heads=2, rnn_expansion=1.0,
                               ffn_expansion=1.0, attention_ffn_expansion=1.0,
                               encoder_channels=16, block_length=400),
    "three_stages_per_step": dict(width=16, encoder_blocks=1, decoder_blocks=3, exits=3,
                                  attention_every=3, attention_heads=2, rnn_expansion=1.0,
                                  ffn_expansion=1.0, attention_ffn_expansion=1.0,
                                  encoder_channels=16, block_length=400,
                                  mixture_consistency=True, frame_norm=False),
    "mask_head": dict(width=16, encoder_blocks=1, decoder_blocks=4, exits=3,
                      stage_blocks=(1, 1, 2),
                      attention_every=3, attention_heads=2, rnn_expansion=1.0,
                      ffn_expansion=1.0, attention_ffn_expansion=1.0,
                      encoder_channels=16, block_length=400, mixture_consistency=True,
                      frame_norm=False, waveform_head="mask"),
    "cumulative": dict(width=16, encoder_blocks=0, decoder_blocks=2, exits=2,
                       attention_every=2, attention_heads=2, rnn_expansion=1.0,
                       ffn_expansion=1.0, attention_ffn_expansion=1.0, encoder_channels=16,
                       block_length=400, cumulative_exits=True),
}


def model_and_params(name, seed=0):
  return model_util.randomised_model(CONFIGS[name], seed)


def mixtures(batch=2, samples=2600, seed=0):
  rng = np.random.default_rng(seed)
  time = np.arange(samples) / 8000.0
  mixture = (np.sin(2 * np.pi * 220 * time)[None] * rng.uniform(0.1, 1.0, (batch, 1))
             + 0.3 * rng.standard_normal((batch, samples))).astype(np.float32)
  mask = np.ones((batch, samples), np.float32)
  mask[1:, samples - 900:] = 0.0  # The second item ends two blocks early.
  return mixture, mask


def assert_same_selection(got, expected):
  valid = np.asarray(expected.block_valid)
  np.testing.assert_array_equal(np.asarray(got.block_valid), valid)
  np.testing.assert_array_equal(np.asarray(got.exit_index)[valid],
                                np.asarray(expected.exit_index)[valid])
  np.testing.assert_allclose(np.asarray(got.probability)[valid],
                             np.asarray(expected.probability)[valid], atol=2e-5)
  reference = np.asarray(expected.waveform)
  np.testing.assert_allclose(np.asarray(got.waveform), reference,
                             atol=2e-5 * max(1.0, np.abs(reference).max()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("target_db", [-5.0, 0.0, 3.0, 30.0])
@pytest.mark.parametrize("conditions", [("snr", "snri", "snr_ref"), ("snr_ref",)])
def test_dynamic_equals_masked(name, target_db, conditions):
  model, params = model_and_params(name)
  mixture, mask = mixtures()
  settings = dict(target_db=target_db, confidence=0.6, crossfade_ms=10.0, conditions=conditions)
  got = dynamic.dynamic_select(model, params, mixture, mask, **settings)
  expected = dynamic.masked_select(model, params, mixture, mask, **settings)
  assert_same_selection(got, expected)
  # The loop ran exactly as deep as the deepest block needed.
  deepest = int(dynamic.exits_needed(expected).max())
  assert int(got.exits_run) == deepest
  assert int(got.variance_heads_run) == deepest
  if conditions == ("snr_ref",):
    # Estimate-free rule: a waveform head runs for each exit some valid block chose, no other.
    chosen = np.unique(np.asarray(expected.exit_index)[np.asarray(expected.block_valid)])
    assert int(got.waveform_heads_run) == chosen.size
  else:
    assert int(got.waveform_heads_run) == deepest


def test_estimate_free_rule_skips_unchosen_heads():
  """snr_ref alone: over a sweep of targets some window's blocks skip an exit between the first
  and the deepest, and then fewer heads than stages run (the case the saving is for)."""
  model, params = model_and_params("one_stage_per_step")
  mixture, mask = mixtures()
  for target in np.linspace(-10.0, 30.0, 17):
    settings = dict(target_db=float(target), confidence=0.6, conditions=("snr_ref",))
    got = dynamic.dynamic_select(model, params, mixture, mask, **settings)
    assert_same_selection(got, dynamic.masked_select(model, params, mixture, mask, **settings))
    if int(got.waveform_heads_run) < int(got.exits_run):
      return
  pytest.fail("no target left an exit between 1 and the deepest unchosen")


def test_choices_vary_and_the_loop_stops_early():
  """The comparison above is not vacuous: some targets pick early exits, some the last."""
  model, params = model_and_params("one_stage_per_step")
  mixture, mask = mixtures()
  low = dynamic.dynamic_select(model, params, mixture, mask, target_db=-50.0, confidence=0.5)
  high = dynamic.dynamic_select(model, params, mixture, mask, target_db=60.0, confidence=0.99)
  valid = np.asarray(low.block_valid)
  assert int(low.exits_run) == 1 and np.all(np.asarray(low.exit_index)[valid] == 0)
  assert int(high.exits_run) == 4
  chosen = set()
  for target in np.linspace(-10, 20, 13):
    selection = dynamic.masked_select(model, params, mixture, mask, target_db=float(target),
                                      confidence=0.6)
    chosen |= set(np.asarray(selection.exit_index)[np.asarray(selection.block_valid)].tolist())
  assert len(chosen) >= 3, chosen


@pytest.mark.parametrize("policy,max_exit", [("dynamic", 2), ("static", 3), ("static", 1)])
def test_max_exit_and_static_policy(policy, max_exit):
  model, params = model_and_params("one_stage_per_step")
  mixture, mask = mixtures()
  settings = dict(target_db=3.0, confidence=0.6, max_exit=max_exit, policy=policy)
  got = dynamic.dynamic_select(model, params, mixture, mask, **settings)
  expected = dynamic.masked_select(model, params, mixture, mask, **settings)
  assert_same_selection(got, expected)
  assert int(np.asarray(got.exit_index).max()) <= max_exit - 1
  if policy == "static":
    assert np.all(np.asarray(got.exit_index) == max_exit - 1)
    assert int(got.exits_run) == max_exit
    # A static exit's waveform is that exit's output, from the full forward pass.
    outputs = model.apply({"params": params}, jnp.asarray(mixture), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got.waveform),
                               np.asarray(outputs.mean[max_exit - 1]), atol=1e-4)


def test_post_calibration_is_applied_per_exit():
  model, params = model_and_params("one_stage_per_step")
  mixture, mask = mixtures()
  calibration = calibration_lib.PostCalibration(
      log_alpha_scale=jnp.asarray([0.5, -0.3, 0.2, 0.0]),
      log_beta_scale=jnp.asarray([-1.0, 0.4, 0.0, 0.3]))
  settings = dict(target_db=3.0, confidence=0.6, calibration=calibration)
  got = dynamic.dynamic_select(model, params, mixture, mask, **settings)
  expected = dynamic.masked_select(model, params, mixture, mask, **settings)
  assert_same_selection(got, expected)
  plain = dynamic.masked_select(model, params, mixture, mask, target_db=3.0, confidence=0.6)
  assert not np.array_equal(np.asarray(plain.probability), np.asarray(expected.probability))


def primitive_names(jaxpr) -> set[str]:
  names = set()
  for equation in jaxpr.eqns:
    names.add(equation.primitive.name)
    for value in equation.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names |= primitive_names(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names |= primitive_names(sub)
  return names


@pytest.mark.parametrize("name", ["one_stage_per_step", "three_stages_per_step"])
def test_jaxpr_has_a_while_loop_and_no_cond(name):
  model, params = model_and_params(name)
  mixture, mask = mixtures()
  closed = jax.make_jaxpr(
      lambda p, x, m: dynamic.dynamic_select(model, p, x, m, target_db=3.0, confidence=0.6))(
          params, mixture, mask)
  names = primitive_names(closed.jaxpr)
  assert "while" in names
  assert "cond" not in names, sorted(names)


@pytest.mark.parametrize("kwargs,message", [
    (dict(confidence=1.0), "confidence"),
    (dict(max_exit=5), "max_exit must be between 1 and 4"),
    (dict(max_exit=0), "max_exit"),
    (dict(policy="oracle"), "policy"),
    (dict(crossfade_ms=60.0), "crossfade"),
])
def test_bad_arguments(kwargs, message):
  model, params = model_and_params("one_stage_per_step")
  mixture, mask = mixtures()
  with pytest.raises(ValueError, match=message):
    dynamic.dynamic_select(model, params, mixture, mask, **kwargs)


@pytest.mark.parametrize("name", ["three_stages_per_step", "mask_head", "cumulative"])
def test_static_exit_skips_the_earlier_exits_heads(name, monkeypatch):
  """The static policy traces one waveform head (its exit's, outside any loop), and still equals
  the masked path; the dynamic loop's body holds every stage's head of a group."""
  import flax.linen as nn

  model, params = model_and_params(name)
  mixture, mask = mixtures()
  exits = model.config.exits
  settings = dict(target_db=3.0, confidence=0.6, max_exit=exits)
  got = dynamic.dynamic_select(model, params, mixture, mask, policy="static", **settings)
  assert_same_selection(got, dynamic.masked_select(model, params, mixture, mask,
                                                   policy="static", **settings))
  assert int(got.exits_run) == exits

  unjitted = dynamic._dynamic_core.__wrapped__

  def heads_traced(policy):
    calls = []

    def interceptor(next_function, args, kwargs, context):
      if (isinstance(context.module, (press_net.WaveformHead, press_net.MaskHead))
              and context.method_name == "__call__"):
        calls.append(context.module.name)
      return next_function(*args, **kwargs)

    # Traced afresh (jit's cache would skip the Python function and with it the interceptor).
    monkeypatch.setattr(dynamic, "_dynamic_core", unjitted)
    with nn.intercept_methods(interceptor):
      jax.make_jaxpr(lambda p, x, m: dynamic.dynamic_select(
          model, p, x, m, policy=policy, **settings))(params, mixture, mask)
    return len(calls)

  assert heads_traced("static") == 1
  assert heads_traced("dynamic") == model.config.stages_per_group > 1
