"""The training loop, in named stages: mesh, model, optimiser, state, data, loop, checkpoint.

The loop takes iterators (it never imports a dataset): `train_iterator` yields this host's batch
as numpy arrays {'mixture': (local_devices, per_device_batch, samples), 'sources':
(local_devices, per_device_batch, speakers, samples), 'mask': like mixture}; if it has
`get_state()` / `set_state()`, its position is checkpointed and restored too. `make_eval_iterator`
returns a fresh finite iterator of the same format for each evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from press_jax import allocator, checkpointing, evaluation, likelihoods, optim, summary
from press_jax import config as config_lib
from press_jax import train_step as step_lib
from press_jax.models import press_net

log = logging.getLogger("press_jax.train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run. `steps` counts batches; one optimiser update per `accumulation_steps`."""

  model: str = "tiny"  # Preset name.
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  loss: str = "student_t"  # student_t | gaussian | si_snr
  permutation: str = "joint"  # joint | per_exit
  exit_weights: tuple[float, ...] | None = None
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  steps: int = 200_000
  batch_size_per_device: int = 1
  seed: int = 0
  log_every: int = 50
  eval_every: int = 5000  # 0: never during training.
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  # Block until each checkpoint has committed, so a crash loses at most `checkpoint_every` steps.
  # False overlaps the write with training (a crash during a save then loses up to twice that).
  wait_for_checkpoints: bool = True
  max_consecutive_nonfinite: int = 20  # Stop with an error after this many skipped in a row.
  time_limit_s: float | None = None  # Checkpoint and stop after this much wall time.
  # With a time limit: when the measured rate says the run will not reach `steps` in time,
  # shorten the plan so the learning rate still decays to 0 at the last step that fits
  # (re-planned at log steps, recorded in <workdir>/schedule.json; docs/training.md).
  anneal_to_time_limit: bool = False
  init_from: str | None = None  # Work directory whose latest params start this run.
  remat: bool = False  # Recompute activations in the backward pass (less memory; on CPU faster).
  # The model's compute dtype for this run (PressConfig.dtype): None keeps the preset's
  # (float32); 'auto' is bfloat16 on an accelerator and float32 on CPU, resolved by `train` on
  # the machine that trains; or 'float32' / 'bfloat16' / 'float16'. Not together with
  # model_overrides['dtype'].
  compute_dtype: str | None = None

  def __post_init__(self):
    for name in ("steps", "batch_size_per_device", "log_every", "checkpoint_every",
                 "keep_checkpoints", "max_consecutive_nonfinite"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_every < 0:
      raise ValueError(f"TrainConfig.eval_every must be >= 0, got {self.eval_every}")
    if self.compute_dtype is not None:
      if self.compute_dtype != "auto" and self.compute_dtype not in config_lib.DTYPES:
        raise ValueError(f"TrainConfig.compute_dtype must be None, 'auto' or one of "
                         f"{config_lib.DTYPES}, got {self.compute_dtype!r}")
      if "dtype" in self.model_overrides:
        raise ValueError(
            f"TrainConfig: compute_dtype={self.compute_dtype!r} and model_overrides['dtype']="
            f"{self.model_overrides['dtype']!r} both set the model's dtype; set compute_dtype "
            "only")
    updates = self.steps // self.optimizer.accumulation_steps
    if self.optimizer.total_steps > max(updates, 1):
      raise ValueError(
          f"TrainConfig: optimizer.total_steps ({self.optimizer.total_steps}) exceeds the "
          f"optimiser updates of the run ({updates} = steps / accumulation_steps); the "
          "learning rate would never decay to 0")

  def model_config(self, resolve: bool = False) -> config_lib.PressConfig:
    """The PressConfig of `model` with `model_overrides` (and `compute_dtype`, if set).

    `resolve`: with dtype 'auto' resolved for this machine's JAX backend (bfloat16 on an
    accelerator, float32 on CPU), as `train` builds it. Without it the config keeps 'auto' and
    the backend is not touched (a sweep's launcher validates configs this way).
    """
    overrides = dict(self.model_overrides)
    if self.compute_dtype is not None:
      overrides["dtype"] = self.compute_dtype
    config = config_lib.preset(self.model, **overrides)
    return config.resolved() if resolve else config

  def loss_config(self) -> likelihoods.LossConfig:
    return likelihoods.LossConfig(
        kind=self.loss, block_length=self.model_config().block_length,
        exit_weights=self.exit_weights, permutation=self.permutation)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    values = dict(values)
    values["optimizer"] = optim.OptimizerConfig(**values.get("optimizer", {}))
    if values.get("exit_weights") is not None:
      values["exit_weights"] = tuple(values["exit_weights"])
    return cls(**values)


@dataclasses.dataclass
class TrainResult:
  """What a call to `train` did."""

  state: step_lib.TrainState
  history: list[dict[str, Any]]  # Per log step: means since the previous row; per evaluation.
  stopped_early: bool  # The time limit ended the run before its (possibly re-planned) steps.
  planned_steps: int = 0  # The steps the run was planned for at the end (`steps` or re-planned).
  replans: tuple[tuple[int, int], ...] = ()  # (update, total updates) of each re-plan.


SCHEDULE_FILE = "schedule.json"
REPLAN_MARGIN = 0.97  # Plan for this share of the projected steps (checkpoints, drift).
REPLAN_TOLERANCE = 0.98  # Shorten if the projection misses this share of the steps left.
# A shortened plan grows back (towards `steps`, at most MAX_GROWTHS times per call) when the
# projection exceeds it by this factor: a plan made at the first measured rates leaves time
# unused on a machine that then runs faster (the demo: 56 of its 540 s in session 11; 110 s in
# session 23, when one growth was allowed and the first epoch, read before the waveform cache
# held it, ran at ~9 steps/s and the rest at 12-14).
REPLAN_GROWTH = 1.05
GROWTH_ROWS = 4  # Log rows of measured rate since the last re-plan (or the compilation) before
# a plan may grow.
MAX_GROWTHS = 4


def read_schedule(workdir: str) -> dict[str, Any] | None:
  """<workdir>/schedule.json: {'steps', 'replans': [[update, total], ...]}, or None."""
  path = os.path.join(workdir, SCHEDULE_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as handle:
      plan = json.load(handle)
    return {"steps": int(plan["steps"]),
            "replans": tuple((int(u), int(t)) for u, t in plan["replans"])}
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ValueError(f"{path}: not a schedule plan ({error}); expected "
                     "{'steps': int, 'replans': [[update, total], ...]}") from error


def _write_schedule(workdir: str, steps: int, replans) -> None:
  path = os.path.join(workdir, SCHEDULE_FILE)
  with open(path + ".tmp", "w") as handle:
    json.dump({"steps": steps, "replans": [list(pair) for pair in replans]}, handle)
  os.replace(path + ".tmp", path)


def replanned_steps(step: int, rate: float, remaining_s: float) -> int:
  """The steps a run at `step` reaches at `rate` steps/s in `remaining_s`, with a margin."""
  return step + int(max(rate, 0.0) * max(remaining_s, 0.0) * REPLAN_MARGIN)


def falls_short(step: int, projected: int, plan_steps: int) -> bool:
  """Whether a run at `step` projected to reach `projected` steps must shorten its plan.

  Short by more than 1 - REPLAN_TOLERANCE of the steps still to run, not of the whole plan: late
  in a run 2 % of the plan is more than is left to run, and such a miss stopped the demo at its
  time limit 109 steps before its plan's end, the learning rate not yet at 0 (session 26: a plan
  grown to 8958 steps at step 4101, then a slower machine; stopped at 8849).
  """
  return projected - step < (plan_steps - step) * REPLAN_TOLERANCE


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def validate(evaluator, params, make_eval_iterator: Callable[[], Iterator]) -> dict[str, Any]:
  """Per-exit mean PIT SI-SNR and SI-SNRi (dB) over a finite iterator: a history row's 'eval'.

  `evaluator`: an `evaluation.Evaluator(model, policy=None, with_calibration=False, mesh=mesh)`
  built once (its step is compiled on first use only); the means cover every host's utterances.
  """
  summary_ = evaluator.run(make_eval_iterator(), params=params)
  return {"utterances": summary_["utterances"],
          "si_snr": [entry["si_snr_db"] for entry in summary_["per_exit"]],
          "si_snr_improvement": [entry["si_snri_db"] for entry in summary_["per_exit"]]}


def train(
    config: TrainConfig,
    workdir: str,
    train_iterator: Iterator,
    make_eval_iterator: Callable[[], Iterator] | None = None,
    *,
    sample_rate: int | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> TrainResult:
  """Train (or resume) the run in `workdir`; returns the final state and the logged history."""
  os.makedirs(workdir, exist_ok=True)
  is_lead_host = jax.process_index() == 0

  # --- mesh -----------------------------------------------------------------------------------
  mesh = step_lib.data_mesh()

  # --- model ----------------------------------------------------------------------------------
  # dtype 'auto' is resolved here, on the machine that trains (docs/training.md, "bfloat16").
  model_config = config.model_config(resolve=True)
  if sample_rate is not None and sample_rate != model_config.sample_rate:
    raise ValueError(f"train: the data is at {sample_rate} Hz but the model "
                     f"{config.model!r} is built for {model_config.sample_rate} Hz")
  model = press_net.PressNet(model_config, remat=config.remat)
  loss_config = config.loss_config()

  # --- state: fresh, from a finished run, or resumed ------------------------------------------
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  resumed = manager.latest_step() is not None

  # --- optimiser (with the schedule's re-plans of an earlier call, when resuming) ------------
  plan = read_schedule(workdir) if resumed else None
  if not resumed and is_lead_host and os.path.exists(os.path.join(workdir, SCHEDULE_FILE)):
    os.remove(os.path.join(workdir, SCHEDULE_FILE))  # A plan without a checkpoint: start over.
  replans = plan["replans"] if plan else ()
  plan_steps = plan["steps"] if plan else config.steps
  # The re-plans are an input of the step (optim.replan_table), not part of its program.
  optimizer = optim.make_optimizer(config.optimizer)
  schedule = optim.learning_rate_schedule(config.optimizer, replans)

  state = step_lib.create_train_state(model, optimizer, config.seed)
  meta = {"train": config.to_dict(), "model": model_config.to_dict(),
          "sample_rate": model_config.sample_rate, **(extra_meta or {}),
          "schedule": {"steps": plan_steps, "replans": [list(p) for p in replans]}}
  if resumed:
    state, iterator_state, _ = checkpointing.restore(manager, state, mesh=mesh)
    if hasattr(train_iterator, "set_state") and iterator_state is not None:
      train_iterator.set_state(iterator_state)
    log.info("resumed %s at step %d", workdir, int(state.step))
  elif config.init_from:
    _, params = checkpointing.load_params(config.init_from)
    state = state.replace(params=params, opt_state=optimizer.init(params))
    log.info("initialised from %s", config.init_from)
  state = jax.device_put(state, step_lib.replicated(mesh))

  # --- data and step functions -----------------------------------------------------------------
  step_fn = step_lib.parallel_train_step(mesh, with_learning_rate_plan=True, model=model,
                                         loss_config=loss_config, optimizer=optimizer)

  def replicated_plan():
    return jax.device_put(optim.replan_table(config.optimizer, replans),
                          step_lib.replicated(mesh))

  plan_table = replicated_plan()
  # The one evaluator, exits only; built once: compiled on first use only.
  validator = evaluation.Evaluator(model, policy=None, with_calibration=False, mesh=mesh)

  saved_step = manager.latest_step()  # Orbax refuses to save a step twice.

  # train_history.json covers the whole run: rows of earlier calls up to the resumed step, then
  # this call's rows; rewritten before every checkpoint so a killed run keeps its curve (after
  # it, a kill between the checkpoint's commit and the rewrite lost the rows; rows past the
  # checkpoint a resume restarts from are dropped when it reads them).
  history_path = os.path.join(workdir, "train_history.json")
  earlier_history: list[dict[str, Any]] = []
  if resumed and is_lead_host and os.path.isfile(history_path):
    with open(history_path) as handle_file:
      earlier_history = [row for row in json.load(handle_file)
                         if row["step"] <= int(state.step)]

  def write_history():
    if is_lead_host:
      with open(history_path + ".tmp", "w") as handle_file:
        json.dump(earlier_history + history, handle_file, indent=1)
      os.replace(history_path + ".tmp", history_path)

  def save_checkpoint():
    nonlocal saved_step
    if saved_step == step:
      return
    write_history()
    iterator_state = train_iterator.get_state() if hasattr(train_iterator, "get_state") else None
    checkpointing.save(manager, state, iterator_state, meta)
    if config.wait_for_checkpoints:
      manager.wait_until_finished()
    saved_step = step

  # --- loop -----------------------------------------------------------------------------------
  writer = summary.SummaryWriter(workdir, enabled=is_lead_host)
  progress = summary.Progress(total=plan_steps, initial=int(state.step), enabled=is_lead_host)
  history: list[dict[str, Any]] = []
  step = int(state.step)
  started = time.perf_counter()
  window_start, window_step = started, step  # Wall time and step of the last log row.
  stopped_early = False
  pending = None  # Metrics of the previous step, read after the next one is dispatched.
  step_temp_bytes = None  # The compiled step's temporary buffer (allocator.fit_jitted), once.
  averaged = ("loss", "per_exit_loss", "per_exit_si_snr", "grad_norm")
  window_sums: dict[str, np.ndarray] = {}  # Sums over the finite steps since the last row.
  window_finite = 0
  # steps/s of this call since its first log row (which holds the compilation), at each later
  # row: a cumulative rate, so one slow window (a validation pass, a checkpoint) does not
  # shorten the plan. A re-plan compiles nothing (the table is an input of the step).
  rates: list[float] = []
  rate_origin: tuple[int, float] | None = None
  growths = 0  # Times this call grew its plan (at most MAX_GROWTHS: a plan that rarely changes).
  rows_at_replan = 0  # len(rates) at this call's last re-plan.

  def handle(step_number, metrics):
    nonlocal window_start, window_step, window_sums, window_finite, rate_origin
    metrics = jax.device_get(metrics)
    if int(metrics["consecutive_nonfinite"]) >= config.max_consecutive_nonfinite:
      raise NonFiniteTrainingError(
          f"train: {int(metrics['consecutive_nonfinite'])} consecutive steps up to step "
          f"{step_number} had a non-finite loss or gradient (max_consecutive_nonfinite="
          f"{config.max_consecutive_nonfinite}); parameters were left at the last finite step")
    if float(metrics["finite"]) > 0:
      window_sums = {k: window_sums.get(k, 0.0) + np.asarray(metrics[k], np.float64)
                     for k in averaged}
      window_finite += 1
    if step_number % config.log_every == 0 or step_number == plan_steps:
      now = time.perf_counter()
      # Means over the window's finite steps (the step's own values if none was finite).
      means = ({k: v / window_finite for k, v in window_sums.items()} if window_finite
               else {k: np.asarray(metrics[k]) for k in averaged})
      window_sums, window_finite = {}, 0
      # The schedule index of the update this step's gradient went into (finite batches only).
      updates = max(step_number - int(metrics["nonfinite_steps"]) - 1, 0) // (
          config.optimizer.accumulation_steps)
      row = {"step": step_number, "loss": float(means["loss"]),
             "per_exit_loss": [float(v) for v in means["per_exit_loss"]],
             "per_exit_si_snr": [float(v) for v in means["per_exit_si_snr"]],
             "grad_norm": float(means["grad_norm"]),
             "learning_rate": float(schedule(updates)),
             "nonfinite_steps": int(metrics["nonfinite_steps"]),
             "steps_per_s": (step_number - window_step) / max(now - window_start, 1e-9)}
      history.append(row)
      writer.scalars("train", row, step_number)
      progress.log(row)
      if rate_origin is None:
        rate_origin = (step_number, now)
      else:
        rates.append((step_number - rate_origin[0]) / max(now - rate_origin[1], 1e-9))
      window_start, window_step = now, step_number

  def maybe_replan():
    """Shorten the plan when this call's latest rate will not reach it before the time limit;
    grow a shortened plan back (up to MAX_GROWTHS times per call, each GROWTH_ROWS rows after
    the last re-plan, never past `steps`) when clearly more fits.

    Single-process runs only: hosts measure their own rates and would decide differently (a
    multi-host run keeps its plan and stops at the time limit, as without this option).
    """
    nonlocal plan_steps, replans, schedule, plan_table, growths, rows_at_replan
    if (not config.anneal_to_time_limit or not config.time_limit_s or not rates
        or jax.process_count() > 1 or len(replans) >= optim.MAX_REPLANS):
      return  # No rate past the compilation yet; multi-host runs keep their plan.
    remaining = config.time_limit_s - (time.perf_counter() - started)
    projected = replanned_steps(step, rates[-1], remaining)
    shrink = falls_short(step, projected, plan_steps)
    grow = (growths < MAX_GROWTHS and plan_steps < config.steps
            and len(rates) - rows_at_replan >= GROWTH_ROWS
            and projected >= plan_steps * REPLAN_GROWTH)
    if not (shrink or grow):
      return  # The plan fits, and no more than it would.
    steps = min(replanned_steps(step, rates[-1], remaining), config.steps)
    accumulation = config.optimizer.accumulation_steps
    total = replans[-1][1] if replans else config.optimizer.total_steps
    new_total = min(config.optimizer.total_steps, steps // accumulation)
    update = step // accumulation
    if not update < new_total or (new_total >= total if shrink else new_total <= total):
      return
    growths += int(grow)
    rows_at_replan = len(rates)
    replans = replans + ((update, new_total),)
    plan_steps = steps
    # The same compiled step goes on with the new table: nothing to recompile, and the rate
    # keeps being measured from this call's first row past the compilation.
    schedule = optim.learning_rate_schedule(config.optimizer, replans)
    plan_table = replicated_plan()
    rate = rates[-1]
    meta["schedule"] = {"steps": plan_steps, "replans": [list(p) for p in replans]}
    if is_lead_host:
      _write_schedule(workdir, plan_steps, replans)
    history.append({"step": step, "replan": {"steps": plan_steps, "update": update,
                                             "total_updates": new_total}})
    progress.set_total(plan_steps)
    progress.message(
        f"step {step}: at {rate:.2f} steps/s the time limit ({config.time_limit_s:.0f} s) "
        f"ends the run near step {steps}, not {config.steps}: the learning rate now decays to 0 "
        f"at update {new_total} (schedule.json"
        + (f"; grown from update {total})" if new_total > total else ")"))

  def handle_then_replan(step_number, metrics):
    logged = len(rates)
    handle(step_number, metrics)
    if len(rates) > logged:  # A log row past the first: a new rate.
      maybe_replan()

  try:
    while step < plan_steps:
      batch = step_lib.global_batch(mesh, next(train_iterator))
      if step_temp_bytes is None:
        step_temp_bytes, mapped = allocator.fit_jitted(step_fn, state, batch, plan_table)
        if mapped:
          progress.message(f"the step's temporary buffer is {step_temp_bytes / 2**30:.2f} GiB: "
                           f"host blocks of {allocator.MMAP_THRESHOLD >> 20} MiB and more are "
                           "mapped per call (press_jax/allocator.py)")
      state, metrics = step_fn(state, batch, plan_table)
      step += 1
      if pending is not None:
        handle_then_replan(*pending)
      pending = (step, metrics)
      progress.update(step)
      if step % config.checkpoint_every == 0:
        handle_then_replan(*pending)
        pending = None
        save_checkpoint()
      if config.eval_every and make_eval_iterator and step % config.eval_every == 0:
        result = validate(validator, state.params, make_eval_iterator)
        history.append({"step": step, "eval": result})
        writer.per_exit("eval/si_snr_improvement", result["si_snr_improvement"], step)
        progress.message(f"step {step}: validation SI-SNRi per exit " + ", ".join(
            f"{v:.2f}" for v in result["si_snr_improvement"]) + " dB")
      if config.time_limit_s and time.perf_counter() - started > config.time_limit_s:
        stopped_early = step < plan_steps
        break
    if pending is not None:
      handle(*pending)
    # --- checkpoint ---------------------------------------------------------------------------
    save_checkpoint()
  finally:
    manager.wait_until_finished()
    writer.close()
    progress.close()
  write_history()
  return TrainResult(state=state, history=history, stopped_early=stopped_early,
                     planned_steps=plan_steps, replans=replans)
