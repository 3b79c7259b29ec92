"""TensorBoard event files and the console progress line with ETA."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

TENSORBOARD_DIR = "tensorboard"


class SummaryWriter:
  """Scalars to workdir/tensorboard (tensorboardX; no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter as EventWriter
      self._writer = EventWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def scalars(self, prefix: str, row: dict[str, Any], step: int) -> None:
    """Every number of `row`; lists become one scalar per exit (exit numbers from 1)."""
    if self._writer is None:
      return
    for name, value in row.items():
      if name == "step":
        continue
      if isinstance(value, (list, tuple)):
        self.per_exit(f"{prefix}/{name}", value, step)
      elif isinstance(value, (int, float)):
        self._writer.add_scalar(f"{prefix}/{name}", value, step)

  def per_exit(self, name: str, values: Sequence[float], step: int) -> None:
    if self._writer is None:
      return
    for index, value in enumerate(values):
      self._writer.add_scalar(f"{name}/exit{index + 1}", float(value), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class Progress:
  """A tqdm bar on a terminal; otherwise a plain line per log step, both with ETA."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.total, self.initial, self.enabled = total, initial, enabled
    self.started = time.perf_counter()
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def set_total(self, total: int) -> None:
    """A new end of the run (a re-planned schedule)."""
    self.total = total
    if self._bar is not None:
      self._bar.total = total
      self._bar.refresh()

  def update(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def eta_seconds(self, step: int) -> float:
    done = step - self.initial
    elapsed = time.perf_counter() - self.started
    return elapsed / max(done, 1) * (self.total - step)

  def log(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    exits = " ".join(f"{v:5.2f}" for v in row["per_exit_si_snr"])
    text = (f"step {row['step']}/{self.total}  loss {row['loss']:.4f}  SI-SNR per exit [{exits}]"
            f" dB  lr {row['learning_rate']:.2e}  {row['steps_per_s']:.2f} steps/s  "
            f"ETA {format_seconds(self.eta_seconds(row['step']))}")
    if row.get("nonfinite_steps"):
      text += f"  skipped {row['nonfinite_steps']}"
    if self._bar is not None:
      self._bar.set_postfix_str(f"loss {row['loss']:.3f}")
    self.message(text)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
