"""The per-device train step (pmap-style, named data axis) and its parallel wrappers.

Each step is written once for one device's shard of the batch, with gradients and metrics
averaged by `lax.pmean` over the axis `DATA_AXIS`. `parallel_train_step` runs it with
`jax.shard_map` under `jit` over a 1-D mesh of all devices (what `jax.pmap` compiles to today);
`pmap_train_step` runs the very same function under `jax.pmap` (kept for the equivalence test).
Evaluation (`press_jax.evaluation.evaluate_batch`) runs through `parallel_step` the same way.

shard_map runs with `check_vma=False`: with the default checker, the gradient of a replicated
input is already summed over devices by the transpose of its implicit broadcast, and the
explicit pmean of the pmap-style code would then average a sum (4x too large on 4 devices).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from press_jax import likelihoods, metrics
from press_jax.models.press_net import PressNet, init_params

DATA_AXIS = "data"
Batch = dict[str, jax.Array]  # mixture (batch, samples), sources (batch, S, samples), mask.


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue exactly (saved in every checkpoint)."""

  step: jax.Array  # Batches consumed (int32), skipped ones included.
  params: Any
  opt_state: Any
  rng: jax.Array  # Raw uint32 PRNG key, advanced every step.
  nonfinite_steps: jax.Array  # Steps skipped for a non-finite loss or gradient, in total.
  consecutive_nonfinite: jax.Array  # ... and in a row up to now.


def create_train_state(model: PressNet, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
  """Fresh parameters and optimiser state from `seed`."""
  init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
  # Both under jit: eager initialisation of the scanned model runs op by op and takes ~30 s on
  # a 2-core CPU (a few seconds jitted).
  params = init_params(model, init_key)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params),
      rng=state_key, nonfinite_steps=jnp.zeros((), jnp.int32),
      consecutive_nonfinite=jnp.zeros((), jnp.int32))


def train_step(
    state: TrainState,
    batch: Batch,
    learning_rate_plan: jax.Array | None = None,
    *,
    model: PressNet,
    loss_config: likelihoods.LossConfig,
    optimizer: optax.GradientTransformation,
    axis_name: str | None = DATA_AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on one device's batch; a non-finite loss or gradient changes nothing.

  `learning_rate_plan`: an `optim.replan_table` for `optim.make_optimizer`'s update (the
  schedule's re-plans as data); None keeps the optimiser's own.
  """
  mixture, sources, mask = batch["mixture"], batch["sources"], batch["mask"]

  def loss_fn(params):
    outputs = model.apply({"params": params}, mixture, mask)
    loss, aux = likelihoods.press_loss(outputs, sources, mask, loss_config)
    return loss, (aux, outputs)

  (loss, (aux, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  aligned = aux["aligned_targets"]
  si_snr = metrics.si_snr(outputs.mean, aligned if aligned.ndim == 4 else aligned[None],
                          mask[None, :, None, :])  # (exits, batch, speakers)
  step_metrics = {"loss": loss, "per_exit_loss": aux["per_exit_loss"],
                  "per_exit_si_snr": si_snr.mean(axis=(1, 2))}
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    step_metrics = jax.lax.pmean(step_metrics, axis_name)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(grad_norm)

  extra = {} if learning_rate_plan is None else {"learning_rate_plan": learning_rate_plan}
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
  new_params = optax.apply_updates(state.params, updates)
  keep_if_finite = functools.partial(jax.tree_util.tree_map,
                                     lambda new, old: jnp.where(finite, new, old))
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(new_params, state.params),
      opt_state=keep_if_finite(new_opt_state, state.opt_state),
      rng=jax.random.fold_in(state.rng, 1),
      nonfinite_steps=state.nonfinite_steps + skipped,
      consecutive_nonfinite=(state.consecutive_nonfinite + skipped) * skipped)
  step_metrics.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                      nonfinite_steps=new_state.nonfinite_steps,
                      consecutive_nonfinite=new_state.consecutive_nonfinite)
  return new_state, step_metrics


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices with the single axis `DATA_AXIS`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices), (DATA_AXIS,))


def _drop_device_axis(function: Callable) -> Callable:
  """Adapt a per-device step to shard_map's local (1, ...) leading axis of the batch."""

  def wrapped(state, batch, *replicated):
    return function(state, jax.tree_util.tree_map(lambda x: x[0], batch), *replicated)

  return wrapped


def parallel_step(step: Callable, mesh: Mesh, donate_state: bool = False,
                  out_specs: Any = PartitionSpec(), replicated_inputs: int = 0) -> Callable:
  """jit(shard_map(step)): state replicated, batch (devices, per_device_batch, ...) sharded.

  `out_specs` (a prefix of the outputs' tree): PartitionSpec() for values that are the same on
  every device (psum / pmean results), PartitionSpec(DATA_AXIS) for per-example outputs: each
  device's (per_device_batch, ...) rows are concatenated into a global (devices *
  per_device_batch, ...) array in device order (the loaders' flattening order).
  `replicated_inputs`: that many more arguments after the batch, replicated like the state.
  """
  sharded = jax.shard_map(
      _drop_device_axis(step), mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)) + (PartitionSpec(),) * (
          replicated_inputs),
      out_specs=out_specs, check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,) if donate_state else ())


def parallel_train_step(mesh: Mesh, with_learning_rate_plan: bool = False,
                        **step_arguments) -> Callable:
  """The per-device `train_step` over every device of `mesh`: step(state, batch), or with
  `with_learning_rate_plan` step(state, batch, plan), the plan an `optim.replan_table`
  replicated over `mesh` (the trainer's: a re-plan changes the input, not the program)."""
  return parallel_step(functools.partial(train_step, **step_arguments), mesh, donate_state=True,
                       replicated_inputs=int(with_learning_rate_plan))


def pmap_train_step(**step_arguments) -> Callable:
  """The same per-device `train_step` under jax.pmap (state with a leading device axis)."""
  return jax.pmap(functools.partial(train_step, **step_arguments), axis_name=DATA_AXIS)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


MODEL_INPUTS = ("mixture", "sources", "mask")


def global_batch(mesh: Mesh, local_batch: dict[str, Any],
                 names: tuple[str, ...] = MODEL_INPUTS) -> Batch:
  """This host's (local_devices, per_device_batch, ...) entries `names` as global sharded arrays.

  Other entries of a loader's batch (ids, lengths; example masks unless named) stay on the host.
  """
  missing = [name for name in names if name not in local_batch]
  if missing:
    raise ValueError(f"global_batch: the batch lacks {missing}; expected keys {names}")
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[name]))
          for name in names}
