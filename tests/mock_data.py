"""Deterministic in-memory batches for the training tests (no data pipeline, no files).

Batch `i` of the *global* stream depends only on (seed, i): every process of a multi-host run
builds the same global batch and keeps the rows of its own devices, so a run on 2 hosts x 2
devices sees exactly the data of a run on 1 host x 4 devices.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 8000


def global_batch(index: int, global_devices: int, per_device_batch: int, samples: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """Batch `index` as numpy arrays with a leading (global_devices,) axis.

  The utterances depend only on (seed, index) and the global batch size, not on how they are
  laid out: 4 devices x 1, 2 x 2 and 1 x 4 see the same 4 utterances in the same order.
  """
  rng = np.random.default_rng([seed, index])
  shape = (global_devices * per_device_batch,)
  t = np.arange(samples) / SAMPLE_RATE
  pitch = rng.uniform(100.0, 300.0, shape + (1,))
  phase = rng.uniform(0.0, 2 * np.pi, shape + (1,))
  voiced = sum(np.sin(2 * np.pi * k * pitch * t + k * phase) / k for k in range(1, 4))
  noise = rng.standard_normal(shape + (samples,)) * (
      0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.0, 4.0, shape + (1,)) * t) ** 2)
  gains = rng.uniform(0.1, 0.4, shape + (2, 1))
  sources = (np.stack([voiced, noise], axis=-2) * gains).astype(np.float32)
  mask = np.ones(shape + (samples,), np.float32)
  length = rng.integers(samples * 3 // 4, samples + 1, shape)  # Some padded utterances.
  mask[np.arange(samples) >= length[..., None]] = 0.0
  sources = sources * mask[..., None, :]
  batch = {"mixture": sources.sum(-2), "sources": sources, "mask": mask}
  return {name: value.reshape((global_devices, per_device_batch) + value.shape[1:])
          for name, value in batch.items()}


class MockIterator:
  """An endless checkpointable iterator over this process's share of the global batches.

  `nan_batches`: global batch indices whose first row of device `nan_device` gets a NaN.
  `progress_file`: if set, the number of batches handed out so far is written there on each
  call (the SIGKILL test watches it).
  """

  def __init__(self, global_devices: int, per_device_batch: int, samples: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, nan_batches=(),
               nan_device: int = 0, progress_file: str | None = None):
    if global_devices % process_count:
      raise ValueError("global_devices must be a multiple of process_count")
    self.global_devices, self.per_device_batch, self.samples = (
        global_devices, per_device_batch, samples)
    self.seed = seed
    local = global_devices // process_count
    self.local_slice = slice(process_index * local, (process_index + 1) * local)
    self.process_index = process_index
    self.nan_batches, self.nan_device = set(nan_batches), nan_device
    self.progress_file = progress_file
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = global_batch(self.index, self.global_devices, self.per_device_batch, self.samples,
                         self.seed)
    if self.index in self.nan_batches:
      batch["mixture"][self.nan_device, 0, self.samples // 2] = np.nan
    self.index += 1
    if self.progress_file:
      with open(self.progress_file, "w") as handle:
        handle.write(str(self.index))
    return {name: value[self.local_slice] for name, value in batch.items()}

  def get_state(self) -> dict[str, int]:
    return {"index": self.index, "seed": self.seed, "process_index": self.process_index}

  def set_state(self, state: dict[str, int]) -> None:
    if state["seed"] != self.seed:
      raise ValueError(f"MockIterator: state of seed {state['seed']} given to seed {self.seed}")
    if state["process_index"] != self.process_index:  # Each host must get its own state back.
      raise ValueError(f"MockIterator: state of process {state['process_index']} given to "
                       f"process {self.process_index}")
    self.index = int(state["index"])


def eval_iterator(global_devices: int, per_device_batch: int, samples: int, batches: int = 2,
                  process_index: int = 0, process_count: int = 1):
  """A fresh finite evaluation iterator (a different seed from training)."""
  iterator = MockIterator(global_devices, per_device_batch, samples, seed=12345,
                          process_index=process_index, process_count=process_count)
  return (next(iterator) for _ in range(batches))
