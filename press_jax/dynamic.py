"""Dynamic early exit that skips the work: decoder stages run one at a time in a while loop.

The masked exit rule (`exit_rule.select_exits`) computes every exit and then picks one per block,
so it saves nothing. `dynamic_select` runs the encoder, the encoder blocks and the speaker split,
then the decoder stages one at a time inside `lax.while_loop` (each stage group's parameters
taken from the stacked scan parameters with a dynamic index), evaluates the exit rule after
each stage, and stops as soon as every valid block of every item has accepted an exit. The rule
is the masked path's, evaluated by the same functions (`exit_rule.exit_probabilities`,
`exit_rule.splice_weights`): max over conditions, min over speakers, threshold p, the last exit
(or `max_exit`) always accepted; a block keeps the first exit it accepts, and blocks are spliced
with the same crossfade. Choices and waveform equal the masked path's (tests/test_dynamic.py).

Which heads run: with the SNR or SNRi condition (the default has all three) the rule reads every
exit's estimate, so each stage runs its waveform head and adds its share of the splice. With
SNRref alone the rule reads only the predicted variance: the stages run their variance heads,
and a stage's waveform head runs (a while loop of one trip or none) only when some block accepts
that exit, since only those blocks take its estimate. Both give the masked path's waveform
(tests/test_dynamic.py).

Where a scan step holds several stages (`PressConfig.stages_per_group > 1`, e.g. one RNN block
per exit and attention every third block), the stages inside one step differ in layout, so they
cannot be iterations of one loop body; each stage after the first in a step runs inside a while
loop that makes one trip or none (no `lax.cond` anywhere: a `cond` under `vmap` becomes a
`select` that runs both branches, a while loop stays a loop).

Batches: the items of a batch share one loop, which runs until all of them are done; an item
that is done keeps its chosen exits while the others go on (per-item masking). On a CPU, where
the cost grows with the batch, `press-separate` therefore runs one chunk per call (each chunk its
own while loop, so each stops at its own exit); on an accelerator a batch of chunks trades some
wasted work for parallelism.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from press_jax import calibration as calibration_lib
from press_jax import exit_rule
from press_jax.config import PressConfig
from press_jax.likelihoods import block_sums, num_blocks
from press_jax.models import press_net
from press_jax.types import ExitOutputs

POLICIES = ("dynamic", "static")


@flax.struct.dataclass
class DynamicSelection:
  """What the dynamic path returns."""

  waveform: Float[Array, "batch speakers samples"]
  exit_index: Int[Array, "batch blocks"]  # 0-based chosen exit per block
  probability: Float[Array, "batch blocks"]  # min over speakers of p_exit at the chosen exit
  block_valid: Bool[Array, "batch blocks"]
  exits_run: Int[Array, ""]  # Decoder stages (exits) the loop computed for this batch.
  # Exit heads computed. Waveform heads: every stage's where the rule reads the estimates; only
  # those of exits some block accepted where it does not; the static policy: its exit's alone.
  waveform_heads_run: Int[Array, ""]
  variance_heads_run: Int[Array, ""]


def _index_stacked(tree, index):
  return jax.tree_util.tree_map(
      lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, 0, keepdims=False), tree)


def _run_once_if(predicate, function, state):
  """function(state) if predicate else state, as a while loop of one trip or none."""
  def body(carry):
    _, inner = carry
    return jnp.asarray(False), function(inner)
  return jax.lax.while_loop(lambda carry: carry[0], body, (predicate, state))[1]


@functools.partial(jax.jit, static_argnames=(
    "config", "block_length", "crossfade", "conditions", "max_exit", "policy",
    "use_mixture_reference", "method"))
def _dynamic_core(params, mixture, mask, target_db, confidence, reference_power,
                  log_alpha_scale, log_beta_scale, *, config: PressConfig, block_length: int,
                  crossfade: int, conditions: tuple[str, ...], max_exit: int, policy: str,
                  use_mixture_reference: bool, method: str) -> DynamicSelection:
  batch, samples = mixture.shape
  speakers = config.speakers
  blocks = num_blocks(samples, config.block_length)
  prepared, context, streams = press_net.encode_and_split(config, params, mixture, mask)
  block_valid = block_sums(prepared.mask, None, block_length) > 0
  last = max_exit - 1
  spg = config.stages_per_group

  # Without the SNR / SNRi conditions the rule reads only the predicted variance: the stages
  # run their variance heads, and an exit's waveform head runs only when a block accepts it.
  lazy_heads = not exit_rule.needs_estimate(conditions)

  def add_estimate(e, mean, state):
    """Exit e's share of every sample (the masked rule's splice weights, in which blocks not
    decided yet (-1) take no weight; blocks decided later never choose exit e) x its estimate."""
    weights = exit_rule.splice_weights(state["exit_index"], block_valid, config.exits, samples,
                                       block_length, crossfade)
    share = jax.lax.dynamic_index_in_dim(weights, e, 1, keepdims=False)  # (batch, samples)
    return {**state, "waveform": state["waveform"] + share[:, None, :] * mean[0],
            "waveform_heads_run": state["waveform_heads_run"] + 1}

  def run_waveform_head(e, group_params, position, state):
    """Exit e's waveform head on the current streams, finished as the exits are."""
    head = press_net.make_waveform_head(config)
    variables = {"params": group_params[f"stage{position}_waveform_head"]}
    mean = head.apply(variables, *press_net.waveform_head_inputs(
        head, state["streams"], context[3], samples))[None]
    return add_estimate(e, press_net.finish_estimates(config, prepared, mean), state)

  def evaluate_exit(e, stacked, state, group_params, position):
    """Exit e's outputs -> this stage's accepted blocks, splice contribution, carries."""
    mean, log_var, log_alpha = stacked  # each with a leading axis of 1 (this exit)
    if config.cumulative_exits:
      sum_alpha = state["sum_alpha"] + jnp.exp(log_alpha[0])
      sum_inverse_beta = state["sum_inverse_beta"] + jnp.exp(-(log_alpha[0] + log_var[0]))
      log_alpha = jnp.log(sum_alpha)[None]
      log_var = (-jnp.log(sum_inverse_beta) - jnp.log(sum_alpha))[None]
      state = {**state, "sum_alpha": sum_alpha, "sum_inverse_beta": sum_inverse_beta}
    outputs = press_net.finish_exits(config, prepared, mean, log_var, log_alpha)
    if log_alpha_scale is not None:
      factor = jnp.minimum(e, log_alpha_scale.shape[0] - 1)
      outputs = calibration_lib.apply_post_calibration(outputs, calibration_lib.PostCalibration(
          log_alpha_scale=jax.lax.dynamic_slice_in_dim(log_alpha_scale, factor, 1),
          log_beta_scale=jax.lax.dynamic_slice_in_dim(log_beta_scale, factor, 1)))
    probabilities = exit_rule.exit_probabilities(
        outputs, mixture, prepared.mask, block_length=block_length, target_db=target_db,
        reference_power=None if use_mixture_reference else reference_power,
        conditions=conditions, method=method)[0]  # (batch, speakers, blocks)
    worst = jnp.min(probabilities, axis=1)
    accepted = e == last
    if policy == "dynamic":
      accepted = accepted | (worst >= confidence)
    newly = accepted & (state["exit_index"] < 0)
    state = {**state, "exit_index": jnp.where(newly, e, state["exit_index"]),
             "probability": jnp.where(newly, worst, state["probability"]),
             "exits_run": state["exits_run"] + 1,
             "variance_heads_run": state["variance_heads_run"] + 1}
    if not lazy_heads:
      return add_estimate(e, outputs.mean, state)
    return _run_once_if(jnp.any(newly & block_valid),
                        functools.partial(run_waveform_head, e, group_params, position), state)

  def undecided(state):
    return jnp.any((state["exit_index"] < 0) & block_valid)

  def run_stage(position, group, state):
    group_params = _index_stacked(params["stages"], group)
    module = press_net.StageGroup(config, samples, blocks, positions=(position,),
                                  heads="variance" if lazy_heads else "all")
    streams, stacked = module.apply({"params": group_params}, state["streams"], context)
    return evaluate_exit(group * spg + position, stacked, {**state, "streams": streams},
                         group_params, position)

  groups_needed = math.ceil(max_exit / spg)

  def accumulate_variance(stacked, state):
    """A cumulative exit's running sums, from a stage whose own exit is not taken."""
    _, log_var, log_alpha = stacked
    return {**state, "sum_alpha": state["sum_alpha"] + jnp.exp(log_alpha[0]),
            "sum_inverse_beta": state["sum_inverse_beta"] + jnp.exp(-(log_alpha[0] + log_var[0]))}

  def run_stage_without_exit(position, group, state):
    """Only the stage's blocks (and, for cumulative exits, its variance head): the static
    policy takes no exit before `max_exit`, so its heads and exit rule would be wasted work."""
    group_params = _index_stacked(params["stages"], group)
    heads = "variance" if config.cumulative_exits else "none"
    module = press_net.StageGroup(config, samples, blocks, positions=(position,), heads=heads)
    streams, stacked = module.apply({"params": group_params}, state["streams"], context)
    state = {**state, "streams": streams, "exits_run": state["exits_run"] + 1}
    if not config.cumulative_exits:
      return state
    state = {**state, "variance_heads_run": state["variance_heads_run"] + 1}
    return accumulate_variance(stacked, state)

  def static_body(state):
    for position in range(spg):
      state = run_stage_without_exit(position, state["group"], state)
    return {**state, "group": state["group"] + 1}

  def group_body(state):
    group = state["group"]
    state = run_stage(0, group, state)
    for position in range(1, spg):
      exit_number = group * spg + position
      state = _run_once_if((exit_number < max_exit) & undecided(state),
                           functools.partial(run_stage, position, group), state)
    return {**state, "group": group + 1}

  def group_condition(state):
    return (state["group"] < groups_needed) & undecided(state)

  state = {
      "group": jnp.asarray(0, jnp.int32),
      "streams": streams,
      "exit_index": jnp.full((batch, blocks), -1, jnp.int32),
      "probability": jnp.zeros((batch, blocks), jnp.float32),
      "waveform": jnp.zeros((batch, speakers, samples), jnp.float32),
      "exits_run": jnp.asarray(0, jnp.int32),
      "waveform_heads_run": jnp.asarray(0, jnp.int32),
      "variance_heads_run": jnp.asarray(0, jnp.int32),
  }
  if config.cumulative_exits:
    state["sum_alpha"] = jnp.zeros((batch, speakers, blocks), jnp.float32)
    state["sum_inverse_beta"] = jnp.zeros((batch, speakers, blocks), jnp.float32)
  if policy == "static":
    # Whole groups before the one holding exit `max_exit` in a loop, then that group's stages
    # up to the exit, the last with its heads and the (always accepting) rule.
    last_group, last_position = divmod(last, spg)
    state = jax.lax.while_loop(lambda state: state["group"] < last_group, static_body, state)
    for position in range(last_position):
      state = run_stage_without_exit(position, state["group"], state)
    state = run_stage(last_position, state["group"], state)
  else:
    state = jax.lax.while_loop(group_condition, group_body, state)
  exit_index = jnp.where(state["exit_index"] < 0, last, state["exit_index"])
  return DynamicSelection(
      waveform=state["waveform"] * prepared.mask[:, None, :], exit_index=exit_index,
      probability=state["probability"], block_valid=block_valid,
      exits_run=state["exits_run"], waveform_heads_run=state["waveform_heads_run"],
      variance_heads_run=state["variance_heads_run"])


