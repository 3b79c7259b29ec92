"""Separating audio of any length in bounded memory: chunks with context, crossfaded.

The signal (at the model's rate) is cut into chunks of `chunk_seconds`; the model sees each
chunk with `context_seconds` of audio on both sides (a window of chunk + 2 x context samples,
one compiled shape for the whole file), the exit rule runs per block inside the window
(`press_jax.dynamic`), and neighbouring windows are joined with a raised-cosine crossfade of
`context_seconds` centred on the chunk border, after their speaker order has been aligned on
the audio both windows cover (the permutation with the largest summed correlation). Memory
holds one window and one context of output, whatever the length of the input.

`separate(model, params, wav)` is the wav-level API (Asteroid's `separate`): a 1-D waveform at
the model's rate in, (speakers, samples) out, with a report of the exits taken.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from press_jax import calibration as calibration_lib
from press_jax import compute
from press_jax import dynamic
from press_jax import exit_rule
from press_jax.models import press_net


@dataclasses.dataclass(frozen=True)
class SeparationSettings:
  """How a recording is separated: chunking, exit rule and which path runs."""

  chunk_seconds: float = 4.0
  context_seconds: float = 0.5
  target_db: float = 10.0
  confidence: float = 0.9
  conditions: tuple[str, ...] = exit_rule.CONDITIONS
  max_exit: int | None = None  # 1-based cap; None: the model's last exit.
  static_exit: int | None = None  # 1-based; every block takes this exit (no early exit).
  masked: bool = False  # Compute every exit and pick (the masked path) instead of the loop.
  crossfade_ms: float = 10.0  # Between blocks that took different exits (exit_rule).
  probabilities: str = "approximate"  # The exit probabilities: 'approximate' (paper) or 'exact'.

  def validate(self, config) -> None:
    """ValueError naming the argument when a setting is out of range for this model."""
    if not 0.0 < self.confidence < 1.0:
      raise ValueError(f"--confidence: expected a probability in (0, 1), got {self.confidence}")
    if not np.isfinite(self.target_db) or abs(self.target_db) > 100.0:
      raise ValueError(f"--target-db: expected a level in [-100, 100] dB, got {self.target_db}")
    bad = [c for c in self.conditions if c not in exit_rule.CONDITIONS]
    if not self.conditions or bad:
      raise ValueError(f"--conditions: expected a non-empty subset of {exit_rule.CONDITIONS}, "
                       f"got {tuple(self.conditions)}")
    if self.probabilities not in exit_rule.PROBABILITY_METHODS:
      raise ValueError(f"--probabilities: expected one of {exit_rule.PROBABILITY_METHODS}, got "
                       f"{self.probabilities!r}")
    for name, value in (("--max-exit", self.max_exit), ("--exit", self.static_exit)):
      if value is not None and not 1 <= value <= config.exits:
        raise ValueError(f"{name}: the model has exits 1..{config.exits}, got {value}")
    block_seconds = config.block_length / config.sample_rate
    if self.chunk_seconds < block_seconds:
      raise ValueError(f"--chunk-seconds: expected at least one block ({block_seconds:g} s), "
                       f"got {self.chunk_seconds}")
    if not self.context_seconds >= block_seconds:
      raise ValueError(f"--context-seconds: expected at least one block ({block_seconds:g} s; "
                       "the speakers of neighbouring chunks are aligned on it), got "
                       f"{self.context_seconds}")


@dataclasses.dataclass(frozen=True)
class WindowGeometry:
  """Sample counts at the model's rate, rounded to whole blocks."""

  chunk: int  # H
  context: int  # C
  block_length: int

  @property
  def window(self) -> int:
    return self.chunk + 2 * self.context

  def start(self, index: int) -> int:
    """First sample of window `index` (the first window starts at 0 with all its context after)."""
    return max(0, index * self.chunk - self.context)

  @classmethod
  def of(cls, config, settings: SeparationSettings) -> "WindowGeometry":
    block = config.block_length
    chunk = max(1, round(settings.chunk_seconds * config.sample_rate / block)) * block
    context = round(settings.context_seconds * config.sample_rate / block) * block
    return cls(chunk=chunk, context=context, block_length=block)


@dataclasses.dataclass
class WindowRecord:
  """What happened in one window: the exits of the blocks of its chunk, compute spent."""

  index: int
  start_s: float
  blocks: list[dict[str, float]]  # {start_s, exit (1-based), probability} for the chunk's blocks
  exits_run: int
  waveform_heads_run: int  # Waveform heads run (DynamicSelection.waveform_heads_run).
  gmac: float


