"""A tiny PRESS-Net overfits one mixture with the Student-t loss (SPEC §3, issue 2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from press_jax import likelihoods, metrics, optim
from press_jax import train_step as step_lib
from press_jax.models import press_net


def one_mixture(samples: int, seed: int = 0):
  """Two different synthetic 'voices': a vibrato harmonic tone and amplitude-modulated noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / 8000.0
  voiced = sum(np.sin(2 * np.pi * k * 180 * t + 3 * np.sin(2 * np.pi * 5 * t)) / k
               for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
  unvoiced = rng.standard_normal(samples) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.3 * t) ** 2)
  sources = np.stack([0.3 * voiced, 0.2 * unvoiced]).astype(np.float32)[None]
  return {"mixture": jnp.asarray(sources.sum(1)), "sources": jnp.asarray(sources),
          "mask": jnp.ones((1, samples), jnp.float32)}


def overfit(steps: int, samples: int):
  """Train the tiny preset on one mixture; return last-exit SI-SNR before and after."""
  model = press_net.create("tiny")
  optimizer = optim.make_optimizer(optim.OptimizerConfig(
      peak_learning_rate=3e-3, warmup_steps=10, total_steps=steps, weight_decay=0.0))
  state = step_lib.create_train_state(model, optimizer, seed=0)
  batch = one_mixture(samples)
  step = jax.jit(functools.partial(
      step_lib.train_step, model=model, optimizer=optimizer, axis_name=None,
      loss_config=likelihoods.LossConfig(block_length=model.config.block_length)))

  @jax.jit
  def last_exit_si_snr(params):
    outputs = model.apply({"params": params}, batch["mixture"], batch["mask"])
    values, _ = metrics.pit_si_snr(outputs.mean[-1], batch["sources"], batch["mask"])
    return values.mean()

  before = float(last_exit_si_snr(state.params))
  losses = []
  for _ in range(steps):
    state, step_metrics = step(state, batch)
    losses.append(float(step_metrics["loss"]))
  return before, float(last_exit_si_snr(state.params)), losses


def test_tiny_model_overfits_one_mixture_reduced():
  before, after, losses = overfit(steps=120, samples=2000)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  assert after - before >= 10.0, (before, after)


@pytest.mark.slow
def test_tiny_model_overfits_one_mixture_full():
  before, after, _ = overfit(steps=300, samples=8000)
  assert after - before >= 10.0, (before, after)
