"""Input checks run outside jit: each raises a ValueError that says what was expected."""

from __future__ import annotations

from typing import Any

import numpy as np

from press_jax.config import PressConfig


def _as_numpy(value: Any, name: str) -> np.ndarray:
  try:
    return np.asarray(value)
  except Exception as error:  # pragma: no cover - exotic inputs
    raise ValueError(f"{name}: expected an array, got {type(value).__name__}") from error


def check_waveforms(
    mixture: Any,
    config: PressConfig,
    *,
    mask: Any | None = None,
    sample_rate: int | None = None,
    name: str = "mixture",
) -> None:
  """Check a (batch, samples) float mixture (and its sample mask) against the model's config."""
  array = _as_numpy(mixture, name)
  if array.ndim != 2:
    hint = f" (add a batch axis: {name}[None])" if array.ndim == 1 else ""
    raise ValueError(f"{name}: expected shape (batch, samples), got {array.shape}{hint}")
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
    raise ValueError(
        f"{name}: expected a floating-point waveform in [-1, 1], got dtype {array.dtype}"
        + (" (divide int16 PCM by 32768)" if array.dtype == np.int16 else ""))
  if array.shape[0] == 0:
    raise ValueError(f"{name}: expected at least one utterance, got batch size 0")
  if array.shape[1] < config.encoder_kernel:
    raise ValueError(
        f"{name}: {array.shape[1]} samples is shorter than one encoder frame "
        f"({config.encoder_kernel} samples at {config.sample_rate} Hz)")
  finite = np.isfinite(array.astype(np.float32))
  if not finite.all():
    bad = np.argwhere(~finite)[0]
    raise ValueError(
        f"{name}: expected finite samples, found {int((~finite).sum())} NaN/inf values "
        f"(first at batch {bad[0]}, sample {bad[1]})")
  if sample_rate is not None and int(sample_rate) != config.sample_rate:
    raise ValueError(
        f"sample_rate: the model was built for {config.sample_rate} Hz audio, got "
        f"{sample_rate} Hz (resample, or use a preset with sample_rate={sample_rate})")
  if mask is not None:
    mask_array = _as_numpy(mask, "mask")
    if mask_array.shape != array.shape:
      raise ValueError(f"mask: expected shape {array.shape} like {name}, got {mask_array.shape}")
    valid = mask_array.astype(bool)
    if np.any(valid[:, 1:] & ~valid[:, :-1]):
      raise ValueError("mask: expected each row to be valid samples followed by padding "
                       "(1...1 0...0); found a valid sample after padding")


def check_sources(sources: Any, mixture: Any, config: PressConfig, name: str = "sources") -> None:
  """Check (batch, speakers, samples) reference sources against the mixture and the model."""
  array = _as_numpy(sources, name)
  mixture_shape = np.shape(mixture)
  if array.ndim != 3:
    raise ValueError(f"{name}: expected shape (batch, speakers, samples), got {array.shape}")
  if array.shape[1] != config.speakers:
    raise ValueError(f"{name}: the model separates {config.speakers} speakers, got "
                     f"{array.shape[1]} sources")
  if (array.shape[0], array.shape[2]) != tuple(mixture_shape):
    raise ValueError(f"{name}: batch and samples {array.shape[0], array.shape[2]} do not match "
                     f"the mixture's {tuple(mixture_shape)}")
  if not np.isfinite(array.astype(np.float32)).all():
    raise ValueError(f"{name}: expected finite samples, found NaN/inf")