def _best_permutation(reference: np.ndarray, estimate: np.ndarray) -> tuple[int, ...]:
  """Speaker order of `estimate` that best matches `reference`, both (speakers, samples)."""
  speakers = reference.shape[0]
  correlation = reference @ estimate.T  # (reference speaker, estimate speaker)
  return max(itertools.permutations(range(speakers)),
             key=lambda order: sum(correlation[j, order[j]] for j in range(speakers)))


class ChunkedSeparator:
  """Streaming separation: `feed` samples, receive finished output; `finish` at the end.

  Output samples are final when returned; everything is (speakers, samples) float32 at the
  model's rate.
  """

  def __init__(self, model: press_net.PressNet, params: Any, settings: SeparationSettings,
               calibration: calibration_lib.PostCalibration | None = None):
    config = model.config
    settings.validate(config)
    self.model, self.params, self.settings = model, params, settings
    self.calibration = calibration
    self.config = config
    self.geometry = WindowGeometry.of(config, settings)
    self.records: list[WindowRecord] = []
    self._buffer = np.zeros(0, np.float32)  # Input from self._buffer_start on.
    self._buffer_start = 0
    self._received = 0
    self._window_index = 0
    self._emitted = 0
    self._tail: np.ndarray | None = None  # Previous window's aligned output from _tail_start.
    self._tail_start = 0
    exits_run = self.settings.static_exit or self.settings.max_exit or config.exits
    # The most a window can cost: the masked path and the dynamic loop run every computed
    # exit's heads at worst; a static exit on the dynamic path runs only its own
    # (dynamic.dynamic_select). What a window did cost is counted from what it ran (_record).
    static_only = self.settings.static_exit is not None and not self.settings.masked
    self.last_exit_gmac_per_s = compute.gmac_per_second(config, exits_run,
                                                        all_heads=not static_only)

  # --- the exit rule on one window ---------------------------------------------------------
  def _select(self, window: np.ndarray, valid: int):
    mask = np.zeros((1, window.size), np.float32)
    mask[0, :valid] = 1.0
    settings = self.settings
    static = settings.static_exit is not None
    arguments = dict(
        target_db=settings.target_db, confidence=settings.confidence,
        conditions=tuple(settings.conditions), crossfade_ms=settings.crossfade_ms,
        max_exit=settings.static_exit if static else settings.max_exit,
        policy="static" if static else "dynamic", calibration=self.calibration,
        method=settings.probabilities)
    path = dynamic.masked_select if settings.masked else dynamic.dynamic_select
    return path(self.model, self.params, window[None], mask, **arguments)

  def _run_window(self, final: bool) -> np.ndarray:
    """Separates the next window; returns the output samples it finishes."""
    geometry, index = self.geometry, self._window_index
    start = geometry.start(index)
    offset = start - self._buffer_start
    window = np.zeros(geometry.window, np.float32)
    available = self._buffer[offset:offset + geometry.window]
    window[:available.size] = available
    # One transfer of everything the window returns (not an eager slice per field).
    selection = jax.device_get(self._select(window, available.size))
    estimate = np.asarray(selection.waveform[0], np.float32)  # (speakers, window)

    # Align the speaker order with the previous window on the audio both cover.
    if self._tail is not None:
      overlap_end = min(self._tail_start + self._tail.shape[1], start + available.size)
      if overlap_end > start:
        reference = self._tail[:, start - self._tail_start:overlap_end - self._tail_start]
        order = _best_permutation(reference, estimate[:, :overlap_end - start])
        estimate = estimate[list(order)]

    self._record(index, start, selection, available.size)
    core_start, core_end = index * geometry.chunk, (index + 1) * geometry.chunk
    half = geometry.context // 2
    fade_start = core_start - half if index else 0
    fade_end = core_start + half if index else 0
    emit_end = self._received if final else core_end - half
    pieces = []
    if fade_end > fade_start:  # Crossfade previous tail -> this window around the border.
      ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade_end - fade_start) + 0.5)
                                / (fade_end - fade_start))
      old = self._tail[:, fade_start - self._tail_start:fade_end - self._tail_start]
      new = estimate[:, fade_start - start:fade_end - start]
      pieces.append(old * (1.0 - ramp) + new * ramp)
    pieces.append(estimate[:, fade_end - start:max(fade_end, emit_end) - start])
    output = np.concatenate(pieces, axis=1)[:, :max(0, emit_end - self._emitted)]
    self._emitted += output.shape[1]
    # Keep this window's output from the next border's context on, for the next window.
    self._tail_start = max(start, core_end - geometry.context)
    self._tail = estimate[:, self._tail_start - start:]
    self._window_index += 1
    # Drop input no later window needs.
    keep_from = geometry.start(self._window_index)
    if keep_from > self._buffer_start:
      self._buffer = self._buffer[keep_from - self._buffer_start:]
      self._buffer_start = keep_from
    return output

  def _record(self, index, start, selection, valid):
    geometry, config = self.geometry, self.config
    exit_index = np.asarray(selection.exit_index[0])
    probability = np.asarray(selection.probability[0])
    blocks = []
    core_start, core_end = index * geometry.chunk, (index + 1) * geometry.chunk
    for block in range(exit_index.size):
      block_start = start + block * geometry.block_length
      if core_start <= block_start < core_end and block * geometry.block_length < valid:
        blocks.append({"start_s": block_start / config.sample_rate,
                       "exit": int(exit_index[block]) + 1,
                       "probability": float(probability[block])})
    exits_run = int(selection.exits_run)
    waveform_heads = int(selection.waveform_heads_run)
    gmac = compute.gmac_per_second_run(
        config, exits_run, waveform_heads=waveform_heads,
        variance_heads=int(selection.variance_heads_run)) * geometry.window / config.sample_rate
    self.records.append(WindowRecord(index=index, start_s=start / config.sample_rate,
                                     blocks=blocks, exits_run=exits_run,
                                     waveform_heads_run=waveform_heads, gmac=gmac))

  # --- streaming interface -----------------------------------------------------------------
  def feed(self, samples: np.ndarray) -> Iterator[np.ndarray]:
    """Adds input samples; yields the output that became final."""
    samples = np.asarray(samples, np.float32).reshape(-1)
    self._buffer = np.concatenate([self._buffer, samples])
    self._received += samples.size
    geometry = self.geometry
    while True:
      start = geometry.start(self._window_index)
      # A window runs once the next one's context is in (so this is not the last window).
      if self._received < start + geometry.window + 1:
        break
      yield self._run_window(final=False)

  def finish(self) -> Iterator[np.ndarray]:
    """Runs the remaining windows on what was received; yields the rest of the output."""
    if self._received == 0:
      return
    while self._emitted < self._received:
      core_end = (self._window_index + 1) * self.geometry.chunk
      yield self._run_window(final=core_end >= self._received)

  # --- summary -----------------------------------------------------------------------------
  def summary(self) -> dict[str, Any]:
    """Per file: mean GMAC/s spent (context included) and the exits the blocks took."""
    seconds = self._received / self.config.sample_rate
    gmac = sum(record.gmac for record in self.records)
    exits = [block["exit"] for record in self.records for block in record.blocks]
    return {"seconds": seconds, "windows": len(self.records),
            "gmac": gmac, "gmac_per_s": gmac / seconds if seconds else 0.0,
            "last_exit_gmac_per_s": self.last_exit_gmac_per_s
            * self.geometry.window * len(self.records) / max(self._received, 1),
            "mean_exit": float(np.mean(exits)) if exits else 0.0,
            "exits_run_mean": float(np.mean([r.exits_run for r in self.records])),
            "waveform_heads_run_mean": float(np.mean([r.waveform_heads_run
                                                      for r in self.records]))
            if self.records else 0.0}


