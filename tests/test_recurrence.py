"""The linear recurrence kernels, tested as a matrix: implementation x dtype x direction.

The reference is a plain numpy loop in float64 (forward), and the loop's own reverse-mode
derivative written out by hand in numpy (gradient) -- neither shares code with the kernels.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import config as config_lib
from press_jax.models import recurrence

IMPLEMENTATIONS = recurrence.RECURRENCE_IMPLEMENTATIONS
# float32: 1e-5 relative (the bar). bfloat16 inputs carry 8 bits of mantissa; the
# kernels upcast them to float32 and round the states (and gradients) back to bfloat16 once, so
# the error is about one rounding (~4e-3), well under this bar (tests/test_bfloat16.py checks
# the float32 accumulation exactly).
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


def numpy_loop(decay, drive, reverse=False):
  """h_t = a_t h_{t-1} + b_t (reverse: h_t = a_t h_{t+1} + b_t) in float64."""
  decay, drive = np.asarray(decay, np.float64), np.asarray(drive, np.float64)
  states = np.zeros_like(drive)
  state = np.zeros(drive.shape[:-2] + drive.shape[-1:])
  steps = range(drive.shape[-2] - 1, -1, -1) if reverse else range(drive.shape[-2])
  for t in steps:
    state = decay[..., t, :] * state + drive[..., t, :]
    states[..., t, :] = state
  return states


def numpy_loop_gradient(decay, drive, cotangent, reverse=False):
  """dL/d(decay), dL/d(drive) for L = sum(cotangent * numpy_loop(...)), by backprop of the loop."""
  decay, drive = np.asarray(decay, np.float64), np.asarray(drive, np.float64)
  cotangent = np.asarray(cotangent, np.float64)
  states = numpy_loop(decay, drive, reverse)
  grad_decay, grad_drive = np.zeros_like(decay), np.zeros_like(drive)
  carry = np.zeros(drive.shape[:-2] + drive.shape[-1:])
  time = drive.shape[-2]
  steps = range(time) if reverse else range(time - 1, -1, -1)  # the loop, backwards
  for t in steps:
    carry = carry + cotangent[..., t, :]
    grad_drive[..., t, :] = carry
    previous = t + 1 if reverse else t - 1
    if 0 <= previous < time:
      grad_decay[..., t, :] = carry * states[..., previous, :]
    carry = carry * decay[..., t, :]
  return grad_decay, grad_drive


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  decay = rng.uniform(0.5, 0.99, shape)
  drive = rng.normal(size=shape)
  cotangent = rng.normal(size=shape)
  cast = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)  # noqa
  return [jnp.asarray(x, dtype) for x in (decay, drive, cotangent)], [cast(x) for x in
                                                                      (decay, drive, cotangent)]


def _relative_error(actual, expected):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)


CASES = list(itertools.product(IMPLEMENTATIONS, ("float32", "bfloat16"), (False, True)))


@pytest.mark.parametrize("implementation,dtype,reverse", CASES)
def test_forward_and_gradient_match_a_numpy_loop(implementation, dtype, reverse):
  time = 37 if dtype == "float32" else 23  # Not a multiple of the chunk: ragged last chunk.
  (decay, drive, cotangent), (decay64, drive64, cotangent64) = _inputs((2, 3, time, 5), dtype)

  def objective(decay, drive):
    states = recurrence.linear_recurrence(decay, drive, reverse=reverse,
                                          implementation=implementation, chunk=8)
    return jnp.sum(states.astype(jnp.float32) * cotangent.astype(jnp.float32))

  states = jax.jit(lambda a, b: recurrence.linear_recurrence(
      a, b, reverse=reverse, implementation=implementation, chunk=8))(decay, drive)
  assert states.dtype == decay.dtype
  assert _relative_error(states, numpy_loop(decay64, drive64, reverse)) < TOLERANCE[dtype]
  grad_decay, grad_drive = jax.jit(jax.grad(objective, (0, 1)))(decay, drive)
  expected_decay, expected_drive = numpy_loop_gradient(decay64, drive64, cotangent64, reverse)
  assert _relative_error(grad_decay, expected_decay) < TOLERANCE[dtype]
  assert _relative_error(grad_drive, expected_drive) < TOLERANCE[dtype]


def _assert_rows_match_loops(lengths, inputs, results):
  """Each row's valid frames of (forward, backward, d decay, d drive) of sum(cotangent *
  (forward + 0.5 backward)) against the numpy loops over those frames alone."""
  decay, drive, cotangent = inputs
  forward, backward, grad_decay, grad_drive = results
  for row, length in enumerate(lengths):
    a, b, g = decay[row, :length], drive[row, :length], cotangent[row, :length]
    np.testing.assert_allclose(forward[row, :length], numpy_loop(a, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backward[row, :length], numpy_loop(a, b, True), rtol=1e-5,
                               atol=1e-5)
    gf_a, gf_b = numpy_loop_gradient(a, b, g)
    gb_a, gb_b = numpy_loop_gradient(a, b, 0.5 * g, reverse=True)
    np.testing.assert_allclose(grad_drive[row, :length], gf_b + gb_b, rtol=1e-5, atol=1e-5)
    # The backward pass's first valid frame sees the padding's zero state: no decay gradient
    # flows from the padding, so the valid-frame decay gradients equal the loop's.
    np.testing.assert_allclose(grad_decay[row, :length], gf_a + gb_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bidirectional_with_padding_resets_like_a_loop_over_valid_frames(implementation):
  """Padded frames (decay = drive = 0, as the mixer masks them) never reach valid frames."""
  rng = np.random.default_rng(1)
  time, lengths = 29, (29, 17, 9)
  decay = rng.uniform(0.5, 0.99, (3, time, 4))
  drive = rng.normal(size=(3, time, 4))
  keep = (np.arange(time)[None, :] < np.asarray(lengths)[:, None])[..., None]
  padded_decay = jnp.asarray(np.where(keep, decay, 0.0), jnp.float32)
  padded_drive = jnp.asarray(np.where(keep, drive, 0.0), jnp.float32)
  cotangent = rng.normal(size=(3, time, 4))

  def objective(a, b):
    forward, backward = recurrence.bidirectional_recurrence(a, b, implementation=implementation,
                                                            chunk=4)
    return jnp.sum((forward + 0.5 * backward) * cotangent)

  forward, backward = recurrence.bidirectional_recurrence(
      padded_decay, padded_drive, implementation=implementation, chunk=4)
  grad_decay, grad_drive = jax.grad(objective, (0, 1))(padded_decay, padded_drive)
  _assert_rows_match_loops(lengths, (decay, drive, cotangent),
                           (forward, backward, grad_decay, grad_drive))


def test_a_zero_decay_resets_the_chunked_state_exactly_enough():
  """The chunked kernel works in log space; a zero decay (log = -inf) must still reset."""
  decay = jnp.asarray(np.r_[np.full(10, 0.9), 0.0, np.full(10, 0.9)][None, :, None], jnp.float32)
  drive = jnp.ones_like(decay)
  expected = numpy_loop(decay, drive)
  for chunk in (1, 4, 16, 32):
    actual = recurrence.linear_recurrence(decay, drive, implementation="chunked", chunk=chunk)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_the_config_takes_every_kernel_name():
  assert set(config_lib.RECURRENCES) == {"auto", *IMPLEMENTATIONS}


def test_auto_resolves_per_platform_and_bad_names_are_refused():
  assert recurrence.resolve_implementation("auto", "cpu") == "sequential"
  for name in IMPLEMENTATIONS:
    assert recurrence.resolve_implementation(name) == name
  assert recurrence.resolve_implementation("auto", "tpu") in IMPLEMENTATIONS
  with pytest.raises(ValueError, match="recurrence implementation"):
    recurrence.linear_recurrence(jnp.ones((3, 2)), jnp.ones((3, 2)), implementation="fast")


# (implementation, its setting): the doubling kernel with chunks of 2^rounds frames and a while
# loop of doubling rounds across chunks; the two-pass kernel with chunks of C frames, whose chunk
# states go through the doubling kernel.
SYMBOLIC_CASES = [("doubling", 2), ("doubling", recurrence.DOUBLING_STATIC_ROUNDS),
                  ("two_pass", 3)]  # The exports' chunk of 32: the whole-model export tests.


@pytest.mark.parametrize("implementation,setting", SYMBOLIC_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_export_kernels_at_a_symbolic_length_are_exact_at_every_length(
    reverse, implementation, setting, monkeypatch):
  """One jax.export graph of each kernel the exports use against the numpy loop at lengths
  around powers of two and chunk boundaries, forward and gradient. Chunks of 4 (doubling) or 3
  (two-pass) frames make every length but the first few span several chunks (one, two and
  nine doubling rounds' worth)."""
  chunk = setting
  if implementation == "doubling":
    monkeypatch.setattr(recurrence, "DOUBLING_STATIC_ROUNDS", setting)
    chunk = recurrence.DEFAULT_CHUNK
  length = jax.export.symbolic_shape("time")[0]
  spec = jax.ShapeDtypeStruct((2, length, 3), jnp.float32)
  run = functools.partial(recurrence.linear_recurrence, reverse=reverse,
                          implementation=implementation, chunk=chunk)

  def states_and_gradients(decay, drive, cotangent):
    def objective(a, b):
      return jnp.sum(run(a, b) * cotangent)
    return (run(decay, drive), *jax.grad(objective, (0, 1))(decay, drive))

  exported = jax.export.export(jax.jit(states_and_gradients))(spec, spec, spec)
  assert "while" in exported.mlir_module()
  for time in (1, 2, 3, 4, 5, 8, 9, 33, 1030):
    (decay, drive, cotangent), (decay64, drive64, cotangent64) = _inputs((2, time, 3), "float32",
                                                                        seed=time)
    states, grad_decay, grad_drive = exported.call(decay, drive, cotangent)
    expected_decay, expected_drive = numpy_loop_gradient(decay64, drive64, cotangent64, reverse)
    assert _relative_error(states, numpy_loop(decay64, drive64, reverse)) < 1e-5, time
    assert _relative_error(grad_decay, expected_decay) < 1e-5, time
    assert _relative_error(grad_drive, expected_drive) < 1e-5, time


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunk_position_layout_round_trips(chunk):
  """to_chunk_positions puts frame c * chunk + j at [j, ..., c] (zeros after the end), and
  from_chunk_positions undoes it exactly."""
  x = np.random.default_rng(3).normal(size=(2, 3, 17, 4)).astype(np.float32)
  positions = recurrence.to_chunk_positions(jnp.asarray(x), chunk)
  count = -(-17 // chunk)
  assert positions.shape == (chunk, 2, 3, count, 4)
  padded = np.concatenate([x, np.zeros((2, 3, count * chunk - 17, 4), np.float32)], axis=2)
  for j in range(chunk):
    np.testing.assert_array_equal(positions[j], padded[:, :, j::chunk])
  np.testing.assert_array_equal(recurrence.from_chunk_positions(positions, 17), x)


def _by_position_states_and_gradients(decay, drive, cotangent, chunk):
  """(forward, backward, d decay, d drive) of sum(cotangent * (forward + 0.5 backward)),
  time-major in and out, through the chunk-position layout."""
  time = decay.shape[-2]

  def run(a, b):
    forward, backward = recurrence.bidirectional_by_chunk_position(
        recurrence.to_chunk_positions(a, chunk), recurrence.to_chunk_positions(b, chunk))
    return (recurrence.from_chunk_positions(forward, time),
            recurrence.from_chunk_positions(backward, time))

  def objective(a, b):
    forward, backward = run(a, b)
    return jnp.sum((forward + 0.5 * backward) * cotangent)

  return (*run(decay, drive), *jax.grad(objective, (0, 1))(decay, drive))


@pytest.mark.parametrize("chunk, time", [(1, 7), (3, 29), (8, 29), (8, 5), (32, 40)])
def test_bidirectional_by_chunk_position_with_padding_matches_loops(chunk, time):
  """The mixer's two-pass path (its own layout and written-out gradient) against the numpy
  loops over each row's valid frames, padded frames reset (decay = drive = 0) as the mixer
  masks them; the zero frames after the end in the layout reset the same way."""
  rng = np.random.default_rng(chunk * 100 + time)
  lengths = (time, max(1, time - 12), max(1, time // 3))
  decay = rng.uniform(0.5, 0.99, (3, time, 4))
  drive = rng.normal(size=(3, time, 4))
  keep = (np.arange(time)[None, :] < np.asarray(lengths)[:, None])[..., None]
  cotangent = rng.normal(size=(3, time, 4))
  forward, backward, grad_decay, grad_drive = jax.jit(functools.partial(
      _by_position_states_and_gradients, chunk=chunk))(
          jnp.asarray(np.where(keep, decay, 0.0), jnp.float32),
          jnp.asarray(np.where(keep, drive, 0.0), jnp.float32), jnp.asarray(cotangent,
                                                                           jnp.float32))
  _assert_rows_match_loops(lengths, (decay, drive, cotangent),
                           (forward, backward, grad_decay, grad_drive))


def test_bidirectional_by_chunk_position_at_a_symbolic_length():
  """One jax.export graph (a while loop over the chunk states) exact at every length: forward,
  backward and gradients against the numpy loops, chunks of 3 frames."""
  length = jax.export.symbolic_shape("time")[0]
  spec = jax.ShapeDtypeStruct((2, length, 3), jnp.float32)
  exported = jax.export.export(jax.jit(functools.partial(
      _by_position_states_and_gradients, chunk=3)))(spec, spec, spec)
  assert "while" in exported.mlir_module()
  for time in (1, 2, 3, 4, 5, 8, 9, 33, 1030):
    (decay, drive, cotangent), (decay64, drive64, cotangent64) = _inputs((2, time, 3), "float32",
                                                                        seed=time)
    forward, backward, grad_decay, grad_drive = exported.call(decay, drive, cotangent)
    gf_a, gf_b = numpy_loop_gradient(decay64, drive64, cotangent64)
    gb_a, gb_b = numpy_loop_gradient(decay64, drive64, 0.5 * cotangent64, reverse=True)
    assert _relative_error(forward, numpy_loop(decay64, drive64)) < 1e-5, time
    assert _relative_error(backward, numpy_loop(decay64, drive64, True)) < 1e-5, time
    assert _relative_error(grad_decay, gf_a + gb_a) < 1e-5, time
    assert _relative_error(grad_drive, gf_b + gb_b) < 1e-5, time
