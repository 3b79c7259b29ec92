"""Evaluation of a trained PRESS-Net over an iterator: per-exit quality and exit policies.

Batches are this host's numpy dicts as the loaders produce them: 'mixture' (devices, batch,
samples), 'sources' (devices, batch, speakers, samples), 'mask', and optionally 'example_mask'
(devices, batch) marking filler slots. Reported per exit: PIT SI-SNR / SI-SNRi (and SDRi with
`with_sdr`), and the calibration of the predicted error variance (KS distance of the PIT values
to uniform, their histogram; docs/probabilistic.md); per target level t: the dynamic policy's SI-SNRi, mean GMAC/s, mean exit and
one-sided regret, beside the oracle's and the static exits' regret (SPEC §4).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from press_jax import calibration, exit_criteria, exit_rule, metrics
from press_jax.models.press_net import PressNet


SILENT_STREAM_DB = -30.0  # An estimate this far below its source counts as a silent stream.


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
  """(policy kind, its parameters, an exit_criteria criterion or None) for the table."""
  rows = []
  for target in policy.target_dbs:
    for confidence in policy.confidences:
      rows.append(("dynamic", {"target_db": target, "confidence": confidence},
                   exit_criteria.PressRule(target, confidence, method=policy.probabilities)))
  for e in range(1, num_exits + 1):
    rows.append(("static", {"exit": e}, exit_criteria.FixedDepth(e)))
  rows.append(("uniform", {"seed": policy.uniform_seed}, None))
  for target in policy.target_dbs:
    rows.append(("oracle", {"target_db": target}, None))
  for threshold in policy.similarity_dbs:
    rows.append(("similarity", {"threshold_db": threshold},
                 exit_criteria.ConsecutiveSimilarity(threshold)))
    rows.append(("patience", {"threshold_db": threshold, "patience": policy.patience},
                 exit_criteria.Patience(policy.patience, threshold)))
  return rows


def policy_metrics(outputs, exit_index, block_valid, sources, mixture, mask, block_snr,
                   gmac_per_exit, target_dbs, *, block_length: int, crossfade: int):
  """Per utterance: SI-SNRi of the spliced waveform, mean GMAC/s over valid blocks, and the
  one-sided regret at every target level ((targets, batch)), all by exit_rule's functions."""
  weights = exit_rule.splice_weights(exit_index, block_valid, outputs.num_exits,
                                     mask.shape[-1], block_length, crossfade)
  waveform = jnp.einsum("bes,ebjs->bjs", weights, outputs.mean) * mask[:, None, :]
  values, _ = metrics.pit_si_snr(waveform, sources, mask)
  reference = metrics.si_snr(mixture[:, None, :], sources, mask[:, None, :])
  si_snri = (values - reference).mean(-1)
  cost = jax.vmap(lambda e, v: exit_rule.exit_cost(e, gmac_per_exit, v))(exit_index, block_valid)
  chosen = exit_rule.chosen_block_snr(block_snr, exit_index)  # (batch, speakers, blocks)
  weights = jnp.broadcast_to(block_valid[:, None, :].astype(jnp.float32), chosen.shape)
  regret = jax.vmap(lambda t: jax.vmap(exit_rule.one_sided_regret, in_axes=(0, None, 0))(
      chosen, t, weights))(target_dbs)
  return si_snri, cost, regret


def flatten_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """(devices, batch, ...) -> (devices * batch, ...), filler slots removed."""
  flat = {name: np.asarray(batch[name]).reshape(-1, *np.shape(batch[name])[2:])
          for name in ("mixture", "sources", "mask")}
  if "example_mask" in batch:
    keep = np.asarray(batch["example_mask"]).reshape(-1) > 0
    flat = {name: value[keep] for name, value in flat.items()}
  return flat


