"""The per-device train step under pmap and shard_map, non-finite batches, and the optimiser.

The multi-device cases run once, in one subprocess with 4 simulated CPU devices (see
tests/train_worker.py, mode `steps`); the tests below check its outputs. The optimiser tests run
here on plain arrays (no model compilation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from press_jax import optim
from press_jax.models import press_net
from tests import worker_util

STEPS = 3


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory):
  directory = tmp_path_factory.mktemp("steps")
  out = str(directory) + "/"
  result = worker_util.run_worker("steps", {"steps": STEPS, "out": out}, str(directory),
                                  devices=4, name="steps")["result"]

  def tree(name):
    return worker_util.load_tree(out + name + ".npz")

  return result, tree


def params_of(tree):
  return {k: v for k, v in tree.items() if k.startswith(".params")}


def opt_state_of(tree):
  return {k: v for k, v in tree.items() if k.startswith(".opt_state")}


# --- 1. pmap vs jit(shard_map) ----------------------------------------------------------------
def test_pmap_and_shard_map_steps_agree(steps_run):
  result, tree = steps_run
  assert result["devices"] == 4
  np.testing.assert_allclose(result["shard_map_losses"],
                             np.asarray(result["pmap_losses"])[:, 0], rtol=1e-6)
  assert result["pmap_replicas_identical"], "pmap replicas drifted apart"
  shard, pmapped, initial = tree("shard_map"), tree("pmap"), tree("initial")
  assert shard.keys() == pmapped.keys()
  for key in shard:  # (Bitwise equal with jax 0.10.2 on CPU.)
    np.testing.assert_allclose(shard[key], pmapped[key], rtol=1e-6, atol=1e-8, err_msg=key)
  # ... and the steps did something: every kernel moved, the step counter advanced.
  assert int(shard[".step"]) == STEPS
  moved = [k for k in params_of(shard) if k.endswith("['kernel']")
           and not np.array_equal(shard[k], initial[k])]
  assert len(moved) == sum(k.endswith("['kernel']") for k in params_of(shard))


# --- 4a. one non-finite shard: nothing changes, the skip is counted ---------------------------
@pytest.mark.parametrize("which", ["shard_map_nan", "pmap_inf"])
def test_nonfinite_shard_skips_the_step(steps_run, which):
  result, tree = steps_run
  if which == "shard_map_nan":  # NaN in the mixture of the last device's shard.
    before, after, metrics = tree("before_nan"), tree("after_nan"), result["nan_metrics"]
    assert result["nan_rng_changed"]
  else:  # +Inf in a target source of device 1's shard, under pmap.
    before, after, metrics = tree("pmap_before_inf"), tree("pmap_after_inf"), {
        k: np.asarray(v)[0] for k, v in result["inf_metrics"].items()}
  worker_util.assert_trees_equal(params_of(before), params_of(after), "params")
  worker_util.assert_trees_equal(opt_state_of(before), opt_state_of(after), "optimizer state")
  assert int(after[".step"]) == int(before[".step"]) + 1  # The batch counts as consumed.
  assert int(after[".nonfinite_steps"]) == int(before[".nonfinite_steps"]) + 1
  assert int(after[".consecutive_nonfinite"]) == 1
  assert float(metrics["finite"]) == 0.0 and int(metrics["nonfinite_steps"]) == 1


def test_training_continues_after_a_nonfinite_step(steps_run):
  result, tree = steps_run
  skipped, recovered = tree("after_nan"), tree("after_recovery")
  metrics = result["recovery_metrics"]
  assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
  assert int(recovered[".consecutive_nonfinite"]) == 0
  assert int(recovered[".nonfinite_steps"]) == 1  # The total is kept.
  changed = [k for k in params_of(recovered) if not np.array_equal(recovered[k], skipped[k])]
  assert changed
  assert all(np.all(np.isfinite(v)) for v in recovered.values() if v.dtype.kind == "f")


# --- 6. optimiser -----------------------------------------------------------------------------
def tiny_param_shapes():
  model = press_net.create("tiny")
  return jax.eval_shape(lambda: press_net.init_params(model, jax.random.key(0)))


def test_weight_decay_mask_only_on_kernels():
  shapes = tiny_param_shapes()
  mask = optim.decay_mask(shapes)
  flat = {jax.tree_util.keystr(path): value
          for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
  kernels = {k for k in flat if k.endswith("['kernel']")}
  assert kernels and all(flat[k] is True for k in kernels)
  assert all(flat[k] is False for k in set(flat) - kernels)
  # The tree has every kind of parameter that must be left alone.
  names = set(flat)
  assert any(k.endswith("['bias']") for k in names)
  assert any("_norm']['scale']" in k or "['norm']['scale']" in k for k in names)  # RMSNorm
  assert any(k.endswith("_scale']['scale']") for k in names)  # LayerScale
  assert any(k.endswith("['skip']") for k in names)  # Recurrence skip vector.
  assert "['encoder']['conv']['kernel']" in kernels  # Convolution kernels decay too.


def test_weight_decay_applied_through_the_optimizer():
  """With zero gradients the AdamW step is pure decay: -lr * wd * p on kernels, 0 elsewhere."""
  shapes = tiny_param_shapes()
  params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)
  config = optim.OptimizerConfig(peak_learning_rate=0.1, warmup_steps=0, total_steps=10,
                                 weight_decay=0.5)
  optimizer = optim.make_optimizer(config)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p))(grads, params)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    key = jax.tree_util.keystr(path)
    expected = -0.1 * 0.5 * 2.0 if key.endswith("['kernel']") else 0.0
    np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("warmup,total", [(5, 20), (0, 7), (3, 4)])
def test_learning_rate_schedule(warmup, total):
  peak = 3e-4
  schedule = optim.learning_rate_schedule(
      optim.OptimizerConfig(peak_learning_rate=peak, warmup_steps=warmup, total_steps=total))

  def expected(t):
    if t < warmup:
      return peak * t / warmup
    return peak * max(0.0, (total - t) / max(total - warmup, 1))

  steps = np.arange(total + 5)
  np.testing.assert_allclose([float(schedule(t)) for t in steps],
                             [expected(t) for t in steps], rtol=1e-6, atol=1e-12)
  assert float(schedule(warmup)) == pytest.approx(peak if warmup < total else 0.0)
  assert float(schedule(total)) == 0.0


def test_optimizer_config_validation():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.OptimizerConfig(warmup_steps=10, total_steps=5)
  with pytest.raises(ValueError, match="accumulation_steps"):
    optim.OptimizerConfig(accumulation_steps=0)


def test_gradient_accumulation_equals_one_step_on_the_mean_gradient():
  """MultiSteps(k=2) on g1, g2 == clip + AdamW (built by hand) on (g1 + g2) / 2, twice over."""
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "norm": {"scale": jnp.ones((4,), jnp.float32)}}
  grads = [jax.tree_util.tree_map(lambda p, s=s: jnp.asarray(
      np.random.default_rng(s).normal(size=p.shape) * 1.5, jnp.float32), params)
      for s in range(4)]
  config = optim.OptimizerConfig(peak_learning_rate=1e-2, warmup_steps=1, total_steps=3,
                                 b1=0.8, b2=0.95, weight_decay=0.1, clip_norm=1.0,
                                 accumulation_steps=2)
  accumulating = optim.make_optimizer(config)

  schedule = lambda t: 1e-2 * jnp.minimum(t / 1.0, jnp.maximum(0.0, (3.0 - t) / 2.0))  # noqa
  reference = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b1=0.8, b2=0.95, weight_decay=0.1,
                  mask={"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}))

  acc_params, acc_state = params, accumulating.init(params)
  ref_params, ref_state = params, reference.init(params)
  accumulating = optax.GradientTransformation(accumulating.init, jax.jit(accumulating.update))
  reference = optax.GradientTransformation(reference.init, jax.jit(reference.update))
  for cycle in range(2):
    g1, g2 = grads[2 * cycle], grads[2 * cycle + 1]
    updates, acc_state = accumulating.update(g1, acc_state, acc_params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))
    acc_params = optax.apply_updates(acc_params, updates)
    updates, acc_state = accumulating.update(g2, acc_state, acc_params)
    acc_params = optax.apply_updates(acc_params, updates)

    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
    assert float(optax.tree.norm(mean)) > 1.0  # Clipping acts on the averaged gradient.
    updates, ref_state = reference.update(mean, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    for a, b in zip(jax.tree_util.tree_leaves(acc_params), jax.tree_util.tree_leaves(ref_params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # The first update ran at lr(0) = 0 (warm-up), the second at the peak: params moved.
  assert not np.allclose(np.asarray(acc_params["dense"]["kernel"]),
                         np.asarray(params["dense"]["kernel"]))


def test_first_adamw_step_matches_the_formula():
  """One update of make_optimizer by hand: clip, bias-corrected Adam, masked decoupled decay."""
  params = {"kernel": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.asarray([0.3, -0.1])}
  grads = {"kernel": jnp.asarray([[3.0, -1.0], [0.0, 2.0]]), "bias": jnp.asarray([1.0, 2.0])}
  config = optim.OptimizerConfig(peak_learning_rate=0.05, warmup_steps=0, total_steps=4,
                                 weight_decay=0.2, clip_norm=2.0)
  optimizer = optim.make_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
  for name in params:
    g = np.asarray(grads[name]) * min(1.0, 2.0 / norm)
    m_hat, v_hat = g, g ** 2  # (1 - b) g / (1 - b) after one step.
    adam = m_hat / (np.sqrt(v_hat) + 1e-8)
    decay = 0.2 * np.asarray(params[name]) if name == "kernel" else 0.0
    np.testing.assert_allclose(np.asarray(updates[name]), -0.05 * (adam + decay), rtol=1e-5,
                               atol=1e-7, err_msg=name)


def test_flat_optimizer_equals_optax_adamw_over_steps():
  """make_optimizer (clip + Adam on one flat vector) against optax.adamw on the parameter tree."""
  rng = np.random.default_rng(0)
  params = {"block": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "scale": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
  config = optim.OptimizerConfig(peak_learning_rate=0.03, warmup_steps=2, total_steps=8,
                                 weight_decay=0.1, clip_norm=1.5)
  reference = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(optim.learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay, mask=optim.decay_mask))
  ours = optim.make_optimizer(config)
  ours_params, reference_params = params, params
  ours_state, reference_state = ours.init(params), reference.init(params)
  for _ in range(6):
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 2.0, jnp.float32), params)
    updates, ours_state = ours.update(grads, ours_state, ours_params)
    ours_params = optax.apply_updates(ours_params, updates)
    updates, reference_state = reference.update(grads, reference_state, reference_params)
    reference_params = optax.apply_updates(reference_params, updates)
  for a, b in zip(jax.tree_util.tree_leaves(ours_params),
                  jax.tree_util.tree_leaves(reference_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
  assert not np.allclose(np.asarray(ours_params["scale"]), np.asarray(params["scale"]))
