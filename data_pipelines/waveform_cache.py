"""A split's decoded waveforms kept in memory after their first read (bounded).

Why: a training crop of 1 s reads its whole record. For press_synth a record
is ~4.8 s of mixture and two sources (~460 KB of float32, zstd-compressed in
array_record), and reading and decoding eight of them took ~9 ms per batch on
the 2-core CPU the demo trains on, while the training step is ~75 ms: about a
tenth of the CPU went to decompressing the same 2000 records every epoch
(README, "Speed"; docs/data.md, "The waveform cache"). The crops and the
random order are unchanged: the cache returns exactly what the source decodes.

Memory is bounded by `max_bytes` per process: records are kept in the order
they are first read until the next one would pass the bound; the rest are read
from disk every time. Each grain worker process holds its own cache (a worker
unpickles an empty one), so with `worker_count` workers the bound applies per
worker. The arrays are read-only: a transform that wrote into its input would
raise instead of changing the cached record.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipelines import transforms


class WaveformCache(Sequence):
  """Random access to `transforms.waveforms_of(source[i])`, cached up to `max_bytes`.

  Args:
    source: random-access records (a TFDS data source).
    max_bytes: the most waveform bytes kept (0: nothing kept, every read
      decodes the record).
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], max_bytes: int):
    if max_bytes < 0:
      raise ValueError(f'WaveformCache: max_bytes must be >= 0, got {max_bytes}.')
    self._source = source
    self.max_bytes = int(max_bytes)
    self._init_cache()

  def _init_cache(self) -> None:
    self._cache: dict[int, transforms.Example] = {}
    self._lock = threading.Lock()  # grain's reader threads call __getitem__ at once.
    self.cached_bytes = 0
    self.full = self.max_bytes == 0  # Set once a record did not fit: no more are kept.

  def __len__(self) -> int:
    return len(self._source)

  @property
  def cached_records(self) -> int:
    """How many records are held."""
    return len(self._cache)

  def __getitem__(self, index):
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f'WaveformCache: index {index} out of range for '
                       f'{len(self)} records.')
    index %= len(self)
    example = self._cache.get(index)
    if example is not None:
      return example
    example = transforms.waveforms_of(self._source[index])
    if self.full:
      return example
    size = sum(value.nbytes for value in example.values())
    with self._lock:
      if index in self._cache:  # Another thread decoded it meanwhile.
        return self._cache[index]
      if self.cached_bytes + size > self.max_bytes:
        self.full = True
        return example
      for value in example.values():
        value.flags.writeable = False
      self._cache[index] = example
      self.cached_bytes += size
    return example

  def __getstate__(self) -> dict[str, Any]:
    # A worker process starts with an empty cache of its own (a lock does not pickle).
    return {'source': self._source, 'max_bytes': self.max_bytes}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._source = state['source']
    self.max_bytes = state['max_bytes']
    self._init_cache()