class Evaluator:
  """Accumulates per-utterance metrics of every exit and of the exit policies."""

  def __init__(self, model: PressNet, params, gmac_per_exit: Sequence[float],
               policy: PolicySettings = PolicySettings(), with_sdr: bool = False,
               post_calibration: calibration.PostCalibration | None = None):
    """`post_calibration` (if given) is applied to every exit's predicted distribution before
    the exit rule and the calibration metrics."""
    self.model, self.params, self.policy, self.with_sdr = model, params, policy, with_sdr
    self.post_calibration = post_calibration
    self.gmac_per_exit = np.asarray(gmac_per_exit, np.float32)
    config = model.config
    self._forward = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    self._per_exit = jax.jit(_per_exit_si_snr)
    self._level = jax.jit(output_level_db)
    self._block_snr = jax.jit(lambda o, s, m: exit_rule.block_exit_snr(
        o, s, m, config.block_length))
    self._pit = jax.jit(lambda o, s, m: block_pit_values(o, s, m, config.block_length))
    self._statistics = jax.jit(lambda o, s, m: calibration.block_error_statistics(
        o, s, m, config.block_length))
    self._crps = jax.jit(calibration.crps_db)
    self._policy_metrics = jax.jit(functools.partial(
        policy_metrics, block_length=config.block_length,
        crossfade=exit_rule.crossfade_samples(policy.crossfade_ms, config.sample_rate)))
    self._criteria = policy_table_criteria(policy, len(self.gmac_per_exit))
    self._choose = {
        index: jax.jit(functools.partial(exit_criteria.choose, criterion,
                                         block_length=config.block_length))
        for index, (_, _, criterion) in enumerate(self._criteria) if criterion is not None}
    self._oracle = jax.jit(lambda o, s, m, t: exit_rule.oracle_policy(o, s, m,
                                                                     config.block_length, t))
    self._uniform_key = jax.random.key(policy.uniform_seed)
    self._batches = 0
    # Per policy of the table: per-utterance si_snri, cost, regret (targets,), block counts.
    self.policy_rows: list[list[dict[str, np.ndarray]]] = [[] for _ in self._criteria]
    self.rows: list[dict[str, Any]] = []
    self.pit_values: list[list[np.ndarray]] = [[] for _ in self.gmac_per_exit]  # Valid blocks.
    self.crps_values: list[list[np.ndarray]] = [[] for _ in self.gmac_per_exit]
    # Per exit, the valid blocks' (error energy, length, log_var, log_alpha): what
    # calibration.fit_post_calibration needs (block_statistics()).
    self.blocks: list[list[np.ndarray]] = [[] for _ in self.gmac_per_exit]

  def add(self, batch: dict[str, Any]) -> None:
    """Evaluate one batch."""
    flat = flatten_batch(batch)
    if not len(flat["mixture"]):
      return
    config = self.model.config
    mixture, sources, mask = (jnp.asarray(flat[k]) for k in ("mixture", "sources", "mask"))
    outputs = self._forward(self.params, mixture, mask)
    if self.post_calibration is not None:
      outputs = calibration.apply_post_calibration(outputs, self.post_calibration)
    si_snr, si_snri, permutation = self._per_exit(outputs.mean, sources, mixture, mask)
    si_snr, si_snri = np.asarray(si_snr), np.asarray(si_snri)  # (exits, batch)
    level_db = np.asarray(self._level(outputs.mean, sources, mask, permutation))
    # Targets aligned with the last exit's estimates, for the block SNRs of the policies.
    aligned = jnp.take_along_axis(sources, permutation[-1][:, :, None], axis=1)
    block_snr = self._block_snr(outputs, aligned, mask)  # (exits, batch, speakers, blocks)
    pit, pit_valid = (np.asarray(x) for x in self._pit(outputs, aligned, mask))
    error_energy, count = self._statistics(outputs, aligned, mask)
    count = jnp.broadcast_to(count[None, :, None, :], error_energy.shape)
    crps = np.asarray(self._crps(error_energy, count, outputs.log_var, outputs.log_alpha))
    statistics = np.stack([np.asarray(error_energy), np.asarray(count),
                           np.asarray(outputs.log_var), np.asarray(outputs.log_alpha)], axis=-1)
    for e, values in enumerate(pit):
      self.pit_values[e].append(values[pit_valid[e]])
      self.crps_values[e].append(crps[e][pit_valid[e]])
      self.blocks[e].append(statistics[e][pit_valid[e]])
    sdri = self._sdr_improvement(outputs, flat) if self.with_sdr else None
    self._add_policy_table(outputs, mixture, sources, mask, aligned, block_snr)
    policy_rows = []
    for target_db in self.policy.target_dbs:
      selection = exit_rule.select_exits(
          outputs, mixture, mask, block_length=config.block_length, target_db=target_db,
          confidence=self.policy.confidence, sample_rate=config.sample_rate,
          crossfade_ms=self.policy.crossfade_ms)
      dynamic_values, _ = metrics.pit_si_snr(selection.waveform, sources, mask)
      mixture_values = metrics.si_snr(mixture[:, None, :], sources, mask[:, None, :])
      oracle = exit_rule.oracle_policy(outputs, aligned, mask, config.block_length, target_db)
      policy_rows.append({
          "target_db": target_db,
          "si_snri": np.asarray((dynamic_values - mixture_values).mean(-1)),
          "exit_index": np.asarray(selection.exit_index),
          "block_valid": np.asarray(selection.block_valid),
          "regret": _regret(block_snr, selection.exit_index, selection.block_valid, target_db),
          "oracle_exit_index": np.asarray(oracle),
          "oracle_regret": _regret(block_snr, oracle, selection.block_valid, target_db),
          "static_regret": [
              _regret(block_snr, jnp.full_like(oracle, e), selection.block_valid, target_db)
              for e in range(outputs.num_exits)],
      })
    for index in range(len(flat["mixture"])):
      row = {"si_snr": si_snr[:, index], "si_snri": si_snri[:, index],
             "level_db": level_db[:, index],
             "policies": [{key: (value[index] if isinstance(value, np.ndarray) else
                                 [v[index] for v in value] if isinstance(value, list) else value)
                           for key, value in policy.items()} for policy in policy_rows]}
      if sdri is not None:
        row["sdri"] = sdri[:, index]
      self.rows.append(row)

  def _add_policy_table(self, outputs, mixture, sources, mask, aligned, block_snr):
    targets = jnp.asarray(self.policy.target_dbs, jnp.float32)
    gmac = jnp.asarray(self.gmac_per_exit)
    block_valid = None
    for index, (kind, parameters, criterion) in enumerate(self._criteria):
      if criterion is not None:
        exit_index, block_valid = self._choose[index](outputs, mixture, mask)
      elif kind == "uniform":
        key = jax.random.fold_in(self._uniform_key, self._batches)
        exit_index = exit_rule.uniform_policy(key, outputs.num_exits, block_valid.shape)
      else:  # oracle
        exit_index = self._oracle(outputs, aligned, mask, parameters["target_db"])
      si_snri, cost, regret = self._policy_metrics(outputs, exit_index, block_valid, sources,
                                                   mixture, mask, block_snr, gmac, targets)
      self.policy_rows[index].append({
          "si_snri": np.asarray(si_snri), "cost": np.asarray(cost),
          "regret": np.asarray(regret).T, "blocks": np.asarray(block_valid).sum(-1),
          "exits": np.asarray(exit_index)[np.asarray(block_valid)]})
    self._batches += 1

  @staticmethod
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

  def policy_table(self) -> list[dict[str, Any]]:
    """One row per policy: mean SI-SNRi (per utterance), GMAC/s and regret (per valid block)."""
    table = []
    for (kind, parameters, _), rows in zip(self._criteria, self.policy_rows):
      si_snri = np.concatenate([r["si_snri"] for r in rows])
      blocks = np.concatenate([r["blocks"] for r in rows]).astype(np.float64)
      weights = blocks / max(blocks.sum(), 1.0)
      cost = np.concatenate([r["cost"] for r in rows])
      regret = np.concatenate([r["regret"] for r in rows])  # (utterances, targets)
      exits = np.concatenate([r["exits"] for r in rows])
      table.append({
          "policy": kind, **parameters, "si_snri_db": float(si_snri.mean()),
          "gmac_per_s": float(np.sum(weights * cost)), "mean_exit": float(exits.mean() + 1),
          "regret_db": {f"{t:g}": float(np.sum(weights * regret[:, i]))
                        for i, t in enumerate(self.policy.target_dbs)}})
    self.above_static_curve(table)
    return table

  def block_statistics(self) -> dict[str, np.ndarray]:
    """The valid blocks' error energy, length, log_var and log_alpha, each (exits, blocks)."""
    stacked = np.stack([np.concatenate(per_exit) for per_exit in self.blocks])
    return {"error_energy": stacked[..., 0], "count": stacked[..., 1],
            "log_var": stacked[..., 2], "log_alpha": stacked[..., 3]}

  def _sdr_improvement(self, outputs, flat) -> np.ndarray:
    """(exits, batch) mean PIT SDRi, per utterance on its valid samples (numpy BSS-eval)."""
    means = np.asarray(outputs.mean)
    result = np.zeros(means.shape[:2])
    for index in range(means.shape[1]):
      length = int(flat["mask"][index].sum())
      sources = flat["sources"][index, :, :length]
      mixture = np.broadcast_to(flat["mixture"][index, :length], sources.shape)
      for exit_index in range(means.shape[0]):
        result[exit_index, index] = float(np.mean(metrics.pit_sdr(
            means[exit_index, index, :, :length], sources)[0]) - np.mean(
                metrics.sdr(mixture, sources)))
    return result

  def summary(self) -> dict[str, Any]:
    """Means over all utterances (and over all valid blocks for compute and regret)."""
    if not self.rows:
      raise ValueError("Evaluator.summary: no utterance was evaluated")
    per_exit = []
    for e in range(len(self.gmac_per_exit)):
      entry = {"exit": e + 1,
               "si_snr_db": float(np.mean([r["si_snr"][e] for r in self.rows])),
               "si_snri_db": float(np.mean([r["si_snri"][e] for r in self.rows])),
               "gmac_per_s": float(self.gmac_per_exit[e])}
      if "sdri" in self.rows[0]:
        entry["sdri_db"] = float(np.mean([r["sdri"][e] for r in self.rows]))
      levels = np.concatenate([r["level_db"][e] for r in self.rows])
      entry["silent_stream_fraction"] = float(np.mean(levels < SILENT_STREAM_DB))
      pit = np.concatenate(self.pit_values[e])
      entry["calibration"] = {"blocks": int(pit.size), "pit_ks": calibration.ks_distance(pit),
                              "crps_db": float(np.mean(np.concatenate(self.crps_values[e]))),
                              "pit_histogram": calibration.pit_histogram(pit).tolist()}
      per_exit.append(entry)
    dynamic = []
    for t_index, target_db in enumerate(self.policy.target_dbs):
      policies = [r["policies"][t_index] for r in self.rows]
      exits = np.concatenate([p["exit_index"][p["block_valid"]] for p in policies])
      oracle_exits = np.concatenate([p["oracle_exit_index"][p["block_valid"]] for p in policies])
      blocks = np.array([p["block_valid"].sum() for p in policies], np.float64)
      weights = blocks / blocks.sum()
      dynamic.append({
          "target_db": target_db, "confidence": self.policy.confidence,
          "si_snri_db": float(np.mean([p["si_snri"] for p in policies])),
          "gmac_per_s": float(self.gmac_per_exit[exits].mean()),
          "mean_exit": float(exits.mean() + 1),
          "regret_db": float(np.sum(weights * [p["regret"] for p in policies])),
          "oracle_gmac_per_s": float(self.gmac_per_exit[oracle_exits].mean()),
          "oracle_regret_db": float(np.sum(weights * [p["oracle_regret"] for p in policies])),
          "static_regret_db": [float(np.sum(weights * [p["static_regret"][e] for p in policies]))
                               for e in range(len(self.gmac_per_exit))],
          "exit_histogram": np.bincount(exits, minlength=len(self.gmac_per_exit)).tolist(),
      })
    return {"utterances": len(self.rows), "per_exit": per_exit, "dynamic": dynamic,
            "policies": self.policy_table()}