def _float32(value):
  """value as float32: host values (numpy, Python numbers) stay on the host, for the jitted core
  to transfer with its other arguments (an eager jnp.asarray costs a dispatch per argument);
  JAX arrays and tracers stay JAX arrays."""
  if isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
    return jnp.asarray(value, jnp.float32)
  return np.asarray(value, np.float32)


def _checked_max_exit(config: PressConfig, max_exit: int | None) -> int:
  max_exit = config.exits if max_exit is None else int(max_exit)
  if not 1 <= max_exit <= config.exits:
    raise ValueError(f"max_exit must be between 1 and {config.exits} (the model's exits), got "
                     f"{max_exit}")
  return max_exit


def dynamic_select(
    model: press_net.PressNet,
    params: Any,
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None = None,
    *,
    target_db: float = 10.0,
    confidence: float = 0.9,
    conditions: tuple[str, ...] = exit_rule.CONDITIONS,
    reference_power: float | None = None,
    crossfade_ms: float = 10.0,
    max_exit: int | None = None,
    policy: str = "dynamic",
    calibration: calibration_lib.PostCalibration | None = None,
    method: str = "approximate",
) -> DynamicSelection:
  """Separate `mixture`, computing decoder stages only until every block has accepted an exit.

  `max_exit` (1-based, default the last) caps the depth and is always accepted; `policy`
  'static' takes exit `max_exit` for every block: the stages before it run without their exit
  heads or the rule (nothing before `max_exit` can be accepted), in a while loop over groups.
  `calibration` is applied to each exit's predicted distribution before the rule.
  """
  config = model.config
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  if method not in exit_rule.PROBABILITY_METHODS:
    raise ValueError(f"method must be one of {exit_rule.PROBABILITY_METHODS}, got {method!r}")
  max_exit = _checked_max_exit(config, max_exit)
  if crossfade_ms < 0:
    raise ValueError(f"crossfade_ms must be >= 0, got {crossfade_ms}")
  crossfade = exit_rule.crossfade_samples(crossfade_ms, config.sample_rate)
  if not 0.0 < float(confidence) < 1.0:
    raise ValueError(f"confidence p must be in the open interval (0, 1), got {confidence}")
  if crossfade >= config.block_length:
    raise ValueError(f"the crossfade must be shorter than a block ({config.block_length} "
                     f"samples), got {crossfade} samples")
  conditions = exit_rule._check_conditions(conditions)
  mixture = _float32(mixture)
  mask = (np.ones(mixture.shape, np.float32) if mask is None and isinstance(mixture, np.ndarray)
          else jnp.ones_like(mixture) if mask is None else _float32(mask))
  use_mixture_reference = reference_power is None
  scales = (None, None)
  if calibration is not None:
    scales = tuple(scale.reshape(-1) if scale.ndim == 0 else scale for scale in (
        _float32(calibration.log_alpha_scale), _float32(calibration.log_beta_scale)))
    if scales[0].shape[0] not in (1, config.exits):
      raise ValueError(f"the post-calibration has {scales[0].shape[0]} factors; expected 1 or "
                       f"one per exit ({config.exits})")
  return _dynamic_core(
      params, mixture, mask, _float32(target_db), _float32(confidence),
      _float32(0.0 if use_mixture_reference else reference_power), *scales,
      config=config, block_length=config.block_length, crossfade=crossfade,
      conditions=conditions, max_exit=max_exit, policy=policy,
      use_mixture_reference=use_mixture_reference, method=method)


