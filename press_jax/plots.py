"""Figures the library draws itself: the exit map over a mixture's spectrogram (paper Fig. 1)."""

from __future__ import annotations

import os

import numpy as np


def exit_map(mixture: np.ndarray, sample_rate: int, blocks: list[dict], block_seconds: float,
             exits: int, path: str) -> None:
  """Spectrogram of `mixture` with the exit each block took drawn under it; PNG at `path`.

  `blocks`: dicts with `start_s` and `exit` (1-based), as press-separate's report holds them.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 4.5),
                                       gridspec_kw={"height_ratios": [3, 1]})
  window = max(16, int(0.032 * sample_rate))
  top.specgram(np.asarray(mixture, np.float64) + 1e-9, NFFT=window, Fs=sample_rate,
               noverlap=window // 2, cmap="magma")
  top.set_ylabel("frequency (Hz)")
  top.set_title("mixture and the exit taken per block")
  starts = np.array([block["start_s"] for block in blocks])
  chosen = np.array([block["exit"] for block in blocks])
  bottom.bar(starts, chosen, width=block_seconds, align="edge", color="tab:blue")
  bottom.set_ylim(0, exits + 0.5)
  bottom.set_yticks(range(1, exits + 1))
  bottom.set_ylabel("exit")
  bottom.set_xlabel("time (s)")
  figure.tight_layout()
  temporary = path + ".tmp.png"
  figure.savefig(temporary, dpi=100)
  plt.close(figure)
  os.replace(temporary, path)
