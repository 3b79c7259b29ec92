"""The optimiser of SPEC §9: AdamW, warm-up then linear decay, global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with a linear warm-up / linear decay schedule; decay only on kernels."""

  peak_learning_rate: float = 5e-4
  warmup_steps: int = 5000
  total_steps: int = 200_000  # Optimiser updates; the rate decays linearly to 0 at this step.
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  accumulation_steps: int = 1  # Average gradients over this many batches per update.

  def __post_init__(self):
    if self.peak_learning_rate <= 0:
      raise ValueError(f"OptimizerConfig.peak_learning_rate must be > 0, got "
                       f"{self.peak_learning_rate}")
    if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"OptimizerConfig: need 0 <= warmup_steps ({self.warmup_steps}) <= "
                       f"total_steps ({self.total_steps}) and total_steps >= 1")
    if self.accumulation_steps < 1:
      raise ValueError(f"OptimizerConfig.accumulation_steps must be >= 1, got "
                       f"{self.accumulation_steps}")


# Re-plans are data, not program: the step takes them as a (MAX_REPLANS, 3) table, so a re-plan
# changes an input instead of recompiling the step (a re-plan used to cost one compilation of
# the training step, ~10-20 s of a time-bounded run each; the demo re-planned up to six times).
MAX_REPLANS = 64


def learning_rate_schedule(config: OptimizerConfig,
                           replans: tuple[tuple[int, int], ...] = ()) -> optax.Schedule:
  """Linear 0 -> peak over warmup_steps, then linear peak -> 0 at total_steps.

  `replans`: ((update, total), ...), each a new plan from `update` on: the rate decays
  linearly from its value at `update` to 0 at `total` (the trainer's `anneal_to_time_limit`
  writes them when the time limit would cut the run, or leave time unused after an earlier
  re-plan; docs/training.md). Updates strictly increasing, each total above its update and
  no later than `total_steps`. The same function as the optimiser's (`planned_learning_rate`
  on `replan_table`).
  """
  table = replan_table(config, replans)
  return lambda count: planned_learning_rate(config, table, count)


def _base_schedule(config: OptimizerConfig) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, config.peak_learning_rate, max(config.warmup_steps, 1))
  decay = optax.linear_schedule(config.peak_learning_rate, 0.0,
                                max(config.total_steps - config.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def planned_learning_rate(config: OptimizerConfig, table, count) -> jax.Array:
  """The rate at update `count` under a `replan_table`: the base schedule before the first
  re-plan's update; from the last re-plan whose update is <= count on, linear from that row's
  start rate to 0 at its total. Traceable in `table` and `count`."""
  table = jnp.asarray(table, jnp.float32)
  update, total, start = table[:, 0], table[:, 1], table[:, 2]
  position = jnp.asarray(count, jnp.float32)
  applied = jnp.sum(position >= update)  # Updates increase: the applied rows are a prefix.
  last = jnp.maximum(applied - 1, 0)
  fraction = jnp.clip((total[last] - position) / (total[last] - update[last]), 0.0, 1.0)
  return jnp.where(applied > 0, start[last] * fraction, _base_schedule(config)(count))


def replan_table(config: OptimizerConfig,
                 replans: tuple[tuple[int, int], ...] = ()) -> np.ndarray:
  """(MAX_REPLANS, 3) float32 rows (update, total, start rate at update under the rows before);
  unused rows (inf, inf, 0) never apply. ValueError for bad re-plans or more than MAX_REPLANS."""
  replans = check_replans(replans, config.total_steps)
  if len(replans) > MAX_REPLANS:
    raise ValueError(f"{len(replans)} learning-rate re-plans: at most {MAX_REPLANS}")
  table = np.tile(np.array([np.inf, np.inf, 0.0], np.float32), (MAX_REPLANS, 1))
  for row, (update, total) in enumerate(replans):
    start = float(planned_learning_rate(config, table, update))
    table[row] = (update, total, start)
  return table


def check_replans(replans, total_steps: int) -> tuple[tuple[int, int], ...]:
  """`replans` as a tuple of int pairs; ValueError naming the first bad one."""
  result, previous_update = [], -1
  for pair in replans:
    update, total = (int(v) for v in pair)
    if not previous_update < update < total <= int(total_steps):
      raise ValueError(
          f"learning-rate re-plan {tuple(pair)}: need earlier update ({previous_update}) < "
          f"update < total <= the configured total_steps ({int(total_steps)})")
    result.append((update, total))
    previous_update = update
  return tuple(result)


def scale_by_planned_learning_rate(
    config: OptimizerConfig, replans: tuple[tuple[int, int], ...] = ()
) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate of `learning_rate_schedule`, with the re-plan table an input.

  `update(..., learning_rate_plan=table)` uses that `replan_table` (traced: a new plan needs no
  new program); without it, the table of `replans`. The state is scale_by_schedule's (the
  update count), so checkpoints of either form restore into the other.
  """
  default = replan_table(config, replans)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, learning_rate_plan=None, **extra_args):
    del params, extra_args
    table = default if learning_rate_plan is None else learning_rate_plan
    step_size = -planned_learning_rate(config, table, state.count)
    updates = jax.tree_util.tree_map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def decay_mask(params):
  """True for linear and convolution kernels (weight decay applies), False for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config: OptimizerConfig,
                   replans: tuple[tuple[int, int], ...] = ()) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule), wrapped in MultiSteps when accumulating.

  `replans` shorten the schedule (`learning_rate_schedule`); the state's layout does not depend
  on them, so a state of one plan continues under another. `update` takes the re-plans as data
  too (`learning_rate_plan=replan_table(...)`, what the trainer passes; it overrides `replans`).

  The optimiser state holds Adam's moments as one flat vector each (optax.flatten), not one
  array per parameter: checkpoints written before 2026-12-04 (per-array moments) do not restore
  into it.
  """
  # optax.adamw's three stages, with clipping and Adam on one flat vector (optax.flatten): the
  # same arithmetic per element, but a handful of large fused operations instead of a few per
  # parameter array — for the tiny preset's 80 arrays, 90 fusions instead of 449, 1.2 s instead
  # of 2.1-2.7 s to compile and no slower to run (2026-12-04). The masked decay and the learning
  # rate stay per array (they fuse with the parameter update).
  optimizer = optax.chain(
      optax.flatten(optax.chain(optax.clip_by_global_norm(config.clip_norm),
                                optax.scale_by_adam(b1=config.b1, b2=config.b2))),
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      scale_by_planned_learning_rate(config, replans))
  if config.accumulation_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulation_steps)
  return optimizer
