"""One experiment config's training step on one device: time, XLA FLOPs, and where the time goes.

Run:
  python -m experiments.bench_step                       # the demo's step (tiny, batch 8 x 1 s)
  python -m experiments.bench_step --config tiny --config.data.crop_seconds=0.25 --json
  python -m experiments.bench_step --no-parts --profile  # thread time per module, inside the step
  python -m experiments.bench_step --recurrence          # the recurrence's implementations
  python -m experiments.bench_step --recurrence --json --shape 8,4003,32

Step mode. The config is `--config` (a config file or name) with its `--config.a.b=value`
overrides, resolved as `experiments.main` resolves them. The step is
`press_jax.train_step.train_step(axis_name=None)` under `jax.jit` (state donated, as the
trainer does), with the model `PressNet(config.train.model_config(), remat=config.train.remat)`,
`config.train.loss_config()` and `press_jax.optim.make_optimizer(config.train.optimizer)`, on
one device's batch: `config.train.batch_size_per_device` crops of `config.data.crop_seconds` at
the model's sample rate. The input is random but speech-like: per utterance, two Gaussian
sources with random amplitude envelopes (log-normal at 50 ms control points, random level),
summed. It prints
  step_s           median wall time of the compiled, warm step (block_until_ready, --repeats);
  gflop_per_step   XLA cost analysis of the same step compiled with PressNet(scan_unroll=True)
                   (never run): XLA counts a while-loop body once, so the scanned step would be
                   undercounted. Where every scan has length 1 (tiny: one encoder block, one
                   stage group) the step as compiled is counted instead: unrolling changes
                   nothing. The recurrence kernels 'associative', 'chunked' and 'doubling' (at a
                   static length) have no loops ('two_pass' has two over one chunk's frames,
                   counted once: not used in training);
                   where the model runs the 'sequential' one (a fori_loop over frames, whose
                   body XLA counts once) its missing iterations are added analytically: 2 flops
                   (multiply, add) per element and frame per pass, 2 passes per call (the
                   recurrence and its adjoint; 3 with remat). `flops_method` says what was done;
  achieved_gflops  gflop_per_step / step_s;
  matmul_gflops    a 2048 x 2048 float32 matmul measured in the same run (best of 5, 2 n^3 flops);
  ratio            achieved_gflops / matmul_gflops;
  parts            per part of the network, each jitted alone at the step's real shapes with its
                   own parameters (module.init): {"calls", "forward_ms", "forward_backward_ms"}
                   per call (medians; forward+backward = a VJP with a fixed random cotangent, to
                   the parameters and to the inputs the step differentiates: every activation,
                   not the mixture), "step_forward_ms" / "step_forward_backward_ms"
                   = calls x per call, and "instances" where a part runs at several shapes
                   (encoder blocks on batch streams, decoder blocks on batch x speakers streams).
                   Parts: encoder (framing, conv, norm, projection), speaker_split, rnn_mixers
                   (whole LinearRNNMixer incl. projections), recurrence (bidirectional_recurrence
                   alone; inside rnn_mixers, so not added to the sum), feed_forwards
                   (GatedFeedForward of recurrent and attention blocks), speaker_attention
                   (SpeakerAttention), waveform_heads (incl. overlap-add), variance_heads,
                   loss_pit (likelihoods.press_loss on given outputs, gradient to the outputs),
                   optimizer_update (optimizer.update + apply_updates; no backward: both times
                   are the update's). The table ends with the sum of the parts' per-step
                   forward+backward times against the step; the rest ("other / overhead") is the
                   RMSNorms and LayerScale residuals, input scaling, metrics, the finiteness
                   guard, and what fusion across parts saves or costs.
  --json prints exactly one JSON object with those keys plus `config` (the experiment's name),
  `recurrence` (the kernel the model runs: PressConfig.recurrence, 'auto' resolved for the
  platform), `recurrence_setting`, `shape`, `sets`, `flops_method`, `parts_sum_ms`, `other_ms`.

Recurrence mode (--recurrence). Times `press_jax.models.recurrence.bidirectional_recurrence(
decay, drive, implementation=NAME, chunk=the config's recurrence_chunk)` for every NAME in
`RECURRENCE_IMPLEMENTATIONS`: the forward pass and the forward+backward
pass (gradient of the sum of the outputs times a fixed random cotangent, to both decay and
drive), medians over 10 interleaved rounds of --repeats warm calls of every NAME (sub-ms calls swing 2-3x between blocks of calls). The shape (streams, frames, hidden) is the config's
decoder recurrence, (batch x speakers, frames, rnn_hidden), e.g. (8, 4003, 32) for the tiny
preset on the demo's batch at stride 4 and (8, 2001, 32) for the demo's stride 8, or --shape B,T,H. --json prints one JSON
object {NAME: {"forward_ms", "forward_backward_ms"}, ...}; the matmul reference goes to stderr.

Expected (measured 2026-12-01 on this project's 2-core CPU while another benchmark shared it,
so +-30 %; about 1 min):
the demo's step 0.46-0.52 s with the 'sequential' recurrence ('auto' on CPU), 10.03 GFLOP/step,
~20 GFLOP/s, matmul ~200 GFLOP/s (ratio ~0.1); rnn_mixers ~43 % of the step (the recurrence
alone ~18 %), feed_forwards ~27 %, waveform_heads and speaker_attention ~12 % each, loss and
optimiser < 1 %; the parts added up to 89-106 % of the step in three runs (run alone, each
pays its own dispatch and fusion boundaries, so "other" can come out negative). --recurrence
at the demo's (8, 4003, 32): forward+backward ~48 ms sequential, ~84 ms associative, ~460 ms
chunked (C = 16).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import configs
from press_jax import allocator, likelihoods, optim
from press_jax import train_step as step_lib
from press_jax.models import layers, press_net
from press_jax.models import recurrence as recurrence_lib
from press_jax.types import ExitOutputs

PART_NAMES = ("encoder", "speaker_split", "rnn_mixers", "recurrence", "feed_forwards",
              "speaker_attention", "waveform_heads", "variance_heads", "loss_pit",
              "optimizer_update")
# Parts contained in another part (not added to the sum of parts).
NESTED_PARTS = {"recurrence": "rnn_mixers"}
RESULT_KEYS = ("step_s", "gflop_per_step", "achieved_gflops", "matmul_gflops", "ratio", "parts",
               "config", "recurrence")
MATMUL_SIZE = 2048


def log(message: str) -> None:
  print(f"[bench_step] {message}", file=sys.stderr, flush=True)


# --- recurrence implementations -----------------------------------------------------------------
def recurrence_implementations() -> tuple[str, ...]:
  return tuple(recurrence_lib.RECURRENCE_IMPLEMENTATIONS)


def recurrence_function(name: str | None, chunk: int | None = None) -> Callable:
  """bidirectional_recurrence with `implementation=name` (and `chunk=` when given)."""
  keywords = {key: value for key, value in (("implementation", name), ("chunk", chunk))
              if value is not None}
  return functools.partial(recurrence_lib.bidirectional_recurrence, **keywords)


def model_recurrence(model_config) -> tuple[str, str]:
  """(the kernel the model's recurrence runs, the config's setting, e.g. 'auto')."""
  setting = model_config.recurrence
  return recurrence_lib.resolve_implementation(setting), setting


def _module(cls, model_config, **arguments):
  """cls(**arguments) plus any of its fields that the PressConfig also has (e.g. a recurrence
  implementation, should the model pass one down), so parts are built as the model builds them."""
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - set(arguments)
  shared = {name: getattr(model_config, name) for name in fields
            if name != "dtype" and hasattr(model_config, name)}
  return cls(**arguments, **shared)


# --- timing ---------------------------------------------------------------------------------------
def median_seconds(function: Callable, *args, repeats: int) -> float:
  """Median wall time of `repeats` calls after one warm-up call (each to completion)."""
  jax.block_until_ready(function(*args))
  times = []
  for _ in range(max(repeats, 1)):
    started = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def matmul_gflops(size: int = MATMUL_SIZE, tries: int = 5) -> float:
  """GFLOP/s of a size x size float32 matmul (2 size^3 flops), best of `tries` warm calls."""
  keys = jax.random.split(jax.random.key(1))
  a = jax.random.normal(keys[0], (size, size), jnp.float32)
  b = jax.random.normal(keys[1], (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(tries):
    started = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - started)
  return 2.0 * size ** 3 / best / 1e9


def xla_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def _random_like(key, tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree_util.tree_unflatten(treedef, [
      jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


def time_part(apply: Callable, params, differentiable: tuple, fixed: tuple = (), *,
              repeats: int, seed: int = 0) -> tuple[float, float]:
  """(forward s, forward+backward s) of `apply(params, *differentiable, *fixed)`, jitted.

  Forward+backward is a VJP of the output with a fixed random cotangent to `params` and the
  `differentiable` inputs.
  """
  forward = jax.jit(apply)
  output = jax.eval_shape(apply, params, *differentiable, *fixed)
  cotangent = _random_like(jax.random.key(seed + 7), output)

  def backward(params, differentiable, fixed, cotangent):
    _, vjp = jax.vjp(lambda p, d: apply(p, *d, *fixed), params, differentiable)
    return vjp(cotangent)

  forward_backward = jax.jit(backward)
  forward_s = median_seconds(forward, params, *differentiable, *fixed, repeats=repeats)
  forward_backward_s = median_seconds(forward_backward, params, differentiable, fixed, cotangent,
                                      repeats=repeats)
  return forward_s, forward_backward_s


def time_module(module, inputs: tuple, fixed: tuple = (), static: tuple = (), *,
                repeats: int, seed: int = 0) -> tuple[float, float]:
  """time_part of a Flax module with its own freshly initialised parameters.

  `inputs` are differentiated, `fixed` arrays are not, `static` values are Python constants.
  """
  variables = jax.jit(lambda key, *a: module.init(key, *a, *static))(
      jax.random.key(seed), *inputs, *fixed)

  def apply(params, *arrays):
    return module.apply({"params": params}, *arrays, *static)

  return time_part(apply, variables["params"], tuple(inputs), tuple(fixed), repeats=repeats,
                   seed=seed)


# --- the input ------------------------------------------------------------------------------------
def speech_like_batch(batch: int, speakers: int, samples: int, sample_rate: int,
                      seed: int = 0) -> dict[str, np.ndarray]:
  """{'mixture', 'sources', 'mask'}: Gaussian sources under random amplitude envelopes, summed.

  Each source's envelope is exp of standard normals at 50 ms control points, linearly
  interpolated (syllable-rate loudness changes with near-pauses); each source gets a random
  level within +-5 dB around an RMS of 0.1.
  """
  rng = np.random.default_rng(seed)
  hop = max(sample_rate // 20, 1)
  points = samples // hop + 2
  control = np.exp(1.2 * rng.standard_normal((batch, speakers, points)))
  envelope = np.stack([[np.interp(np.arange(samples), np.arange(points) * hop, c)
                        for c in row] for row in control])
  sources = rng.standard_normal((batch, speakers, samples)) * envelope
  sources /= np.sqrt(np.mean(sources ** 2, axis=-1, keepdims=True)) + 1e-12
  level = 0.1 * 10.0 ** (rng.uniform(-5.0, 5.0, (batch, speakers, 1)) / 20.0)
  sources = (sources * level).astype(np.float32)
  return {"mixture": sources.sum(1), "sources": sources,
          "mask": np.ones((batch, samples), np.float32)}


# --- the setup ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  experiment: Any
  model_config: Any
  model: press_net.PressNet
  loss_config: Any
  optimizer: optax.GradientTransformation
  batch: int
  samples: int

  @property
  def frames(self) -> int:
    c = self.model_config
    return press_net.num_frames(self.samples, c.encoder_kernel, c.encoder_stride)

  @property
  def blocks(self) -> int:
    return press_net.num_blocks(self.samples, self.model_config.block_length)

  def shape(self) -> dict[str, int]:
    c = self.model_config
    return {"batch": self.batch, "speakers": c.speakers, "samples": self.samples,
            "frames": self.frames, "width": c.width, "rnn_hidden": c.rnn_hidden,
            "blocks": self.blocks, "sample_rate": c.sample_rate}


def make_setup(name: str, sets: list[str]) -> Setup:
  experiment = configs.resolve(name, sets)
  train = experiment.train
  model_config = train.model_config(resolve=True)  # As the trainer builds it (dtype 'auto').
  samples = int(round(experiment.data.crop_seconds * model_config.sample_rate))
  if samples < 1:
    raise ValueError(f"bench_step: data.crop_seconds={experiment.data.crop_seconds} gives no "
                     "samples")
  return Setup(experiment=experiment, model_config=model_config,
               model=press_net.PressNet(model_config, remat=train.remat),
               loss_config=train.loss_config(), optimizer=optim.make_optimizer(train.optimizer),
               batch=train.batch_size_per_device, samples=samples)


def block_counts(model_config) -> dict[str, int]:
  """How many of each block the network runs per forward pass."""
  attention = sum(model_config.stage_layout(stage).count("attention")
                  for stage in range(model_config.stages_per_group)) * model_config.groups
  return {"encoder_rnn": model_config.encoder_blocks, "decoder_rnn": model_config.decoder_blocks,
          "attention": attention, "exits": model_config.exits}


# --- the step -------------------------------------------------------------------------------------
def step_function(setup: Setup, model: press_net.PressNet | None = None):
  return jax.jit(functools.partial(
      step_lib.train_step, model=model or setup.model, loss_config=setup.loss_config,
      optimizer=setup.optimizer, axis_name=None), donate_argnums=(0,))


def measure_step(setup: Setup, batch: dict, repeats: int, seed: int) -> tuple[float, Any, Any]:
  """(median step s, compiled step, state); the state is threaded through the timed steps."""
  state = step_lib.create_train_state(setup.model, setup.optimizer, seed)
  batch = jax.device_put(batch)
  started = time.perf_counter()
  compiled = step_function(setup).lower(state, batch).compile()
  log(f"compiled the train step in {time.perf_counter() - started:.1f} s")
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(max(repeats, 1)):
    started = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - started)
  return statistics.median(times), compiled, state


def _recurrence_grad(name: str | None, chunk: int | None = None):
  function = recurrence_function(name, chunk)

  def forward_backward(decay, drive, cotangent):
    _, vjp = jax.vjp(function, decay, drive)
    return vjp(cotangent)

  return forward_backward


def sequential_loop_flops(setup: Setup) -> float:
  """FLOPs of a step's sequential recurrences that XLA's cost analysis leaves out.

  The 'sequential' kernel is a fori_loop over frames, a while loop whose body XLA counts once
  (with unroll u the body holds u frames, so this overcounts by u - 1 frames: negligible).
  Analytically each pass of h_t = a_t h_{t-1} + b_t costs 2 flops (multiply, add) per element
  and frame, on (2 directions, streams, hidden) per frame; a forward+backward call runs 2 passes
  (the recurrence, then its adjoint; 3 with remat, which recomputes the forward), so per call
  passes x 2 x (2 x streams x hidden) x (frames - 1) are missing. (Checked against XLA's count of
  the kernel at frames = 16 and 64: rolled count + this = 7 flops per stacked element = 5 for the
  recurrence passes and the a-gradient + 2 adds of the stacking's transpose.)
  """
  config = setup.model_config
  counts = block_counts(config)
  passes = 3 if setup.experiment.train.remat else 2
  return float(sum(
      calls * passes * 2 * (2 * streams * config.rnn_hidden) * (setup.frames - 1)
      for calls, streams in ((counts["encoder_rnn"], setup.batch),
                             (counts["decoder_rnn"], setup.batch * config.speakers))))


def step_flops(setup: Setup, compiled, state, batch, recurrence: str) -> tuple[float, str]:
  """XLA FLOPs of one step with every scan unrolled, and how they were counted."""
  config = setup.model_config
  if config.encoder_blocks <= 1 and config.groups == 1:
    flops = xla_flops(compiled)
    method = ("XLA cost analysis of the step as compiled (every nn.scan has length 1, so "
              "unrolling changes nothing)")
  else:
    unrolled = press_net.PressNet(config, scan_unroll=True, remat=setup.experiment.train.remat)
    started = time.perf_counter()
    flops = xla_flops(step_function(setup, unrolled).lower(state, batch).compile())
    log(f"compiled the scan-unrolled step for its FLOPs in {time.perf_counter() - started:.1f} s")
    method = "XLA cost analysis of the step compiled with PressNet(scan_unroll=True)"
  if recurrence == "sequential":
    missing = sequential_loop_flops(setup)
    flops += missing
    method += (f", plus {missing / 1e9:.3f} GFLOP counted analytically for the 'sequential' "
               "recurrence's loop (XLA counts a while-loop body once; 2 flops per element and "
               "frame per pass)")
  return flops, method


# --- the parts ------------------------------------------------------------------------------------
def measure_parts(setup: Setup, recurrence: str, repeats: int, seed: int) -> dict[str, dict]:
  """Per part: calls, per-call forward and forward+backward ms, per-step ms (calls x per call)."""
  config = setup.model_config
  dtype = jnp.dtype(config.dtype)
  batch, speakers, frames, width = setup.batch, config.speakers, setup.frames, config.width
  samples, blocks = setup.samples, setup.blocks
  counts = block_counts(config)
  keys = iter(jax.random.split(jax.random.key(seed + 100), 64))

  def normal(*shape):
    return jax.random.normal(next(keys), shape, jnp.float32)

  parts: dict[str, list[tuple[str, int, float, float]]] = {}

  def add(part, label, calls, times):
    if calls:
      parts.setdefault(part, []).append((label, calls, *times))
      log(f"{part} {label}: {calls} x ({1e3 * times[0]:.2f} ms forward, "
          f"{1e3 * times[1]:.2f} ms forward+backward)")

  timed = functools.partial(time_module, repeats=repeats, seed=seed)
  add("encoder", f"({batch}, {samples})", 1, timed(
      _module(press_net.Encoder, config, channels=config.encoder_channels,
              kernel=config.encoder_kernel, stride=config.encoder_stride, width=width,
              dtype=dtype, with_basis=config.waveform_head == "mask"),
      (), (normal(batch, samples),)))  # No gradient to the mixture.
  add("speaker_split", f"({batch}, {frames}, {width})", 1, timed(
      _module(press_net.SpeakerSplit, config, speakers=speakers, dtype=dtype),
      (normal(batch, frames, width),)))

  # Recurrent blocks: encoder blocks on the batch's streams, decoder blocks on batch x speakers.
  streams_and_calls = [(batch, counts["encoder_rnn"]), (batch * speakers, counts["decoder_rnn"])]
  mixer = _module(layers.LinearRNNMixer, config, hidden=config.rnn_hidden, dtype=dtype)
  rnn_feed_forward = _module(layers.GatedFeedForward, config, hidden=config.ffn_hidden,
                             dtype=dtype)
  recurrence_fn = recurrence_function(
      recurrence, getattr(config, "recurrence_chunk", None))
  for streams, calls in streams_and_calls:
    if not calls:
      continue
    label = f"({streams}, {frames}, {width})"
    add("rnn_mixers", label, calls, timed(
        mixer, (normal(streams, frames, width),), (jnp.ones((streams, frames), jnp.float32),)))
    decay = jax.nn.sigmoid(normal(streams, frames, config.rnn_hidden))
    drive = normal(streams, frames, config.rnn_hidden)
    add("recurrence", f"({streams}, {frames}, {config.rnn_hidden})", calls, time_part(
        lambda params, decay, drive: recurrence_fn(decay, drive), {}, (decay, drive),
        repeats=repeats, seed=seed))
    add("feed_forwards", f"recurrent block {label}", calls, timed(
        rnn_feed_forward, (normal(streams, frames, width),)))

  stream_shape = (batch, speakers, frames, width)
  label = str(stream_shape)
  if counts["attention"]:
    add("feed_forwards", f"attention block {label}", counts["attention"], timed(
        _module(layers.GatedFeedForward, config, hidden=config.attention_ffn_hidden, dtype=dtype),
        (normal(*stream_shape),)))
    add("speaker_attention", label, counts["attention"], timed(
        _module(layers.SpeakerAttention, config, heads=config.attention_heads, dtype=dtype),
        (normal(*stream_shape),)))
  if config.waveform_head == "mask":
    add("waveform_heads", f"mask heads {label}", counts["exits"], timed(
        _module(press_net.MaskHead, config, kernel=config.encoder_kernel,
                stride=config.encoder_stride, dtype=dtype),
        (normal(*stream_shape), normal(batch, frames, config.encoder_channels)),
        static=(samples,)))
  else:
    add("waveform_heads", label, counts["exits"], timed(
        _module(press_net.WaveformHead, config, kernel=config.encoder_kernel,
                stride=config.encoder_stride, dtype=dtype),
        (normal(*stream_shape),), static=(samples,)))
  lengths = jnp.full((batch,), float(samples))
  _, frame_block, frame_weight = press_net.frame_context(config, lengths, samples)
  add("variance_heads", label, counts["exits"], timed(
      _module(press_net.VarianceHead, config, hidden=config.variance_width,
              alpha_floor=config.alpha_floor, variance_floor=config.variance_floor),
      (normal(*stream_shape),), (frame_block, frame_weight), static=(blocks,)))

  # The loss and PIT on given outputs (gradient to the outputs, as in the step).
  exits = config.exits
  sources = 0.1 * normal(batch, speakers, samples)
  outputs = ExitOutputs(
      mean=sources[None] + 0.05 * normal(exits, batch, speakers, samples),
      log_var=jnp.log(2.5e-3) + 0.1 * normal(exits, batch, speakers, blocks),
      log_alpha=0.1 * normal(exits, batch, speakers, blocks))
  mask = jnp.ones((batch, samples), jnp.float32)

  def loss(params, outputs, sources, mask):
    return likelihoods.press_loss(outputs, sources, mask, setup.loss_config)[0]

  add("loss_pit", f"outputs ({exits}, {batch}, {speakers}, {samples})", 1, time_part(
      loss, {}, (outputs,), (sources, mask), repeats=repeats, seed=seed))

  # The optimiser update on the model's parameters with random gradients.
  params = press_net.init_params(setup.model, jax.random.key(seed))
  opt_state = jax.jit(setup.optimizer.init)(params)
  grads = jax.tree_util.tree_map(lambda x: 1e-3 * x, _random_like(next(keys), params))

  @jax.jit
  def update(grads, opt_state, params):
    updates, new_opt_state = setup.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state

  update_s = median_seconds(update, grads, opt_state, params, repeats=repeats)
  add("optimizer_update", f"{sum(x.size for x in jax.tree_util.tree_leaves(params))} params",
      1, (update_s, update_s))

  result = {}
  for name in PART_NAMES:
    rows = parts.get(name, [])
    calls = sum(row[1] for row in rows)
    step_forward = sum(row[1] * row[2] for row in rows) * 1e3
    step_forward_backward = sum(row[1] * row[3] for row in rows) * 1e3
    entry = {"calls": calls,
             "forward_ms": step_forward / calls if calls else 0.0,
             "forward_backward_ms": step_forward_backward / calls if calls else 0.0,
             "step_forward_ms": step_forward, "step_forward_backward_ms": step_forward_backward}
    if len(rows) > 1:
      entry["instances"] = [{"shape": label, "calls": c, "forward_ms": 1e3 * f,
                             "forward_backward_ms": 1e3 * fb} for label, c, f, fb in rows]
    elif rows:
      entry["shape"] = rows[0][0]
    if name in NESTED_PARTS:
      entry["inside"] = NESTED_PARTS[name]
    result[name] = entry
  return result


def parts_sum_ms(parts: dict[str, dict]) -> float:
  """Per-step forward+backward ms of all parts, nested ones (the recurrence) left out."""
  return sum(entry["step_forward_backward_ms"] for name, entry in parts.items()
             if name not in NESTED_PARTS)


_HLO_NAME = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction")


def module_of(op_name: str) -> tuple[str, str]:
  """(module, 'forward' | 'backward') of an HLO op_name, stage numbers folded.

  'jit(train_step)/transpose(jvp(PressNet))/while/body/closed_call/stages/stage1_rnn0/mixer/mul'
  -> ('PressNet/stages/stage*_rnn0', 'backward'): autodiff's transpose is the backward pass.
  Blocks of the scanned stacks keep three levels, other submodules two (PressNet/encoder);
  operations of PressNet itself and everything outside the model are grouped.
  """
  direction = "backward" if "transpose(" in op_name else "forward"
  name = re.sub(r"^jit\([^)]*\)/", "", op_name)
  name = re.sub(r"transpose\(jvp\((\w*)\)\)|jvp\((\w*)\)",
                lambda m: m.group(1) or m.group(2) or "", name)
  name = re.sub(r"(while/body/|closed_call/|checkpoint/|remat/)", "", name)
  parts = re.sub(r"stage\d+_", "stage*_", name).strip("/").split("/")
  if not op_name:
    return "(no op_name: copies, loop control)", direction
  if parts[0] != "PressNet":
    return "outside the model (loss, PIT, metrics, update)", direction
  if len(parts) >= 4 and parts[1] in ("stages", "encoder_blocks"):
    return "/".join(parts[:3]), direction
  if len(parts) >= 3:
    return "/".join(parts[:2]), direction
  return "PressNet (between submodules)", direction


def profile_modules(compiled, state, batch, steps: int = 5) -> dict[str, Any]:
  """Thread time of the compiled step per model module, from a jax.profiler trace.

  XLA:CPU records one trace event per executed thunk (a fusion, a dot, a loop body's ops),
  named after its HLO instruction; each instruction's op_name metadata says which module and
  pass it came from. Returns {"steps", "thread_ms_per_step" (all thunks, summed over XLA's
  threads: above the step's wall time where thunks ran in parallel), "events_per_step",
  "modules": [{"module", "forward_ms", "backward_ms"}, ...] per step, largest first}.
  """
  names = {}
  for line in compiled.as_text().splitlines():
    match = _HLO_NAME.match(line)
    if match and match.group(1) not in names:
      op_name = _OP_NAME.search(line)
      names[match.group(1)] = op_name.group(1) if op_name else ""
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    try:
      for _ in range(steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    finally:
      jax.profiler.stop_trace()
    [path] = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    totals: dict[tuple[str, str], float] = collections.defaultdict(float)
    thread_ns, events = 0.0, 0
    for plane in profile.planes:
      for line in plane.lines:
        if "XLAEigen" not in line.name:  # XLA:CPU's compute threads.
          continue
        for event in line.events:
          if event.name.startswith(_RUNTIME_EVENTS):
            continue
          totals[module_of(names.get(event.name, ""))] += event.duration_ns
          thread_ns += event.duration_ns
          events += 1
  modules = collections.defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
  for (module, direction), ns in totals.items():
    modules[module][f"{direction}_ms"] += ns / 1e6 / steps
  rows = sorted(({"module": m, **v} for m, v in modules.items()),
                key=lambda r: -(r["forward_ms"] + r["backward_ms"]))
  return {"steps": steps, "thread_ms_per_step": thread_ns / 1e6 / steps,
          "events_per_step": events / steps, "modules": rows}


def bench_step(name: str, sets: list[str], repeats: int, seed: int = 0,
               parts: bool = True, profile: bool = False) -> dict[str, Any]:
  setup = make_setup(name, sets)
  config = setup.model_config
  recurrence, setting = model_recurrence(config)
  log(f"config {setup.experiment.name}: preset {setup.experiment.train.model}, batch "
      f"{setup.batch} x {setup.samples} samples, {setup.frames} frames, recurrence {recurrence}"
      + (f" ({setting!r})" if setting != recurrence else ""))
  batch = speech_like_batch(setup.batch, config.speakers, setup.samples, config.sample_rate,
                            seed)
  step_s, compiled, state = measure_step(setup, batch, repeats, seed)
  flops, flops_method = step_flops(setup, compiled, state, jax.device_put(batch), recurrence)
  profiled = profile_modules(compiled, state, jax.device_put(batch)) if profile else None
  del state
  parts = measure_parts(setup, recurrence, repeats, seed) if parts else {}
  reference = matmul_gflops()
  achieved = flops / 1e9 / step_s
  summed = parts_sum_ms(parts)
  return {
      "step_s": step_s, "gflop_per_step": flops / 1e9, "achieved_gflops": achieved,
      "matmul_gflops": reference, "ratio": achieved / reference, "parts": parts,
      "config": setup.experiment.name, "recurrence": recurrence,
      "recurrence_setting": setting, "sets": list(sets),
      "shape": setup.shape(), "remat": setup.experiment.train.remat,
      "flops_method": flops_method, "repeats": repeats, "parts_sum_ms": summed,
      "other_ms": 1e3 * step_s - summed, "platform": jax.devices()[0].platform,
      "jax": jax.__version__, **({"profile": profiled} if profile else {})}


def format_step(result: dict[str, Any]) -> str:
  shape = result["shape"]
  lines = [
      f"config {result['config']}" + (f" ({' '.join(result['sets'])})" if result["sets"] else "")
      + f": batch {shape['batch']} x {shape['samples']} samples "
      f"({shape['samples'] / shape['sample_rate']:g} s at {shape['sample_rate']} Hz), "
      f"{shape['frames']} frames, width {shape['width']}, rnn_hidden {shape['rnn_hidden']}, "
      f"one {result['platform']} device, recurrence {result['recurrence']!r}"
      + (", remat" if result["remat"] else ""),
      f"train step     {result['step_s'] * 1e3:9.1f} ms  (median of {result['repeats']} warm "
      "steps)",
      f"GFLOP/step     {result['gflop_per_step']:9.3f}     ({result['flops_method']})",
      f"achieved       {result['achieved_gflops']:9.2f} GFLOP/s",
      f"matmul 2048^2  {result['matmul_gflops']:9.2f} GFLOP/s  (float32, best of 5)",
      f"ratio          {result['ratio']:9.3f}",
      "",
      f"{'part':<18} {'calls':>5} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd ms/step':>12} "
      f"{'fwd+bwd ms/step':>16} {'% of step':>9}"]
  step_ms = 1e3 * result["step_s"]
  for name, entry in result["parts"].items():
    share = f"{100 * entry['step_forward_backward_ms'] / step_ms:8.1f}%"
    suffix = f"  (inside {entry['inside']}, not summed)" if "inside" in entry else ""
    lines.append(f"{name:<18} {entry['calls']:>5} {entry['forward_ms']:>9.2f} "
                 f"{entry['forward_backward_ms']:>11.2f} {entry['step_forward_ms']:>12.1f} "
                 f"{entry['step_forward_backward_ms']:>16.1f} {share:>9}{suffix}")
    for instance in entry.get("instances", []):
      lines.append(f"  {instance['shape']:<30} {instance['calls']:>3} x "
                   f"{instance['forward_ms']:.2f} / {instance['forward_backward_ms']:.2f} ms")
  lines.append(
      f"sum of parts (fwd+bwd per step, recurrence not added) {result['parts_sum_ms']:.1f} ms of "
      f"the step's {step_ms:.1f} ms ({100 * result['parts_sum_ms'] / step_ms:.0f}%); other / "
      f"overhead {result['other_ms']:.1f} ms (norms, LayerScale residuals, input scaling, "
      "metrics, finiteness guard, fusion across parts)")
  lines.append("per-call times are medians of each part jitted alone with its own parameters; "
               "ms/step = calls x per call; optimizer_update has no backward (both columns are "
               "the update)")
  profile = result.get("profile")
  if profile:
    lines.append(f"inside the step (jax.profiler, {profile['steps']} steps): "
                 f"{profile['thread_ms_per_step']:.1f} ms of XLA thread time per step "
                 f"({profile['events_per_step']:.0f} thunks) against {step_ms:.1f} ms of wall time")
    lines.append(f"{'module':<48} {'forward ms':>11} {'backward ms':>12} {'share':>6}")
    for row in profile["modules"]:
      total = row["forward_ms"] + row["backward_ms"]
      lines.append(f"{row['module']:<48} {row['forward_ms']:>11.2f} {row['backward_ms']:>12.2f} "
                   f"{100 * total / max(profile['thread_ms_per_step'], 1e-9):>5.1f}%")
  return "\n".join(lines)


# --- recurrence mode ------------------------------------------------------------------------------
def recurrence_setup(name: str, sets: list[str]) -> tuple[tuple[int, int, int], int | None]:
  """(batch x speakers, frames, rnn_hidden) of the config's decoder recurrence, and its chunk."""
  setup = make_setup(name, sets)
  config = setup.model_config
  return ((setup.batch * config.speakers, setup.frames, config.rnn_hidden),
          getattr(config, "recurrence_chunk", None))


RECURRENCE_ROUNDS = 10  # Interleaved rounds: sub-ms calls swing 2-3x between blocks of calls.


def bench_recurrence(shape: tuple[int, int, int], repeats: int, seed: int = 0,
                     chunk: int | None = None,
                     rounds: int = RECURRENCE_ROUNDS) -> dict[str, dict[str, float]]:
  """{implementation: {'forward_ms', 'forward_backward_ms'}} at `shape`: medians over `rounds`
  interleaved rounds of `repeats` calls of every implementation, so a slow phase of the
  machine falls on all of them alike."""
  keys = jax.random.split(jax.random.key(seed), 4)
  decay = jax.nn.sigmoid(jax.random.normal(keys[0], shape, jnp.float32))
  drive = jax.random.normal(keys[1], shape, jnp.float32)
  cotangent = (jax.random.normal(keys[2], shape, jnp.float32),
               jax.random.normal(keys[3], shape, jnp.float32))
  calls = {}
  for name in recurrence_implementations():
    calls[(name, "forward_ms")] = (jax.jit(recurrence_function(name, chunk)), (decay, drive))
    calls[(name, "forward_backward_ms")] = (jax.jit(_recurrence_grad(name, chunk)),
                                            (decay, drive, cotangent))
  samples = {key: [] for key in calls}
  for function, arguments in calls.values():
    jax.block_until_ready(function(*arguments))  # Compiled and warm before any timing.
  for _ in range(max(rounds, 1)):
    for key, (function, arguments) in calls.items():
      for _ in range(max(repeats, 1)):
        started = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        samples[key].append(time.perf_counter() - started)
  results = {}
  for name in recurrence_implementations():
    results[name] = {kind: 1e3 * statistics.median(samples[(name, kind)])
                     for kind in ("forward_ms", "forward_backward_ms")}
    log(f"{name}: {results[name]['forward_ms']:.2f} ms forward, "
        f"{results[name]['forward_backward_ms']:.2f} ms forward+backward")
  return results


def format_recurrence(results: dict[str, dict[str, float]], shape, reference: float) -> str:
  lines = [f"bidirectional_recurrence on (streams, frames, hidden) = {tuple(shape)} (stacked "
           f"directions: {(2, *shape)})",
           f"{'implementation':<16} {'fwd ms':>9} {'fwd+bwd ms':>11}"]
  for name, entry in results.items():
    lines.append(f"{name:<16} {entry['forward_ms']:>9.2f} {entry['forward_backward_ms']:>11.2f}")
  lines.append(f"matmul 2048^2 float32 reference: {reference:.2f} GFLOP/s")
  return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int]:
  try:
    shape = tuple(int(part) for part in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"--shape wants B,T,H (three positive ints), got {text!r}")
  return shape


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help=configs.CONFIG_HELP)
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed warm calls per measurement (medians)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--no-parts", action="store_true",
                      help="skip the per-part breakdown (step time, FLOPs and ratio only)")
  parser.add_argument("--profile", action="store_true",
                      help="also trace 5 steps with jax.profiler and attribute XLA's thread time "
                           "to model modules, forward and backward (key 'profile')")
  parser.add_argument("--recurrence", action="store_true",
                      help="time the recurrence's implementations instead of the step")
  parser.add_argument("--shape", type=parse_shape, metavar="B,T,H",
                      help="--recurrence: (streams, frames, hidden); default: the config's")
  args, _ = configs.parse_command_line(parser, argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.shape is not None and not args.recurrence:
    parser.error("--shape only applies with --recurrence")
  malloc = allocator.configure()  # As the library's entry points run (PRESS_JAX_MALLOC=off: not).
  log(f"host allocator: {malloc} (press_jax/allocator.py)")

  if args.recurrence:
    config_shape, chunk = recurrence_setup(args.config, args.config_overrides)
    shape = args.shape or config_shape
    log(f"recurrence shape {shape} (stacked directions: {(2, *shape)}), implementations "
        f"{recurrence_implementations()}" + (f", chunk {chunk}" if chunk else ""))
    results = bench_recurrence(shape, args.repeats, args.seed, chunk)
    reference = matmul_gflops()
    if args.json:
      print(f"[bench_step] reference: {MATMUL_SIZE}x{MATMUL_SIZE} float32 matmul "
            f"{reference:.2f} GFLOP/s", file=sys.stderr, flush=True)
      print(json.dumps(results))
    else:
      print(format_recurrence(results, shape, reference))
    return 0

  result = bench_step(args.config, args.config_overrides, args.repeats, args.seed,
                      parts=not args.no_parts, profile=args.profile)
  result["allocator"] = malloc
  print(json.dumps(result) if args.json else format_step(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
