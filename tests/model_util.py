"""Small PRESS-Nets for tests: randomised parameters, and a saved model on disk."""

from __future__ import annotations

import jax
import numpy as np

from press_jax.models import press_net

# Two exits after one encoder block; what the file-level tests separate and export with.
SMALL = dict(width=16, encoder_blocks=1, decoder_blocks=2, exits=2, attention_every=2,
             attention_heads=2, rnn_expansion=1.0, ffn_expansion=1.0,
             attention_ffn_expansion=1.0, encoder_channels=16, block_length=400)


def randomised_model(overrides: dict, seed: int = 0, samples: int = 800, scale: float = 0.3):
  """(model, params) of the tiny preset with `overrides`, every parameter perturbed.

  Random heads and larger residual branches (LayerScale starts at 1e-5), so that the exits
  differ from each other: N(0, scale^2) added to every parameter. At scale 0.3 the outputs reach
  ~50 times the input's level and float32 rounding differences grow with them (two XLA
  compilations of the same model differ by ~1e-5 relative); smaller scales keep them O(1).
  """
  model = press_net.create("tiny", **overrides)
  params = press_net.init_params(model, jax.random.key(seed), samples=samples)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [leaf + scale * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
  return model, jax.tree_util.tree_unflatten(treedef, leaves)


def save_small_model(directory: str) -> str:
  """Writes the SMALL model with its initial parameters to `directory`; returns it."""
  model = press_net.create("tiny", **SMALL)
  press_net.save(directory, model, press_net.init_params(model, jax.random.key(0)))
  return directory


def padded_mixture(batch: int, samples: int, seed: int = 0, shortening: int = 300):
  """(mixture, mask), both (batch, samples) float32: a tone plus noise, item k ending
  shortening * k + 17 samples early (padding at the end, as the loaders pad)."""
  rng = np.random.default_rng(seed)
  time = np.arange(samples) / 8000.0
  mixture = (np.sin(2 * np.pi * 220 * time)[None] * rng.uniform(0.1, 1.0, (batch, 1))
             + 0.3 * rng.standard_normal((batch, samples))).astype(np.float32)
  mask = np.ones((batch, samples), np.float32)
  for item in range(1, batch):
    mask[item, samples - min(samples - 1, shortening * item + 17):] = 0.0
  return mixture, mask