def masked_select(
    model: press_net.PressNet,
    params: Any,
    mixture: Float[Array, "batch samples"],
    mask: Float[Array, "batch samples"] | None = None,
    *,
    target_db: float = 10.0,
    confidence: float = 0.9,
    conditions: tuple[str, ...] = exit_rule.CONDITIONS,
    reference_power: float | None = None,
    crossfade_ms: float = 10.0,
    max_exit: int | None = None,
    policy: str = "dynamic",
    calibration: calibration_lib.PostCalibration | None = None,
    method: str = "approximate",
) -> DynamicSelection:
  """The same selection through the masked path: every exit computed, then one picked per block.

  What `press-separate --masked` runs; the reference the dynamic path is tested against.
  """
  config = model.config
  max_exit = _checked_max_exit(config, max_exit)
  mixture = jnp.asarray(mixture, jnp.float32)
  outputs: ExitOutputs = _forward(config, params, mixture, mask)
  if calibration is not None:
    outputs = calibration_lib.apply_post_calibration(outputs, calibration)
  outputs = jax.tree_util.tree_map(lambda x: x[:max_exit], outputs)
  if policy == "static":
    outputs = jax.tree_util.tree_map(lambda x: x[-1:], outputs)
  selection = exit_rule.select_exits(
      outputs, mixture, mask, block_length=config.block_length, target_db=target_db,
      confidence=confidence, sample_rate=config.sample_rate, reference_power=reference_power,
      crossfade_ms=crossfade_ms, conditions=conditions, method=method)
  exit_index = selection.exit_index + (max_exit - 1 if policy == "static" else 0)
  chosen = jnp.take_along_axis(jnp.min(selection.probabilities, axis=2),
                               selection.exit_index[None], axis=0)[0]
  ran = jnp.asarray(max_exit, jnp.int32)
  return DynamicSelection(waveform=selection.waveform, exit_index=exit_index,
                          probability=chosen, block_valid=selection.block_valid,
                          exits_run=ran, waveform_heads_run=ran, variance_heads_run=ran)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(config, params, mixture, mask):
  return press_net.PressNet(config).apply({"params": params}, mixture, mask)


def exits_needed(selection: DynamicSelection) -> np.ndarray:
  """Per item, the deepest exit (1-based) any of its valid blocks chose."""
  index = np.where(np.asarray(selection.block_valid), np.asarray(selection.exit_index), -1)
  return index.max(axis=-1) + 1