def separate_stream(model, params, chunks: Iterable[np.ndarray], settings: SeparationSettings,
                    calibration=None) -> tuple[Iterator[np.ndarray], ChunkedSeparator]:
  """(iterator over finished output pieces, the separator holding records and summary)."""
  separator = ChunkedSeparator(model, params, settings, calibration)

  def pieces():
    for chunk in chunks:
      yield from separator.feed(chunk)
    yield from separator.finish()

  return pieces(), separator


def separate(model: press_net.PressNet, params: Any, wav: np.ndarray,
             settings: SeparationSettings | None = None,
             calibration: calibration_lib.PostCalibration | None = None,
             ) -> tuple[np.ndarray, dict[str, Any]]:
  """(sources (speakers, samples), report) for a 1-D waveform at the model's sample rate."""
  wav = np.asarray(wav)
  if wav.ndim != 1:
    raise ValueError(f"wav: expected a 1-D waveform (samples,), got shape {wav.shape}")
  if wav.size == 0:
    raise ValueError("wav: expected at least one sample, got none")
  if not np.isfinite(wav).all():
    raise ValueError(f"wav: expected finite samples, found {int((~np.isfinite(wav)).sum())} "
                     "NaN/inf values")
  pieces, separator = separate_stream(model, params, [wav], settings or SeparationSettings(),
                                      calibration)
  output = np.concatenate(list(pieces), axis=1)
  report = separator.summary()
  report["blocks"] = [block for record in separator.records for block in record.blocks]
  return output, report