def _per_exit_si_snr(means, sources, mixture, mask):
  """(exits, batch) PIT SI-SNR and SI-SNRi averaged over speakers, and each exit's permutation."""
  reference = metrics.si_snr(mixture[:, None, :], sources, mask[:, None, :])

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


def block_pit_values(outputs, aligned_sources, mask, block_length: int):
  """PIT values (exits, batch, speakers, blocks) of every block and which blocks are valid.

  A block counts when it holds valid samples and its error energy is positive (a perfect block
  has no defined PIT value).
  """
  error_energy, count = calibration.block_error_statistics(outputs, aligned_sources, mask,
                                                          block_length)
  count = count[None, :, None, :]
  values = calibration.pit_values(error_energy, count, outputs.log_var, outputs.log_alpha)
  return values, (count > 0) & (error_energy > 0)


def _regret(block_snr, exit_index, block_valid, target_db) -> np.ndarray:
  """Per-utterance one-sided regret of a choice: mean over valid blocks and speakers."""
  chosen = exit_rule.chosen_block_snr(block_snr, exit_index)  # (batch, speakers, blocks)
  weights = jnp.broadcast_to(jnp.asarray(block_valid, jnp.float32)[:, None, :], chosen.shape)
  shortfall = jnp.maximum(0.0, target_db - chosen) * weights
  return np.asarray(shortfall.sum((1, 2)) / jnp.maximum(weights.sum((1, 2)), 1.0))


def evaluate(model: PressNet, params, batches: Iterable[dict[str, Any]],
             gmac_per_exit: Sequence[float], policy: PolicySettings = PolicySettings(),
             with_sdr: bool = False, max_batches: int | None = None,
             post_calibration: calibration.PostCalibration | None = None) -> dict[str, Any]:
  """Run an Evaluator over (at most `max_batches` of) `batches` and summarise."""
  evaluator = Evaluator(model, params, gmac_per_exit, policy, with_sdr, post_calibration)
  for index, batch in enumerate(batches):
    if max_batches is not None and index >= max_batches:
      break
    evaluator.add(batch)
  return evaluator.summary()
