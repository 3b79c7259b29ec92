"""The one evaluator: per-exit quality, calibration and exit policies over a split.

Used by the trainer's validation (press_jax.train), the main job's test evaluation
(experiments.main), experiments.evaluate, experiments.calibrate and experiments.budget_probe.
In the style of big_vision's evaluators:

1. One jitted per-batch function, `evaluate_batch`, written for one device's shard of the
   batch (pmap-style, named axis `train_step.DATA_AXIS`) and run through `jax.shard_map` under
   `jit` over the trainer's data mesh (`train_step.parallel_step`). From one forward pass it
   computes every per-utterance and per-block quantity once (mixture SI-SNR, per-exit PIT
   SI-SNR, the true block SNRs, PIT values, CRPS, each policy's exits, spliced waveform, cost
   and regret) and returns
     - `sums`: sums over the device's *valid* utterances, `lax.psum`-ed over the data axis, so
       every device of every process holds the totals of the whole global batch;
     - `utterance` / `block`: the per-utterance and per-block arrays with their validity masks,
       sharded along the data axis (each process keeps its own rows).
2. On the host, `Evaluator` adds each batch's `sums` (float64) and keeps its own rows. Every
   mean of the summary (SI-SNR / SI-SNRi per exit, silent streams, CRPS, each policy's SI-SNRi,
   GMAC/s, mean exit, regret, exit histograms) is a ratio of those global sums: identical on
   every process, covering the whole split on a multi-host run.
3. What is not a sum is gathered once, at the end, with `multihost_utils.process_allgather`:
   the PIT values (the KS distance is an order statistic, and the histogram is binned on the
   host exactly as `calibration.pit_histogram` bins it), the block statistics that
   `calibration.fit_post_calibration` needs, and the SDRi (numpy BSS-eval, computed on the host
   from this process's estimates). Rows are put back into the global (batch, slot) order, so a
   multi-host run sees the same arrays as one process.

Validity: utterance slot i counts iff `example_mask[i] > 0` (filler slots of a last partial
batch have 0; default 1 when the batch has no `example_mask`) and it has a valid sample. Filler
slots are zeroed before the forward pass and every sum selects with `where`, so a filler slot
(even one holding NaN) adds nothing, and no utterance is counted twice or dropped.

Regret, policies and cost come from `exit_rule` (`one_sided_regret`, `static_policy`,
`uniform_policy`, `oracle_from_block_snr`, `exit_cost`, `chosen_block_snr`, `splice_weights`)
and `exit_criteria` (PRESS's rule and the similarity criteria): nothing here re-implements them.

Batches are this host's numpy dicts as the loaders produce them: 'mixture' (local_devices,
batch, samples), 'sources' (local_devices, batch, speakers, samples), 'mask', and optionally
'example_mask' (local_devices, batch). Every process must call `add` for the same batches (same
shapes, as the loaders guarantee; hosts with the same number of local devices) and then
`summary` / `block_statistics` / `per_utterance` in the same order: they run collectives.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from press_jax import allocator, calibration, compute, exit_criteria, exit_rule, metrics
from press_jax import train_step as step_lib
from press_jax.likelihoods import block_sums
from press_jax.models.press_net import PressNet

SILENT_STREAM_DB = -30.0  # An estimate this far below its source counts as a silent stream.
BATCH_INPUTS = ("mixture", "sources", "mask", "example_mask")


@dataclasses.dataclass(frozen=True)
class PolicySettings:
  """Target levels (dB) to sweep and the confidence p of the dynamic rule."""

  target_dbs: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0)
  confidence: float = 0.9
  crossfade_ms: float = 10.0
  # The policy table (summary["policies"]): the dynamic rule over target_dbs x confidences,
  # every static exit, a seeded uniform policy, the oracle over target_dbs, and the
  # similarity criteria (exit_criteria) over similarity_dbs; regret at every target level.
  confidences: tuple[float, ...] = (0.5, 0.9)
  similarity_dbs: tuple[float, ...] = (10.0, 20.0)
  patience: int = 2
  uniform_seed: int = 0
  probabilities: str = "approximate"


def policy_table_criteria(policy: PolicySettings, num_exits: int) -> list[tuple[str, dict, Any]]:
  """(policy kind, its parameters, an exit_criteria criterion or None) for the table.

  Rows without a criterion: 'static' (exit_rule.static_policy), 'uniform'
  (exit_rule.uniform_policy) and 'oracle' (exit_rule.oracle_from_block_snr).
  """
  rows = []
  for target in policy.target_dbs:
    for confidence in policy.confidences:
      rows.append(("dynamic", {"target_db": target, "confidence": confidence},
                   exit_criteria.PressRule(target, confidence, method=policy.probabilities)))
  for e in range(1, num_exits + 1):
    rows.append(("static", {"exit": e}, None))
  rows.append(("uniform", {"seed": policy.uniform_seed}, None))
  for target in policy.target_dbs:
    rows.append(("oracle", {"target_db": target}, None))
  for threshold in policy.similarity_dbs:
    rows.append(("similarity", {"threshold_db": threshold},
                 exit_criteria.ConsecutiveSimilarity(threshold)))
    rows.append(("patience", {"threshold_db": threshold, "patience": policy.patience},
                 exit_criteria.Patience(policy.patience, threshold)))
  return rows


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """What `evaluate_batch` computes (static: fixed when the step is traced).

  `rows`: the policies, as (kind, parameters, criterion) from policy_table_criteria, plus a
  hidden ('dynamic', ...) row per target level at `PolicySettings.confidence` when that
  confidence is not among `confidences` (summary['dynamic'] reports it). Empty: no policies.
  """

  block_length: int
  crossfade: int
  gmac_per_exit: tuple[float, ...]
  rows: tuple[tuple[str, dict, Any], ...] = ()
  target_dbs: tuple[float, ...] = ()
  uniform_seed: int = 0
  with_calibration: bool = True
  with_sdr: bool = False

  def key(self) -> tuple:
    """A hashable equivalent (the rows' parameter dicts as item tuples): the step cache's key."""
    rows = tuple((kind, tuple(parameters.items()), criterion)
                 for kind, parameters, criterion in self.rows)
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows") + (
        rows,)


def make_plan(model: PressNet, gmac_per_exit: Sequence[float], policy: PolicySettings | None,
              with_calibration: bool = True, with_sdr: bool = False) -> tuple[EvalPlan, int]:
  """The plan and the number of its policy rows that belong to the table (the rest are hidden)."""
  config = model.config
  rows, table_rows = [], 0
  if policy is not None:
    rows = policy_table_criteria(policy, len(gmac_per_exit))
    table_rows = len(rows)
    for target in policy.target_dbs:
      if _row_index(rows, "dynamic", target_db=target, confidence=policy.confidence) is None:
        rows.append(("dynamic", {"target_db": target, "confidence": policy.confidence},
                     exit_criteria.PressRule(target, policy.confidence,
                                             method=policy.probabilities)))
  plan = EvalPlan(
      block_length=config.block_length,
      crossfade=(exit_rule.crossfade_samples(policy.crossfade_ms, config.sample_rate)
                 if policy is not None else 0),
      gmac_per_exit=tuple(float(g) for g in gmac_per_exit), rows=tuple(rows),
      target_dbs=tuple(policy.target_dbs) if policy is not None else (),
      uniform_seed=policy.uniform_seed if policy is not None else 0,
      with_calibration=with_calibration, with_sdr=with_sdr)
  return plan, table_rows


def _row_index(rows, kind: str, **parameters) -> int | None:
  """Index of the first row of `kind` whose parameters include `parameters`."""
  for index, (row_kind, row_parameters, _) in enumerate(rows):
    if row_kind == kind and all(row_parameters.get(k) == v for k, v in parameters.items()):
      return index
  return None


# ----------------------------------------------------------------------------------------------
# The per-batch function (one device's shard; jitted and data-parallel through parallel_step).
# ----------------------------------------------------------------------------------------------


def _per_exit_si_snr(means, sources, reference, mask):
  """(exits, batch) PIT SI-SNR and SI-SNRi averaged over speakers, and each exit's permutation.

  means (exits, batch, speakers, samples), sources (batch, speakers, samples), reference
  (batch, speakers): the mixture's SI-SNR against each source.
  """

  def one_exit(mean):
    values, permutation = metrics.pit_si_snr(mean, sources, mask)
    return values.mean(-1), (values - reference).mean(-1), permutation

  return jax.vmap(one_exit)(means)


def output_level_db(means, sources, mask, permutation):
  """(exits, batch, speakers) energy of each estimate over its PIT-matched source's, in dB.

  means (exits, batch, speakers, samples), sources (batch, speakers, samples), mask (batch,
  samples), permutation (exits, batch, speakers): the source index of each estimate; -inf for an
  all-zero estimate. A stream far below its source (SILENT_STREAM_DB) has stopped separating: the
  block likelihood's degenerate solution (docs/model.md, mixture consistency).
  """
  mask = mask.astype(means.dtype)
  aligned = jax.vmap(lambda p: jnp.take_along_axis(sources, p[:, :, None], axis=1))(permutation)
  output_energy = jnp.sum((means * mask[None, :, None, :]) ** 2, axis=-1)
  source_energy = jnp.sum((aligned * mask[None, :, None, :]) ** 2, axis=-1)
  ratio = output_energy / jnp.maximum(source_energy, jnp.finfo(means.dtype).tiny)
  return jnp.where(ratio > 0, 10.0 * jnp.log10(jnp.where(ratio > 0, ratio, 1.0)), -jnp.inf)


def block_pit_values(outputs, aligned_sources, mask, block_length: int, statistics=None):
  """PIT values (exits, batch, speakers, blocks) of every block and which blocks are valid.

  A block counts when it holds valid samples and its error energy is positive (a perfect block
  has no defined PIT value). `statistics`: calibration.block_error_statistics's result, when
  already computed.
  """
  if statistics is None:
    statistics = calibration.block_error_statistics(outputs, aligned_sources, mask,
                                                    block_length)
  error_energy, count = statistics
  count = count[None, :, None, :]
  values = calibration.pit_values(error_energy, count, outputs.log_var, outputs.log_alpha)
  return values, (count > 0) & (error_energy > 0)


def _uniform_exits(plan: EvalPlan, batch_index, num_exits: int, shape: tuple[int, int],
                   axis_name: str | None):
  """exit_rule.uniform_policy drawn for the whole global batch, this device's rows taken.

  The draw depends on the batch index and the global slot only, not on how the global batch is
  laid out over devices and processes.
  """
  key = jax.random.fold_in(jax.random.key(plan.uniform_seed), batch_index)
  if axis_name is None:
    return exit_rule.uniform_policy(key, num_exits, shape)
  devices = jax.lax.axis_size(axis_name)
  draws = exit_rule.uniform_policy(key, num_exits, (devices * shape[0],) + tuple(shape[1:]))
  return jax.lax.dynamic_slice_in_dim(draws, jax.lax.axis_index(axis_name) * shape[0],
                                      shape[0], axis=0)


def _policy_row_metrics(exit_index, *, outputs, sources, mask, reference, block_valid, block_snr,
                        plan: EvalPlan):
  """One policy's per-utterance SI-SNRi (batch,), cost (batch,) (mean GMAC/s over valid blocks),
  one-sided regret (targets, batch) and exit counts over valid blocks (batch, exits).

  exit_index (batch, blocks): the policy's exits.
  """
  num_exits, _, _, num_samples = outputs.mean.shape
  weights = exit_rule.splice_weights(exit_index, block_valid, num_exits, num_samples,
                                     plan.block_length, plan.crossfade)
  waveform = jnp.einsum("bes,ebjs->bjs", weights.astype(outputs.mean.dtype), outputs.mean,
                        preferred_element_type=outputs.mean.dtype)
  waveform = waveform * mask[:, None, :].astype(waveform.dtype)
  values, _ = metrics.pit_si_snr(waveform, sources, mask)
  si_snri = (values - reference).mean(-1)
  gmac = jnp.asarray(plan.gmac_per_exit, jnp.float32)
  cost = jax.vmap(lambda e, v: exit_rule.exit_cost(e, gmac, v))(exit_index, block_valid)
  chosen = exit_rule.chosen_block_snr(block_snr, exit_index)  # (batch, speakers, blocks)
  block_weights = jnp.broadcast_to(block_valid[:, None, :].astype(jnp.float32), chosen.shape)
  targets = jnp.asarray(plan.target_dbs, jnp.float32)
  regret = jax.vmap(lambda t: jax.vmap(exit_rule.one_sided_regret, in_axes=(0, None, 0))(
      chosen, t, block_weights))(targets)
  counts = jnp.sum(jax.nn.one_hot(exit_index, num_exits, dtype=jnp.int32)
                   * block_valid[..., None].astype(jnp.int32), axis=1)
  return si_snri, cost, regret, counts


def evaluate_batch(state: dict[str, Any], batch: dict[str, jax.Array], *, model: PressNet,
                   plan: EvalPlan, axis_name: str | None = step_lib.DATA_AXIS):
  """One device's batch: (sums, per-utterance arrays, per-block arrays).

  state: {'params', 'post_calibration' (calibration.PostCalibration or None), 'batch_index' ()
  int32 (the global batch's number, seeds the uniform policy)}, replicated.
  batch: mixture (b, L), sources (b, S, L), mask (b, L), example_mask (b,).
  Returns
    sums: {'utterances' (), 'si_snr' (E,), 'si_snri' (E,), 'silent_streams' (E,)} and with
      calibration {'calibration_blocks' (E,), 'crps' (E,)}, with policies {'blocks' (),
      'policy_si_snri' (R,), 'policy_cost' (R,) (GMAC/s x valid blocks), 'policy_regret' (R, T)
      (dB x valid blocks), 'exit_counts' (R, E)}: sums over the valid utterances, psum-ed over
      `axis_name` (the whole global batch);
    utterance: {'valid' (b,), 'si_snr' (b, E), 'si_snri' (b, E), 'level_db' (b, E, S)}, with
      policies 'blocks' (b,), 'policy_si_snri' (b, R), 'policy_cost' (b, R), 'policy_regret'
      (b, R, T), 'exit_counts' (b, R, E), with SDR 'estimates' (b, E, S, L);
    block (with calibration): 'pit', 'pit_valid', 'crps', 'error_energy', 'count', 'log_var',
      'log_alpha', each (b, E, S, blocks).
  """
  params, post_calibration = state["params"], state["post_calibration"]
  example_mask = batch["example_mask"]
  valid = (example_mask > 0) & (jnp.sum(batch["mask"], axis=-1) > 0)  # (b,)
  # Filler slots are zeroed: whatever they hold (even NaN) cannot reach a valid row's numbers.
  mask = jnp.where(valid[:, None], batch["mask"], 0.0)
  mixture = jnp.where(valid[:, None], batch["mixture"], 0.0)
  sources = jnp.where(valid[:, None, None], batch["sources"], 0.0)
  outputs = model.apply({"params": params}, mixture, mask)
  if post_calibration is not None:
    outputs = calibration.apply_post_calibration(outputs, post_calibration)
  num_exits, _, speakers, _ = outputs.mean.shape

  def total(values, where):
    """Sum over the batch axis (0) of `values` where `where` (broadcast from the left)."""
    where = jnp.reshape(where, where.shape + (1,) * (values.ndim - where.ndim))
    return jnp.sum(jnp.where(where, values, jnp.zeros_like(values)), axis=0)

  reference = metrics.si_snr(mixture[:, None, :], sources, mask[:, None, :])  # (b, S), once
  si_snr, si_snri, permutation = _per_exit_si_snr(outputs.mean, sources, reference, mask)
  level = jnp.moveaxis(output_level_db(outputs.mean, sources, mask, permutation), 0, 1)
  utterance = {"valid": valid, "si_snr": si_snr.T, "si_snri": si_snri.T, "level_db": level}
  sums = {"utterances": jnp.sum(valid.astype(jnp.int32)),
          "si_snr": total(si_snr.T, valid), "si_snri": total(si_snri.T, valid),
          "silent_streams": total(jnp.sum((level < SILENT_STREAM_DB).astype(jnp.int32), -1),
                                  valid)}
  # Targets aligned with the estimates by the last exit's permutation (the joint PIT).
  aligned = jnp.take_along_axis(sources, permutation[-1][:, :, None], axis=1)
  block = {}
  if plan.with_calibration:
    error_energy, count = calibration.block_error_statistics(outputs, aligned, mask,
                                                             plan.block_length)
    pit, pit_valid = block_pit_values(outputs, aligned, mask, plan.block_length,
                                      (error_energy, count))
    count = jnp.broadcast_to(count[None, :, None, :], error_energy.shape)
    crps = calibration.crps_db(error_energy, count, outputs.log_var, outputs.log_alpha)
    block = {name: jnp.moveaxis(value, 0, 1) for name, value in (
        ("pit", pit), ("pit_valid", pit_valid), ("crps", crps), ("error_energy", error_energy),
        ("count", count), ("log_var", outputs.log_var), ("log_alpha", outputs.log_alpha))}
    sums["calibration_blocks"] = jnp.sum(pit_valid.astype(jnp.int32), axis=(1, 2, 3))
    sums["crps"] = jnp.sum(jnp.where(pit_valid, crps, 0.0), axis=(1, 2, 3))
  if plan.rows:
    block_valid = block_sums(mask, None, plan.block_length) > 0  # (b, blocks)
    block_snr = exit_rule.block_exit_snr(outputs, aligned, mask, plan.block_length)  # Once.
    exits = []
    for kind, parameters, criterion in plan.rows:
      if criterion is not None:
        exits.append(exit_criteria.choose(criterion, outputs, mixture, mask,
                                          plan.block_length)[0])
      elif kind == "static":
        exits.append(exit_rule.static_policy(parameters["exit"] - 1, block_valid.shape))
      elif kind == "uniform":
        exits.append(_uniform_exits(plan, state["batch_index"], num_exits, block_valid.shape,
                                    axis_name))
      elif kind == "oracle":
        exits.append(exit_rule.oracle_from_block_snr(block_snr, parameters["target_db"]))
      else:
        raise ValueError(f"evaluate_batch: unknown policy row {kind!r}")
    # One policy at a time (lax.map): one copy of the splice and the PIT in the program, and
    # memory for one spliced waveform.
    policy_si_snri, cost, regret, counts = jax.lax.map(functools.partial(
        _policy_row_metrics, outputs=outputs, sources=sources, mask=mask, reference=reference,
        block_valid=block_valid, block_snr=block_snr, plan=plan), jnp.stack(exits))
    blocks = jnp.sum(block_valid.astype(jnp.int32), axis=-1)  # (b,); 0 for filler slots
    weight = blocks.astype(jnp.float32)
    policy_si_snri, cost = policy_si_snri.T, cost.T  # (b, R)
    regret, counts = jnp.moveaxis(regret, 2, 0), jnp.moveaxis(counts, 1, 0)  # (b, R, T|E)
    utterance.update(blocks=blocks, policy_si_snri=policy_si_snri, policy_cost=cost,
                     policy_regret=regret, exit_counts=counts)
    sums.update(blocks=jnp.sum(blocks), policy_si_snri=total(policy_si_snri, valid),
                policy_cost=total(cost * weight[:, None], valid),
                policy_regret=total(regret * weight[:, None, None], valid),
                exit_counts=total(counts, valid))
  if plan.with_sdr:
    utterance["estimates"] = jnp.moveaxis(outputs.mean, 0, 1)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums, utterance, block


# ----------------------------------------------------------------------------------------------
# The host side: accumulate, gather, summarise.
# ----------------------------------------------------------------------------------------------


def _local_rows(array: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of a global array sharded along axis 0, and their global row indices."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  rows = np.concatenate([np.asarray(shard.data) for shard in shards])
  index = np.concatenate([np.arange(shard.index[0].start or 0,
                                    (shard.index[0].start or 0) + shard.data.shape[0])
                          for shard in shards])
  return rows, index


def _gather(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenate every process's rows (axis 0): process_allgather, identity on one process."""
  if jax.process_count() == 1:
    return tree
  return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def with_example_mask(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """The model inputs of a loader batch and its example mask (all ones when it has none)."""
  local = {name: np.asarray(batch[name]) for name in ("mixture", "sources", "mask")}
  if "example_mask" in batch:
    local["example_mask"] = np.asarray(batch["example_mask"], np.float32)
  else:
    local["example_mask"] = np.ones(local["mask"].shape[:2], np.float32)
  return local


def above_static_curve(table: list[dict[str, Any]]) -> None:
  """Adds to each non-static row `above_static_db`: its SI-SNRi minus the static exits' curve
  (piecewise linear in GMAC/s) at the same GMAC/s; None outside the curve's range."""
  statics = sorted((r["gmac_per_s"], r["si_snri_db"]) for r in table if r["policy"] == "static")
  costs, values = np.array([c for c, _ in statics]), np.array([v for _, v in statics])
  for row in table:
    if row["policy"] == "static":
      continue
    inside = costs[0] - 1e-9 <= row["gmac_per_s"] <= costs[-1] + 1e-9
    row["above_static_db"] = (float(row["si_snri_db"] - np.interp(row["gmac_per_s"], costs,
                                                                  values))
                              if inside else None)


def _sdr_improvement(estimates: np.ndarray, batch: dict[str, np.ndarray],
                     valid: np.ndarray) -> np.ndarray:
  """(utterances, exits) mean PIT SDRi of each valid utterance on its valid samples (numpy
  BSS-eval, metrics.pit_sdr / metrics.sdr); 0 for invalid slots.

  estimates (utterances, exits, speakers, samples); batch: this process's flattened rows.
  """
  result = np.zeros(estimates.shape[:2])
  for index in np.flatnonzero(valid):
    length = int(batch["mask"][index].sum())
    sources = batch["sources"][index, :, :length]
    mixture = np.broadcast_to(batch["mixture"][index, :length], sources.shape)
    mixture_sdr = np.mean(metrics.sdr(mixture, sources))
    values, _ = metrics.pit_sdr(estimates[index, :, :, :length], sources)  # (exits, speakers)
    result[index] = values.mean(-1) - mixture_sdr
  return result


# One jitted step per (model, plan, mesh), shared by every Evaluator: a new jax.jit object per
# Evaluator traced and compiled the same program again for each (the main job's calibration
# study builds five evaluators of one model; each recompiled the step). The least recently
# used beyond MAX_CACHED_STEPS are dropped (a sweep in one process meets many models).
MAX_CACHED_STEPS = 16
_EVALUATION_STEPS: collections.OrderedDict[tuple, Any] = collections.OrderedDict()


def _evaluation_step(model: PressNet, plan: EvalPlan, mesh: Mesh):
  key = (model, plan.key(), mesh)
  if key in _EVALUATION_STEPS:
    _EVALUATION_STEPS.move_to_end(key)
  else:
    _EVALUATION_STEPS[key] = step_lib.parallel_step(
        functools.partial(evaluate_batch, model=model, plan=plan), mesh,
        out_specs=(PartitionSpec(), PartitionSpec(step_lib.DATA_AXIS),
                   PartitionSpec(step_lib.DATA_AXIS)))
    while len(_EVALUATION_STEPS) > MAX_CACHED_STEPS:
      _EVALUATION_STEPS.popitem(last=False)
  return _EVALUATION_STEPS[key]


class Evaluator:
  """Accumulates one pass of `evaluate_batch` over a split and summarises it.

  Build it once (the step is compiled on first use per batch shape) and call `run` for each
  evaluation, or `reset(params)`, `add(batch)` ... and `summary()`.

  `policy=None` evaluates the exits only (per-exit SI-SNR, SI-SNRi, silent streams: the
  trainer's validation); `with_calibration` adds the PIT / CRPS of the predicted error
  variance, `with_sdr` the SDRi (numpy, on the host). `post_calibration` (if given) is applied
  to every exit's predicted distribution before the exit rule and the calibration metrics.
  `gmac_per_exit` defaults to compute.exit_costs of the model. `mesh` defaults to the trainer's
  1-D data mesh over every device of every process.
  """

  def __init__(self, model: PressNet, params=None, gmac_per_exit: Sequence[float] | None = None,
               policy: PolicySettings | None = PolicySettings(), with_sdr: bool = False,
               post_calibration: calibration.PostCalibration | None = None, *,
               with_calibration: bool = True, mesh: Mesh | None = None):
    if gmac_per_exit is None:
      gmac_per_exit = [c.gmac_per_s for c in compute.exit_costs(model.config)]
    self.model, self.policy, self.with_sdr = model, policy, with_sdr
    self.with_calibration = with_calibration
    self.post_calibration = post_calibration
    self.gmac_per_exit = np.asarray(gmac_per_exit, np.float32)
    self.mesh = step_lib.data_mesh() if mesh is None else mesh
    self.plan, self._table_rows = make_plan(model, gmac_per_exit, policy, with_calibration,
                                            with_sdr)
    self._step = _evaluation_step(model, self.plan, self.mesh)
    self._fitted_shapes: set[tuple] = set()  # Batch shapes passed to allocator.fit_jitted.
    self._params = None
    self.reset(params)

  def reset(self, params=None) -> None:
    """Forget what was added; `params` (if given) are evaluated from now on."""
    if params is not None:
      # Without a post-calibration, the identity (adds zeros, exactly): one program for both.
      factors = self.post_calibration or calibration.identity_post_calibration(
          len(self.gmac_per_exit))
      self._params = jax.device_put({"params": params, "post_calibration": factors},
                                    step_lib.replicated(self.mesh))
    self._sums: dict[str, np.ndarray] | None = None
    self._utterances: list[dict[str, np.ndarray]] = []
    self._blocks: list[dict[str, np.ndarray]] = []
    self._pending = None
    self._batches = 0
    self._slots = 0  # Global utterance slots seen so far (filler slots included).
    self._gathered = None

  def add(self, batch: dict[str, Any]) -> None:
    """Evaluate one batch (dispatched now; its results are read when the next one is)."""
    if self._params is None:
      raise ValueError("Evaluator.add: no parameters; pass them to Evaluator(...) or reset()")
    local = with_example_mask(batch)
    state = dict(self._params, batch_index=jax.device_put(
        np.int32(self._batches), step_lib.replicated(self.mesh)))
    inputs = step_lib.global_batch(self.mesh, local, BATCH_INPUTS)
    shape = tuple(sorted((name, tuple(value.shape)) for name, value in inputs.items()))
    if shape not in self._fitted_shapes and not allocator.large_blocks_mapped():
      # A program with a multi-GiB temporary buffer run batch after batch: host blocks that
      # large are mapped per call (press_jax/allocator.py); compiled once, then reused.
      allocator.fit_jitted(self._step, state, inputs)
      self._fitted_shapes.add(shape)
    outputs = self._step(state, inputs)
    self._collect()
    self._pending = (outputs, local)
    self._batches += 1
    self._gathered = None

  def _collect(self) -> None:
    """Read the pending batch's results: global sums, and this process's rows."""
    if self._pending is None:
      return
    (sums, utterance, block), local = self._pending
    self._pending = None
    sums = jax.device_get(sums)
    sums = {k: np.asarray(v, np.float64 if np.asarray(v).dtype.kind == "f" else np.int64)
            for k, v in sums.items()}
    self._sums = sums if self._sums is None else {k: self._sums[k] + sums[k] for k in sums}
    rows = {}
    for name, value in utterance.items():
      rows[name], index = _local_rows(value)
    slot = self._slots + index
    self._slots += utterance["valid"].shape[0]
    if self.with_sdr:
      flat = {name: value.reshape((-1,) + value.shape[2:]) for name, value in local.items()}
      rows["sdri"] = _sdr_improvement(rows.pop("estimates"), flat, rows["valid"])
    self._utterances.append(dict(rows, slot=slot))
    if block:
      per_block = {}
      for name, value in block.items():
        value, _ = _local_rows(value)  # (b, E, S, blocks) -> (b * S * blocks, E)
        per_block[name] = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1])
      per_block["slot"] = np.repeat(slot, block["pit"].shape[2] * block["pit"].shape[3])
      self._blocks.append(per_block)

  def _gather_rows(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every process's per-utterance and per-block rows, in global slot order (collective)."""
    if self._gathered is None:
      concatenate = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      utterances = _gather(concatenate(self._utterances))
      blocks = _gather(concatenate(self._blocks)) if self._blocks else {}
      order = np.argsort(utterances["slot"], kind="stable")
      utterances = {k: v[order] for k, v in utterances.items()}
      if blocks:
        order = np.argsort(blocks["slot"], kind="stable")
        blocks = {k: v[order] for k, v in blocks.items()}
      self._gathered = (utterances, blocks)
    return self._gathered

  def run(self, batches: Iterable[dict[str, Any]], params=None,
          max_batches: int | None = None) -> dict[str, Any]:
    """reset(params), add (at most `max_batches` of) `batches`, and summarise."""
    self.reset(params)
    for index, batch in enumerate(batches):
      if max_batches is not None and index >= max_batches:
        break
      self.add(batch)
    return self.summary()

  def per_utterance(self) -> dict[str, np.ndarray]:
    """The valid utterances' per-utterance arrays (global order), e.g. 'si_snri' (N, exits)."""
    self._collect()
    self._check_not_empty()
    utterances, _ = self._gather_rows()
    keep = utterances["valid"]
    return {k: v[keep] for k, v in utterances.items() if k != "valid"}

  def block_statistics(self) -> dict[str, np.ndarray]:
    """The valid blocks' error energy, length, log_var and log_alpha, each (exits, blocks).

    A block counts where it is valid (holds samples, positive error energy) at every exit.
    What calibration.fit_post_calibration takes.
    """
    if not self.with_calibration:
      raise ValueError("Evaluator.block_statistics needs with_calibration=True")
    self._collect()
    self._check_not_empty()
    _, blocks = self._gather_rows()
    keep = np.all(blocks["pit_valid"], axis=-1)
    return {name: blocks[name][keep].T.astype(np.float32)
            for name in ("error_energy", "count", "log_var", "log_alpha")}

  def _check_not_empty(self) -> None:
    if self._sums is None or int(self._sums["utterances"]) == 0:
      raise ValueError("Evaluator.summary: no utterance was evaluated")

  def _policy_row(self, index: int) -> dict[str, Any]:
    """Means over the split of policy row `index`: SI-SNRi, GMAC/s, mean exit, regret."""
    sums = self._sums
    blocks = max(float(sums["blocks"]), 1.0)
    counts = sums["exit_counts"][index]
    return {"si_snri_db": float(sums["policy_si_snri"][index] / sums["utterances"]),
            "gmac_per_s": float(sums["policy_cost"][index] / blocks),
            "mean_exit": float(np.sum(counts * np.arange(1, len(counts) + 1))
                               / max(counts.sum(), 1)),
            "regret_db": {f"{t:g}": float(sums["policy_regret"][index, i] / blocks)
                          for i, t in enumerate(self.plan.target_dbs)},
            "exit_histogram": counts.astype(int).tolist()}

  def policy_table(self) -> list[dict[str, Any]]:
    """One row per policy: mean SI-SNRi (per utterance), GMAC/s and regret (per valid block)."""
    table = []
    for index, (kind, parameters, _) in enumerate(self.plan.rows[:self._table_rows]):
      row = self._policy_row(index)
      del row["exit_histogram"]
      table.append({"policy": kind, **parameters, **row})
    above_static_curve(table)
    return table

  def _dynamic(self) -> list[dict[str, Any]]:
    """The dynamic rule at PolicySettings.confidence per target, beside the oracle and statics."""
    rows, dynamic = self.plan.rows, []
    for target in self.plan.target_dbs:
      key = f"{target:g}"
      chosen = self._policy_row(_row_index(rows, "dynamic", target_db=target,
                                           confidence=self.policy.confidence))
      oracle = self._policy_row(_row_index(rows, "oracle", target_db=target))
      statics = [self._policy_row(_row_index(rows, "static", exit=e + 1))
                 for e in range(len(self.gmac_per_exit))]
      dynamic.append({
          "target_db": target, "confidence": self.policy.confidence,
          "si_snri_db": chosen["si_snri_db"], "gmac_per_s": chosen["gmac_per_s"],
          "mean_exit": chosen["mean_exit"], "regret_db": chosen["regret_db"][key],
          "oracle_gmac_per_s": oracle["gmac_per_s"],
          "oracle_regret_db": oracle["regret_db"][key],
          "static_regret_db": [s["regret_db"][key] for s in statics],
          "exit_histogram": chosen["exit_histogram"]})
    return dynamic

  def summary(self) -> dict[str, Any]:
    """Means over all valid utterances (and over all valid blocks for compute and regret)."""
    self._collect()
    self._check_not_empty()
    sums = self._sums
    utterances, blocks = self._gather_rows()
    count = int(sums["utterances"])
    speakers = utterances["level_db"].shape[-1]
    valid = utterances["valid"]
    per_exit = []
    for e in range(len(self.gmac_per_exit)):
      entry = {"exit": e + 1,
               "si_snr_db": float(sums["si_snr"][e] / count),
               "si_snri_db": float(sums["si_snri"][e] / count),
               "gmac_per_s": float(self.gmac_per_exit[e])}
      if self.with_sdr:
        entry["sdri_db"] = float(np.mean(utterances["sdri"][valid, e]))
      entry["silent_stream_fraction"] = float(sums["silent_streams"][e] / (count * speakers))
      if self.with_calibration:
        pit = blocks["pit"][:, e][blocks["pit_valid"][:, e]]
        entry["calibration"] = {
            "blocks": int(sums["calibration_blocks"][e]),
            "pit_ks": calibration.ks_distance(pit),
            "crps_db": float(sums["crps"][e] / max(int(sums["calibration_blocks"][e]), 1)),
            "pit_histogram": calibration.pit_histogram(pit).tolist()}
      per_exit.append(entry)
    result = {"utterances": count, "per_exit": per_exit}
    if self.policy is not None:
      result["dynamic"] = self._dynamic()
      result["policies"] = self.policy_table()
    return result


def evaluate(model: PressNet, params, batches: Iterable[dict[str, Any]],
             gmac_per_exit: Sequence[float] | None = None,
             policy: PolicySettings | None = PolicySettings(), with_sdr: bool = False,
             max_batches: int | None = None,
             post_calibration: calibration.PostCalibration | None = None, *,
             with_calibration: bool = True, mesh: Mesh | None = None) -> dict[str, Any]:
  """Run an Evaluator over (at most `max_batches` of) `batches` and summarise."""
  evaluator = Evaluator(model, params, gmac_per_exit, policy, with_sdr, post_calibration,
                        with_calibration=with_calibration, mesh=mesh)
  return evaluator.run(batches, max_batches=max_batches)
