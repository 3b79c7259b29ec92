"""The linear recurrence h_t = a_t * h_{t-1} + b_t, one name, five kernels (docs/model.md).

`linear_recurrence(decay, drive, implementation=...)` and `bidirectional_recurrence` compute the
same values with one of:

- ``"associative"``: `jax.lax.associative_scan` over time (log-depth, O(T log T) work);
- ``"chunked"``: chunks of C frames solved in parallel from cumulative log-decays (a masked
  (C, C) decay matrix per chunk and channel, as in Mamba-2's SSD "segsum"), then a short scan of
  the chunk states across chunks and a per-frame fix-up;
- ``"sequential"``: a `jax.lax.fori_loop` over time (T steps of O(channels) work, updating the
  output in place, unrolled by `unroll`); bidirectional calls run both directions in one loop;
- ``"doubling"``: recursive doubling (Hillis-Steele) in two levels: n rounds within chunks of
  2^n frames (`DOUBLING_STATIC_ROUNDS`), round k combining every frame with the partial result
  2^k frames earlier (O(T n) work, static shifts only: no interior padding, no scatter); then
  rounds over the chunk states only (at a symbolic length, jax.export, a `lax.while_loop`
  until the shift reaches the chunk count) and one multiply-add to carry each chunk's incoming
  state; one graph is exact at any length, and computes what the jitted model does. onnxruntime
  runs a `Loop` of log2(T / 2^n) iterations on arrays 2^n times smaller than the frames,
  instead of the sequential kernel's T iterations (the export kernel until 2026-12-06);
- ``"two_pass"``: the frames cut into T / C chunks of C frames and swept C times, all chunks
  at once (a `lax.scan` over the frame position within the chunk): a first sweep carries each
  chunk's end state and decay product from a zero state, the chunk states are combined across
  chunks (doubling rounds on T / C states), and a second sweep reruns every chunk from its
  incoming state, writing the states. 2C loop steps on (T / C)-frame slices instead of T steps
  on one frame. It is the kernel of the exported graphs
  (press_jax/export/forward.py): exact at a symbolic length; alone, 1.3x (32 channels) to 2x
  (256) faster than the doubling kernel in onnxruntime, 2-3x in XLA (docs/export.md);
- ``"auto"``: the one measured fastest on the platform (`AUTO_BY_PLATFORM`).

Each has the same written-out gradient (`jax.custom_vjp`): the adjoint of a linear recurrence
is the same recurrence run backwards in time with the decays shifted by one frame,
lambda_t = g_t + a_{t+1} lambda_{t+1}; then dL/db_t = lambda_t and dL/da_t = lambda_t h_{t-1}.
So the backward pass costs one more recurrence of the same kind, never autodiff through the
scan's internals.

Shapes: (..., time, channels); time is axis -2.

Precision: every kernel runs in at least float32. Inputs in a narrower dtype (bfloat16,
float16) are upcast before the kernel and the states rounded back to the input dtype once at the
end, so the state is never carried from frame to frame in the narrow dtype (over hundreds of
frames that would accumulate one rounding per frame); gradients come back in the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

RECURRENCE_IMPLEMENTATIONS = ("associative", "chunked", "sequential", "doubling", "two_pass")
# Measured with `python -m experiments.bench_step --recurrence` (README, "Speed"). On CPU the
# sequential scan wins at every shape measured (demo and S). Accelerators were not measured by
# this project yet: the chunked form is the one built for them (large parallel operations).
AUTO_BY_PLATFORM = {"cpu": "sequential", "gpu": "chunked", "cuda": "chunked",
                    "rocm": "chunked", "tpu": "chunked"}
DEFAULT_CHUNK = 16
# Frames per loop iteration of the sequential kernel. 1 since session 19: forward+backward at
# S's training shape (2, 8003, 256) 29.0 ms against 38.5 with 2 and 43.1 with 4 (best of 10,
# interleaved); the demo's (16, 203, 32) 0.52 against 0.58 and 0.81; S's forward on 5 s of
# audio 1.38 s against 1.58 s (README, "The linear recurrence").
DEFAULT_UNROLL = 1
# The doubling kernel at a symbolic length works in chunks of 2^n frames: n static rounds
# within chunks, a loop across them. n = 6 measured best of 4 to 8 in onnxruntime on the demo's
# exported graphs (1, 4 and 10 s; docs/export.md, "Speed").
DOUBLING_STATIC_ROUNDS = 6
_LOG_DECAY_FLOOR = -69.0  # log(1e-30): a zero decay (a reset) leaks at most 1e-30 of the state.


def resolve_implementation(implementation: str, platform: str | None = None) -> str:
  """The concrete kernel name for `implementation` ('auto' resolved for `platform`)."""
  if implementation == "auto":
    platform = platform or jax.default_backend()
    return AUTO_BY_PLATFORM.get(platform, "associative")
  if implementation not in RECURRENCE_IMPLEMENTATIONS:
    raise ValueError(f"recurrence implementation must be 'auto' or one of "
                     f"{RECURRENCE_IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


# --- the three forward kernels: (decay, drive, reverse) -> state, time on axis -2 ------------
def _associative(decay, drive, reverse):
  def combine(earlier, later):
    decay_earlier, drive_earlier = earlier
    decay_later, drive_later = later
    return decay_earlier * decay_later, decay_later * drive_earlier + drive_later

  _, state = jax.lax.associative_scan(combine, (decay, drive), axis=decay.ndim - 2,
                                      reverse=reverse)
  return state


def _time_slice(x, t):
  return jax.lax.dynamic_index_in_dim(x, t, axis=x.ndim - 2, keepdims=False)


def _time_update(x, value, t):
  return jax.lax.dynamic_update_index_in_dim(x, value, t, axis=x.ndim - 2)


def _sequential(decay, drive, reverse, unroll=DEFAULT_UNROLL):
  """One frame per loop step, in place in the (..., time, channels) layout (no transposes)."""
  time = decay.shape[-2]

  def body(i, carry):
    state, states = carry
    t = time - 1 - i if reverse else i
    state = _time_slice(decay, t) * state + _time_slice(drive, t)
    return state, _time_update(states, state, t)

  initial = (jnp.zeros_like(_time_slice(drive, 0)), jnp.zeros_like(drive))
  return jax.lax.fori_loop(0, time, body, initial, unroll=unroll)[1]


def _loop_unroll(time, unroll):
  """fori_loop unrolls only loops of a static length; a symbolic one (jax.export) runs rolled."""
  return unroll if isinstance(time, (int, np.integer)) else 1


def _bidirectional_sequential_loops(decay, drive, unroll):
  """Both directions in one loop: frame i forwards and frame T-1-i backwards per step."""
  time = decay.shape[-2]

  def body(i, carry):
    forward, backward, forwards, backwards = carry
    j = time - 1 - i
    forward = _time_slice(decay, i) * forward + _time_slice(drive, i)
    backward = _time_slice(decay, j) * backward + _time_slice(drive, j)
    return forward, backward, _time_update(forwards, forward, i), _time_update(backwards,
                                                                               backward, j)

  zero = jnp.zeros_like(_time_slice(drive, 0))
  initial = (zero, zero, jnp.zeros_like(drive), jnp.zeros_like(drive))
  _, _, forwards, backwards = jax.lax.fori_loop(0, time, body, initial,
                                                unroll=_loop_unroll(time, unroll))
  return forwards, backwards


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bidirectional_sequential(decay, drive, unroll):
  return _bidirectional_sequential_loops(decay, drive, unroll)


def _bidirectional_sequential_fwd(decay, drive, unroll):
  forwards, backwards = _bidirectional_sequential_loops(decay, drive, unroll)
  return (forwards, backwards), (decay, forwards, backwards)


def _bidirectional_sequential_bwd(unroll, residuals, cotangents):
  """The two adjoints, lambda_t = g_t + a_{t+1} lambda_{t+1} (forward direction) and
  lambda_t = g_t + a_{t-1} lambda_{t-1} (backward direction), again in one loop."""
  decay, forwards, backwards = residuals
  forward_cotangent, backward_cotangent = cotangents
  time = decay.shape[-2]

  def body(i, carry):
    forward_carry, backward_carry, forward_adjoints, backward_adjoints = carry
    t = time - 1 - i
    forward_adjoint = _time_slice(forward_cotangent, t) + forward_carry
    backward_adjoint = _time_slice(backward_cotangent, i) + backward_carry
    return (_time_slice(decay, t) * forward_adjoint, _time_slice(decay, i) * backward_adjoint,
            _time_update(forward_adjoints, forward_adjoint, t),
            _time_update(backward_adjoints, backward_adjoint, i))

  zero = jnp.zeros_like(_time_slice(decay, 0))
  initial = (zero, zero, jnp.zeros_like(decay), jnp.zeros_like(decay))
  _, _, forward_adjoints, backward_adjoints = jax.lax.fori_loop(
      0, time, body, initial, unroll=_loop_unroll(time, unroll))
  grad_decay = (forward_adjoints * _shift_later(forwards)
                + backward_adjoints * _shift_earlier(backwards))
  return grad_decay, forward_adjoints + backward_adjoints


_bidirectional_sequential.defvjp(_bidirectional_sequential_fwd, _bidirectional_sequential_bwd)


def _segment_log_decay(log_decay):
  """(..., C, H) log-decays -> (..., C_t, C_s, H): sum_{s<r<=t} log a_r for s <= t, else -inf.

  Built by a cumulative sum over t of a strictly-lower-triangular mask of the terms, so each
  entry adds only its own terms (no difference of two long cumulative sums, no cancellation).
  """
  chunk = log_decay.shape[-2]
  terms = jnp.broadcast_to(log_decay[..., :, None, :], log_decay.shape[:-2] + (chunk, chunk)
                           + log_decay.shape[-1:])
  strictly_lower = jnp.tril(jnp.ones((chunk, chunk), bool), -1)[:, :, None]
  sums = jnp.cumsum(jnp.where(strictly_lower, terms, 0.0), axis=-3)
  lower = jnp.tril(jnp.ones((chunk, chunk), bool))[:, :, None]
  return jnp.where(lower, sums, -jnp.inf)


def _chunked(decay, drive, reverse, chunk=DEFAULT_CHUNK):
  if reverse:
    flip = functools.partial(jnp.flip, axis=-2)
    return flip(_chunked(flip(decay), flip(drive), False, chunk))
  *lead, time, channels = decay.shape
  chunk = max(1, min(chunk, time))
  count = -(-time // chunk)
  pad = count * chunk - time
  if pad:  # Trailing frames of a forward recurrence never reach earlier ones.
    widths = [(0, 0)] * len(lead) + [(0, pad), (0, 0)]
    decay = jnp.pad(decay, widths, constant_values=1.0)
    drive = jnp.pad(drive, widths)
  shape = (*lead, count, chunk, channels)
  log_decay = jnp.maximum(jnp.log(decay.reshape(shape)), _LOG_DECAY_FLOOR)
  drive = drive.reshape(shape)
  # Within each chunk, from a zero state: local_t = sum_{s<=t} exp(segsum[t, s]) b_s.
  weights = jnp.exp(_segment_log_decay(log_decay))  # (..., count, C_t, C_s, H)
  local = jnp.einsum("...tsh,...sh->...th", weights, drive)
  # Decay from the chunk's start to each frame (inclusive) and over the whole chunk.
  from_start = jnp.exp(jnp.cumsum(log_decay, axis=-2))  # (..., count, C, H)
  # Across chunks: end_k = total_k * end_{k-1} + local_end_k, a scan of `count` steps.
  ends = _associative(from_start[..., -1, :], local[..., -1, :], False)  # (..., count, H)
  starts = jnp.concatenate([jnp.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], axis=-2)
  state = local + from_start * starts[..., None, :]
  return state.reshape(*lead, count * chunk, channels)[..., :time, :]


def _shift_by(x, shift, fill):
  """x_{t-shift} at t along axis -2, `fill` where t < shift; the same length (any, symbolic).

  A static shift is one pad with a negative high width (kept length, constant widths, which
  ONNX `Pad` takes); a traced one (the doubling loop over chunk states at a symbolic length) is
  a dynamic slice of `fill` frames followed by x.
  """
  axis = x.ndim - 2
  if isinstance(shift, (int, np.integer)):
    widths = [(0, 0, 0)] * axis + [(int(shift), -int(shift), 0), (0, 0, 0)]
    return jax.lax.pad(x, jnp.asarray(fill, x.dtype), widths)
  time = x.shape[axis]
  # `x * 0 + fill`, not `full_like`: jax2onnx cannot broadcast to a symbolic shape made inside
  # a loop ("no origin recorded for symbolic dim"); x is finite here (decays and states).
  padded = jnp.concatenate([x * 0.0 + fill, x], axis=axis)
  return jax.lax.dynamic_slice_in_dim(padded, time - shift, time, axis=axis)


def _doubling_round(decay, drive, shift):
  """One round: (a, b) of the span ending at t combined with the span ending at t - shift."""
  drive = decay * _shift_by(drive, shift, 0.0) + drive
  decay = decay * _shift_by(decay, shift, 1.0)
  return decay, drive


def _doubling(decay, drive, reverse):
  if reverse:
    flip = functools.partial(jnp.flip, axis=-2)
    return flip(_doubling(flip(decay), flip(drive), False))
  # Two levels, at a static or a symbolic length alike (so an exported graph computes what the
  # jitted model does, operation for operation): the frames padded to chunks of 2^n (n static
  # rounds, static shifts: cheap pads) and scanned within each chunk; across chunks, rounds over
  # the chunk states only (a `while_loop` until the shift reaches the chunk count when that
  # count is symbolic), then one multiply-add carries each chunk's incoming state through it.
  time = decay.shape[-2]
  chunk = 1 << DOUBLING_STATIC_ROUNDS
  *lead, _, channels = decay.shape
  count = (time + chunk - 1) // chunk
  # Padded by a whole chunk, then cut to count * chunk frames (a static pad and a slice: the
  # converters take these with symbolic lengths; trailing frames of a forward recurrence never
  # reach earlier ones).
  widths = [(0, 0, 0)] * len(lead) + [(0, chunk, 0), (0, 0, 0)]
  decay = jax.lax.pad(decay, jnp.asarray(1.0, decay.dtype), widths)[..., :count * chunk, :]
  drive = jax.lax.pad(drive, jnp.asarray(0.0, drive.dtype), widths)[..., :count * chunk, :]
  decay = decay.reshape(*lead, count, chunk, channels)
  drive = drive.reshape(*lead, count, chunk, channels)
  for round_index in range(DOUBLING_STATIC_ROUNDS):
    decay, drive = _doubling_round(decay, drive, 1 << round_index)

  chunk_decay, ends = decay[..., -1, :], drive[..., -1, :]  # (..., count, channels)
  if isinstance(count, (int, np.integer)):
    shift = 1
    while shift < count:
      chunk_decay, ends = _doubling_round(chunk_decay, ends, shift)
      shift *= 2
  else:
    def body(carry):
      chunk_decay, ends, shift = carry
      return (*_doubling_round(chunk_decay, ends, shift), 2 * shift)

    _, ends, _ = jax.lax.while_loop(lambda carry: carry[2] < count, body,
                                    (chunk_decay, ends, jnp.int32(1)))
  starts = _shift_by(ends, 1, 0.0)  # The state entering each chunk.
  states = drive + decay * starts[..., None, :]
  return states.reshape(*lead, count * chunk, channels)[..., :time, :]


def _two_pass(decay, drive, reverse, chunk=DEFAULT_CHUNK):
  """The frames in chunks of `chunk`, swept twice, every chunk at once (module docstring).

  Exact at a static or a symbolic length: the frames are padded by one chunk (decay 1, drive
  0: frames after the end never reach earlier ones) and cut to count * chunk.
  """
  if reverse:
    flip = functools.partial(jnp.flip, axis=-2)
    return flip(_two_pass(flip(decay), flip(drive), False, chunk))
  *lead, time, channels = decay.shape
  chunk = int(chunk)
  count = (time + chunk - 1) // chunk
  widths = [(0, 0, 0)] * len(lead) + [(0, chunk, 0), (0, 0, 0)]

  def by_position(x, fill):  # (..., time, H) -> (chunk, ..., count, H)
    x = jax.lax.pad(x, jnp.asarray(fill, x.dtype), widths)[..., :count * chunk, :]
    return jnp.moveaxis(x.reshape(*lead, count, chunk, channels), len(lead) + 1, 0)

  frames = (by_position(decay, 1.0), by_position(drive, 0.0))
  zero = frames[1][0] * 0.0  # (..., count, H), built from an input (symbolic shapes, ONNX).

  def sweep_from_zero(carry, frame):
    (state, product), (a, b) = carry, frame
    return (a * state + b, a * product), None

  (ends, products), _ = jax.lax.scan(sweep_from_zero, (zero, zero + 1.0), frames)
  # Each chunk maps its incoming state h to products * h + ends; combined in order (the doubling
  # kernel over the count chunk states), then shifted: the state entering each chunk.
  incoming = _shift_by(_doubling(products, ends, False), 1, 0.0)

  def sweep_from_incoming(state, frame):
    a, b = frame
    state = a * state + b
    return state, state

  _, states = jax.lax.scan(sweep_from_incoming, incoming, frames)
  states = jnp.moveaxis(states, 0, len(lead) + 1)
  return states.reshape(*lead, count * chunk, channels)[..., :time, :]


# --- the shared written-out gradient --------------------------------------------------------
def _shift_earlier(x):
  """x_{t+1} at t (zero at the end), along axis -2."""
  return jnp.concatenate([x[..., 1:, :], jnp.zeros_like(x[..., :1, :])], axis=-2)


def _shift_later(x):
  """x_{t-1} at t (zero at the start), along axis -2."""
  return jnp.concatenate([jnp.zeros_like(x[..., :1, :]), x[..., :-1, :]], axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _recurrence(decay, drive, kernel, reverse):
  return kernel(decay, drive, reverse)


def _recurrence_fwd(decay, drive, kernel, reverse):
  state = kernel(decay, drive, reverse)
  return state, (decay, state)


def _recurrence_bwd(kernel, reverse, residuals, state_cotangent):
  decay, state = residuals
  if reverse:  # h_t = a_t h_{t+1} + b_t: the adjoint runs forward with a_{t-1}.
    adjoint = kernel(_shift_later(decay), state_cotangent, False)
    return adjoint * _shift_earlier(state), adjoint
  adjoint = kernel(_shift_earlier(decay), state_cotangent, True)
  return adjoint * _shift_later(state), adjoint


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


@functools.lru_cache(maxsize=None)
def _kernel(implementation: str, chunk: int, unroll: int):
  if implementation == "associative":
    return _associative
  if implementation == "chunked":
    return functools.partial(_chunked, chunk=chunk)
  if implementation == "doubling":
    return _doubling
  if implementation == "two_pass":
    return functools.partial(_two_pass, chunk=chunk)
  return functools.partial(_sequential, unroll=unroll)


def linear_recurrence(
    decay: Float[Array, "... time channels"],
    drive: Float[Array, "... time channels"],
    reverse: bool = False,
    implementation: str = "associative",
    chunk: int = DEFAULT_CHUNK,
    unroll: int = DEFAULT_UNROLL,
) -> Float[Array, "... time channels"]:
  """h_t = decay_t * h_{t-1} + drive_t from h = 0 (reverse: from the end, with h_{t+1}).

  `implementation` names the kernel (module docstring); `chunk` is C of the chunked and the
  two-pass forms and `unroll` the unroll factor of the sequential one. Values agree across kernels to float
  rounding; the gradient is the written-out adjoint in every case.
  """
  name = resolve_implementation(implementation)
  (decay, drive), dtype = _at_least_float32(decay, drive)
  states = _recurrence(decay, drive, _kernel(name, int(chunk), int(unroll)), bool(reverse))
  return states.astype(dtype)


def _at_least_float32(decay, drive):
  """(decay, drive) in their common dtype promoted to >= float32, and that common dtype."""
  dtype = jnp.result_type(decay, drive)
  compute = jnp.promote_types(dtype, jnp.float32)
  return (jnp.asarray(decay, compute), jnp.asarray(drive, compute)), dtype


def bidirectional_recurrence(
    decay: Float[Array, "... time channels"],
    drive: Float[Array, "... time channels"],
    implementation: str = "associative",
    chunk: int = DEFAULT_CHUNK,
    unroll: int = DEFAULT_UNROLL,
) -> tuple[Float[Array, "... time channels"], Float[Array, "... time channels"]]:
  """(forward, backward) recurrences of the same inputs.

  The sequential kernel runs both directions in one loop (and both adjoints in one loop);
  the others run one recurrence over the two directions stacked, the second flipped.
  """
  if resolve_implementation(implementation) == "sequential":
    (decay, drive), dtype = _at_least_float32(decay, drive)
    forward, backward = _bidirectional_sequential(decay, drive, int(unroll))
    return forward.astype(dtype), backward.astype(dtype)
  flip = functools.partial(jnp.flip, axis=-2)
  both = linear_recurrence(jnp.stack([decay, flip(decay)]), jnp.stack([drive, flip(drive)]),
                           implementation=implementation, chunk=chunk, unroll=unroll)
  return both[0], flip(both[1])


# --- the two-pass kernel in the chunk-position layout (the mixer's, with 'two_pass') ---------
# The two-pass kernel sweeps the position within a chunk, all chunks at once, so it needs the
# frames as (chunk position, ..., chunk, channels). `bidirectional_recurrence` rearranges its
# (..., time, H) decays and drives into that layout and back on every call: with the flip and
# the stack of the two directions, about ten whole-array copies of H-wide arrays per mixer.
# `LinearRNNMixer` with 'two_pass' instead rearranges its D-wide input once
# (`to_chunk_positions`), runs its projections, gates, this recurrence and its output projection
# in that layout (all but the recurrence act frame by frame), and rearranges the D-wide output
# back (`from_chunk_positions`). Values equal `bidirectional_recurrence` to float rounding.
# Measured with S's mixer shapes (2, 20003, 64), H = 256, one process, interleaved medians
# (session 22): onnxruntime 206 -> 164 ms (JAX's sequential mixer: 175), XLA 258 -> 219 ms.
def to_chunk_positions(x: Float[Array, "... time width"], chunk: int
                       ) -> Float[Array, "chunk ... count width"]:
  """(..., time, W) -> (chunk, ..., count, W): frame c * chunk + j at [j, ..., c], count =
  ceil(time / chunk), the frames after the end zero. At a static or a symbolic length (a static
  pad by one chunk, then a cut to count * chunk frames: what the converters take)."""
  *lead, time, width = x.shape
  chunk = int(chunk)
  count = (time + chunk - 1) // chunk
  widths = [(0, 0, 0)] * len(lead) + [(0, chunk, 0), (0, 0, 0)]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), widths)[..., :count * chunk, :]
  return jnp.moveaxis(x.reshape(*lead, count, chunk, width), len(lead) + 1, 0)


def from_chunk_positions(y: Float[Array, "chunk ... count width"], time
                         ) -> Float[Array, "... time width"]:
  """The inverse of `to_chunk_positions`: (chunk, ..., count, W) -> (..., time, W)."""
  chunk, *lead, count, width = y.shape
  y = jnp.moveaxis(y, 0, len(lead) + 1).reshape(*lead, count * chunk, width)
  return y[..., :time, :]


def _positions_shift_later(x):
  """x_{t-1} at t (zero at t = 0) in the chunk-position layout."""
  carried = jax.lax.pad(x[-1:], jnp.zeros((), x.dtype),
                        [(0, 0, 0)] * (x.ndim - 2) + [(1, -1, 0), (0, 0, 0)])
  return jnp.concatenate([carried, x[:-1]], axis=0)


def _positions_shift_earlier(x):
  """x_{t+1} at t (zero after the last frame) in the chunk-position layout."""
  carried = jax.lax.pad(x[:1], jnp.zeros((), x.dtype),
                        [(0, 0, 0)] * (x.ndim - 2) + [(-1, 1, 0), (0, 0, 0)])
  return jnp.concatenate([x[1:], carried], axis=0)


def _positions_two_pass(decay_forward, drive_forward, decay_backward, drive_backward):
  """The forward recurrence of the first pair and the time-reversed one of the second, every
  array (chunk, ..., count, H): each direction's two sweeps over the chunk positions (the
  second direction's positions reversed), the chunk states of both combined in one doubling
  call. The directions are swept apart, not stacked into one array: stacking copied both
  inputs and both outputs once more (S's mixer on 10 s in onnxruntime: 198.5 against 171.7 ms,
  medians of 11)."""
  decay_backward, drive_backward = jnp.flip(decay_backward, 0), jnp.flip(drive_backward, 0)
  zero = drive_forward[0] * 0.0  # (..., count, H), built from an input (symbolic shapes, ONNX).

  def sweep_from_zero(carry, frame):
    (state, product), (a, b) = carry, frame
    return (a * state + b, a * product), None

  def sweep_from_incoming(state, frame):
    a, b = frame
    state = a * state + b
    return state, state

  (forward_ends, forward_products), _ = jax.lax.scan(
      sweep_from_zero, (zero, zero + 1.0), (decay_forward, drive_forward))
  (backward_ends, backward_products), _ = jax.lax.scan(
      sweep_from_zero, (zero, zero + 1.0), (decay_backward, drive_backward))
  # Each chunk maps its incoming state h to products * h + ends; combined over the chunks in
  # each direction's order (the second's chunks reversed, so one doubling call, one loop, does
  # both: small arrays), then shifted by one chunk: the state entering each chunk.
  def in_order(forward, backward):
    return jnp.stack([forward, jnp.flip(backward, -2)])

  incoming = _shift_by(_doubling(in_order(forward_products, backward_products),
                                 in_order(forward_ends, backward_ends), False), 1, 0.0)
  _, forward = jax.lax.scan(sweep_from_incoming, incoming[0], (decay_forward, drive_forward))
  _, backward = jax.lax.scan(sweep_from_incoming, jnp.flip(incoming[1], -2),
                             (decay_backward, drive_backward))
  return forward, jnp.flip(backward, 0)


@jax.custom_vjp
def bidirectional_by_chunk_position(
    decay: Float[Array, "chunk ... count channels"],
    drive: Float[Array, "chunk ... count channels"],
) -> tuple[Float[Array, "chunk ... count channels"], Float[Array, "chunk ... count channels"]]:
  """(forward, backward) recurrences of float32 (decay, drive) in the chunk-position layout of
  `to_chunk_positions` (the two-pass kernel without rearranging; frames after the end must
  reset: decay = drive = 0, as the mixer's masked frames do). The gradient is written out as
  the other kernels' (module docstring): the adjoint of each direction is the other direction's
  recurrence of the cotangents with the decays shifted by one frame, so the backward pass is
  one more call of the same sweeps."""
  return _positions_two_pass(decay, drive, decay, drive)


def _by_position_fwd(decay, drive):
  forward, backward = _positions_two_pass(decay, drive, decay, drive)
  return (forward, backward), (decay, forward, backward)


def _by_position_bwd(residuals, cotangents):
  decay, forward, backward = residuals
  forward_cotangent, backward_cotangent = cotangents
  # Forward direction: lambda_t = g_t + a_{t+1} lambda_{t+1}, a time-reversed recurrence;
  # backward direction: lambda_t = g_t + a_{t-1} lambda_{t-1}, a forward one.
  backward_adjoint, forward_adjoint = _positions_two_pass(
      _positions_shift_later(decay), backward_cotangent,
      _positions_shift_earlier(decay), forward_cotangent)
  decay_gradient = (forward_adjoint * _positions_shift_later(forward)
                    + backward_adjoint * _positions_shift_earlier(backward))
  return decay_gradient, forward_adjoint + backward_adjoint


bidirectional_by_chunk_position.defvjp(_by_position_fwd, _by_position_bwd)
