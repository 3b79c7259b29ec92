"""Training and evaluation iterators: TFDS data sources + grain, no TensorFlow.

Training (`make_train_iterator`): random fixed-length crops (4 s by default),
optionally remixed on the fly, in batches shaped for data parallelism:

  {'mixture': (devices, per_device_batch, samples)     float32,
   'sources': (devices, per_device_batch, 2, samples)  float32,
   'mask':    (devices, per_device_batch, samples)     float32  1 real, 0 pad}

Full length (`make_eval_iterator`, `make_full_length_iterator`): whole
utterances zero-padded to the smallest of a few length buckets, so XLA
compiles one shape per bucket. Batches hold one bucket each and add

  {'example_mask': (devices, per_device_batch) float32  0 for filler slots,
   'length':       (devices, per_device_batch) int32    samples before padding,
   'id':           (devices, per_device_batch) str      utterance ids}

Nothing is truncated: an utterance longer than the largest bucket gets a new
bucket rounded up to a multiple of `overflow_multiple_seconds`, or raises
with `long_utterances='error'`.

Every iterator is deterministic given its seed, shards examples across hosts
(`process_index`, `process_count`), and can save its position with
`get_state()` (a JSON-serialisable dict) and resume with `set_state()`.
"""

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import registry
from data_pipelines import transforms
from data_pipelines import waveform_cache

_log = logging.getLogger(__name__)

DEFAULT_BUCKET_SECONDS = (4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
Batch = dict[str, np.ndarray]


class DataIterator:
  """An iterator of batches whose position can be saved and restored.

  `get_state()` returns a small JSON-serialisable dict (e.g. for orbax's
  `JsonSave`); `set_state()` accepts it (or its JSON text / bytes) on a fresh
  iterator made with the same arguments, which then continues exactly where
  the first one stopped.
  """

  def __init__(self, dataset: grain.IterDataset, *, sample_rate: int,
               num_batches: int | None = None,
               bucket_lengths: Sequence[int] = ()):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self.sample_rate = sample_rate
    self.num_batches = num_batches  # Per epoch; None when endless.
    self.bucket_lengths = tuple(bucket_lengths)

  def __iter__(self) -> 'DataIterator':
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError('This iterator repeats without end.')
    return self.num_batches

  def close(self) -> None:
    """Stops prefetch threads and worker processes."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()

  def __enter__(self) -> 'DataIterator':
    return self

  def __exit__(self, *unused_exception) -> None:
    self.close()

  @property
  def grain_iterator(self) -> grain.DatasetIterator:
    """The underlying grain iterator (for grain's orbax checkpoint handler)."""
    return self._iterator

  def get_state(self) -> dict[str, Any]:
    """The position, as a JSON-serialisable dict."""
    state = self._iterator.get_state()
    json.dumps(state)  # Fails loudly if grain ever returns something else.
    return state

  def set_state(self, state: Mapping[str, Any] | str | bytes) -> None:
    """Moves to a position returned by `get_state` (or its JSON)."""
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    self._iterator.set_state(dict(state))


@dataclasses.dataclass(frozen=True)
class Topology:
  """Where this host's batches go."""

  num_devices: int
  process_index: int
  process_count: int


def _topology(num_devices: int | None, process_index: int | None,
              process_count: int | None) -> Topology:
  """Fills unset values from jax (local devices, process index and count)."""
  if None in (num_devices, process_index, process_count):
    import jax  # pylint: disable=g-import-not-at-top
    if num_devices is None:
      num_devices = jax.local_device_count()
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, {process_count}).')
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}.')
  return Topology(num_devices, process_index, process_count)


def resolve_split(builder: tfds.core.DatasetBuilder, split: str) -> str:
  """Checks a split (or 'a+b' expression) and expands builder aliases."""
  available = list(builder.info.splits)
  aliases = getattr(builder, 'SPLIT_ALIASES', {})
  if split in aliases and split not in available:
    present = [name for name in aliases[split] if name in available]
    if present:
      return '+'.join(present)
  for part in split.split('+'):
    name = re.sub(r'\[.*\]$', '', part.strip())
    if name not in available:
      raise ValueError(
          f'Split {name!r} is not in {builder.name}/'
          f'{builder.builder_config.name} under {builder.data_dir!r}; '
          f'available: {available}.')
  return split


def open_split(dataset_name: str, data_dir: str | os.PathLike | None,
               split: str, *, config: str | tfds.core.BuilderConfig | None,
               manual_dir: str | os.PathLike | None = None
               ) -> tuple[Any, tfds.core.DatasetInfo, str]:
  """Returns (random-access data source, dataset info, resolved split)."""
  builder = registry.load_builder(dataset_name, data_dir, config,
                                  manual_dir=manual_dir)
  split = resolve_split(builder, split)
  return builder.as_data_source(split), builder.info, split


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  """Thread prefetching of a few batches (grain's default buffers 500)."""
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=prefetch)


def _with_workers(dataset: grain.IterDataset,
                  worker_count: int) -> grain.IterDataset:
  """Adds grain worker processes when worker_count > 0."""
  if worker_count <= 0:
    return dataset
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count))


def make_train_iterator(
    dataset_name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = 'train',
    *,
    batch_size_per_device: int,
    num_devices: int | None = None,
    crop_seconds: float = 4.0,
    seed: int = 0,
    config: str | tfds.core.BuilderConfig | None = None,
    dynamic_mixing: bool | None = None,
    gain_db: float = 2.5,
    speed_perturbation: float = 0.0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 4,
    manual_dir: str | os.PathLike | None = None,
    cache_bytes: int = 0,
) -> DataIterator:
  """Endless (or num_epochs) batches of random crops for training.

  Args:
    dataset_name: 'press_synth', 'wsj0_2mix', 'wham', 'whamr', 'libri2mix' or
      'dns_challenge'.
    data_dir: the data directory (argument, $PRESS_DATA_DIR, ./data/tfds).
    split: TFDS split or expression ('train', 'train_100+train_360', ...).
    batch_size_per_device: examples per device per batch.
    num_devices: devices on this host (default: jax.local_device_count()).
    crop_seconds: crop length; shorter utterances are zero-padded (mask 0).
    seed: seed of the order, crops and remixing.
    config: builder config (name or object); None for the default.
    dynamic_mixing: remix sources on the fly (see transforms.DynamicMix).
      None: on for datasets whose metadata asks for it (dns_challenge).
    gain_db: random source gain range of separation remixing.
    speed_perturbation: s in [0, 0.5): speed (pitch and tempo) changed by a
      factor uniform in [1 - s, 1 + s] (transforms.change_speed), per source
      with dynamic mixing, per example (all waveforms alike) without.
    shuffle: shuffle examples (reshuffled every epoch).
    num_epochs: None to repeat forever.
    process_index: this host (default: jax.process_index()).
    process_count: number of hosts (default: jax.process_count()).
    worker_count: grain worker processes (0: threads in this process).
    num_threads: reader threads.
    prefetch_batches: batches prepared ahead.
    manual_dir: the user's corpus, used if the dataset must be built first.
    cache_bytes: decoded waveforms of this host's records kept in memory after
      their first read, at most this many bytes per process (0: every crop
      decodes its record; waveform_cache.WaveformCache). The batches are the
      same either way.

  Returns:
    A DataIterator of {'mixture', 'sources', 'mask'} batches.
  """
  topology = _topology(num_devices, process_index, process_count)
  source, info, _ = open_split(dataset_name, data_dir, split, config=config,
                               manual_dir=manual_dir)
  metadata = info.metadata or {}
  sample_rate = int(metadata.get('sample_rate') or source[0]['sample_rate'])
  crop_samples = int(round(crop_seconds * sample_rate))
  if cache_bytes < 0:
    raise ValueError(f'cache_bytes must be >= 0 (bytes of decoded waveforms kept in '
                     f'memory; 0: none), got {cache_bytes}.')
  if not 0.0 <= speed_perturbation < 0.5:
    raise ValueError(f'speed_perturbation must be in [0, 0.5), got '
                     f'{speed_perturbation}.')
  if dynamic_mixing is None:
    dynamic_mixing = bool(metadata.get('dynamic_mixing_default', False))
  if dynamic_mixing and not metadata.get('mixture_is_sum', True):
    raise ValueError(
        f'{dataset_name}/{info.config_name}: the mixture is not the sum of the '
        'sources (e.g. reverberant mixture with anechoic targets), so the '
        'sources cannot be remixed; use dynamic_mixing=False.')
  batch_size = batch_size_per_device * topology.num_devices
  # Every record as float32 waveforms, kept after the first read up to cache_bytes.
  waveforms = waveform_cache.WaveformCache(source, cache_bytes)
  dataset = grain.MapDataset.source(waveforms)
  dataset = dataset[topology.process_index::topology.process_count]
  if len(dataset) == 0:
    raise ValueError(f'{dataset_name}/{split} has no examples for process '
                     f'{topology.process_index} of {topology.process_count}.')
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)
  if dynamic_mixing:
    snr_range = tuple(metadata.get('snr_range_db', (0.0, 40.0)))
    remix = transforms.DynamicMix(
        source=waveforms, crop_samples=crop_samples,
        enhancement=metadata.get('task') == 'enhancement', gain_db=gain_db,
        snr_range_db=snr_range, speed_perturbation=speed_perturbation)
    dataset = dataset.random_map(remix, seed=seed)
  else:
    dataset = dataset.random_map(
        transforms.RandomCrop(crop_samples, speed_perturbation), seed=seed)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.map(transforms.SplitDevices(topology.num_devices))
  iterable = dataset.to_iter_dataset(
      _read_options(num_threads, prefetch_batches))
  return DataIterator(_with_workers(iterable, worker_count),
                      sample_rate=sample_rate,
                      num_batches=None if num_epochs is None else len(dataset))


def example_lengths(source: Sequence[Mapping[str, Any]],
                    cache_path: str | None = None) -> np.ndarray:
  """Mixture length of every record (cached as JSON next to the data)."""
  if cache_path and os.path.exists(cache_path):
    with open(cache_path) as file:
      cached = json.load(file)
    if len(cached) == len(source):
      return np.asarray(cached, np.int64)
  lengths = np.asarray([len(source[i]['mixture']) for i in range(len(source))],
                       np.int64)
  if cache_path:
    try:
      with open(cache_path + '.tmp', 'w') as file:
        json.dump(lengths.tolist(), file)
      os.replace(cache_path + '.tmp', cache_path)
    except OSError as error:  # A read-only data directory: just recompute.
      _log.info('Not caching lengths at %s: %s', cache_path, error)
  return lengths


def assign_buckets(lengths: np.ndarray, bucket_samples: Sequence[int], *,
                   long_utterances: str = 'new_bucket',
                   overflow_multiple: int = 1,
                   ids: Sequence[str] | None = None
                   ) -> tuple[np.ndarray, list[int]]:
  """Maps each length to the smallest bucket that holds it.

  Args:
    lengths: (examples,) lengths in samples.
    bucket_samples: bucket lengths in samples.
    long_utterances: 'new_bucket' adds buckets for longer utterances, rounded
      up to a multiple of overflow_multiple; 'error' raises.
    overflow_multiple: rounding of new buckets, in samples.
    ids: example descriptions for error messages.

  Returns:
    (bucket length per example, sorted list of the bucket lengths in use).
  """
  buckets = sorted(set(int(b) for b in bucket_samples))
  if not buckets:
    raise ValueError('bucket_samples must not be empty.')
  too_long = np.flatnonzero(lengths > buckets[-1])
  if too_long.size:
    index = int(too_long[np.argmax(lengths[too_long])])
    name = ids[index] if ids is not None else f'example {index}'
    message = (f'{too_long.size} utterance(s) are longer than the largest '
               f'bucket ({buckets[-1]} samples), the longest being {name} '
               f'({lengths[index]} samples)')
    if long_utterances == 'error':
      raise ValueError(message + '; add a larger bucket or use '
                       "long_utterances='new_bucket'.")
    if long_utterances != 'new_bucket':
      raise ValueError(f'long_utterances must be "new_bucket" or "error", '
                       f'got {long_utterances!r}.')
    extra = sorted({int(math.ceil(lengths[i] / overflow_multiple)) *
                    overflow_multiple for i in too_long})
    _log.warning('%s; added bucket(s) %s.', message, extra)
    buckets += extra
  positions = np.searchsorted(np.asarray(buckets), lengths, side='left')
  assigned = np.asarray(buckets)[positions]
  return assigned, sorted(set(assigned.tolist()))


class PlannedBatches(grain.MapDataset):
  """Batches of example indices grouped by bucket, planned per epoch.

  Element i is (bucket length, this host's slice of global batch i): a list of
  example indices, -1 for filler slots of a bucket's last batch. With shuffle,
  each epoch reshuffles examples within buckets and the order of batches.
  """

  def __init__(self, buckets: np.ndarray, *, global_batch_size: int,
               host_slice: slice, shuffle: bool, seed: int,
               num_epochs: int | None):
    super().__init__()
    self._buckets = buckets
    self._global_batch_size = global_batch_size
    self._host_slice = host_slice
    self._shuffle = shuffle
    self._seed = seed
    self._num_epochs = num_epochs
    self._cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
    self.batches_per_epoch = len(self._plan(0))

  def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The global batches of one epoch."""
    if self._cache is not None and self._cache[0] == epoch:
      return self._cache[1]
    rng = np.random.default_rng([self._seed, epoch])
    plan = []
    for bucket in sorted(set(self._buckets.tolist())):
      members = np.flatnonzero(self._buckets == bucket)
      if self._shuffle:
        members = rng.permutation(members)
      for start in range(0, len(members), self._global_batch_size):
        chunk = members[start:start + self._global_batch_size]
        filler = self._global_batch_size - len(chunk)
        plan.append((bucket, np.concatenate([chunk, np.full(filler, -1)])))
    if self._shuffle:
      plan = [plan[i] for i in rng.permutation(len(plan))]
    self._cache = (epoch, plan)
    return plan

  def __len__(self) -> int:
    if self._num_epochs is None:
      return sys.maxsize
    return self.batches_per_epoch * self._num_epochs

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, self.batches_per_epoch)
    bucket, indices = self._plan(epoch)[position]
    return bucket, indices[self._host_slice]

  def __str__(self) -> str:
    return f'PlannedBatches(batches_per_epoch={self.batches_per_epoch})'


@dataclasses.dataclass(frozen=True)
class LoadPaddedBatch(grain.transforms.Map):
  """Reads the examples of a planned batch and pads them to its bucket."""

  source: Sequence[Mapping[str, Any]]
  num_devices: int

  def map(self, element):
    bucket, indices = element
    size = len(indices)
    batch = {
        'mixture': np.zeros((size, bucket), np.float32),
        'sources': np.zeros((size, 2, bucket), np.float32),
        'mask': np.zeros((size, bucket), np.float32),
        'example_mask': np.zeros((size,), np.float32),
        'length': np.zeros((size,), np.int32),
        'id': np.full((size,), '', dtype=object),
    }
    for slot, index in enumerate(indices):
      if index < 0:
        continue
      record = self.source[int(index)]
      length = len(record['mixture'])
      batch['mixture'][slot, :length] = record['mixture']
      batch['sources'][slot, :, :length] = record['sources']
      batch['mask'][slot, :length] = 1.0
      batch['example_mask'][slot] = 1.0
      batch['length'][slot] = length
      example_id = record['id']
      batch['id'][slot] = (example_id.decode() if isinstance(example_id, bytes)
                           else str(example_id))
    batch['id'] = batch['id'].astype(str)
    return {key: value.reshape(self.num_devices, -1, *value.shape[1:])
            for key, value in batch.items()}


def make_full_length_iterator(
    dataset_name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = 'test',
    *,
    batch_size_per_device: int = 1,
    num_devices: int | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    bucket_seconds: Sequence[float] = DEFAULT_BUCKET_SECONDS,
    long_utterances: str = 'new_bucket',
    overflow_multiple_seconds: float = 4.0,
    shuffle: bool = False,
    seed: int = 0,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    num_threads: int = 2,
    prefetch_batches: int = 2,
    manual_dir: str | os.PathLike | None = None,
) -> DataIterator:
  """Whole utterances padded to length buckets (fine-tuning and evaluation).

  Every example appears exactly once per epoch. Each global batch holds
  examples of one bucket; its last batch is filled with empty slots
  (example_mask 0). Every host gets the same number of batches with the same
  shapes, so collectives line up.

  Args:
    dataset_name: the dataset name.
    data_dir: the data directory.
    split: TFDS split or expression.
    batch_size_per_device: examples per device per batch.
    num_devices: devices on this host (default: jax.local_device_count()).
    config: builder config (name or object).
    bucket_seconds: bucket lengths in seconds.
    long_utterances: 'new_bucket' (default) or 'error' for utterances longer
      than the largest bucket.
    overflow_multiple_seconds: new buckets are rounded up to this multiple.
    shuffle: shuffle within buckets and the batch order, per epoch.
    seed: seed of the shuffling.
    num_epochs: passes over the data (None: forever).
    process_index: this host (default: jax.process_index()).
    process_count: number of hosts (default: jax.process_count()).
    worker_count: grain worker processes.
    num_threads: reader threads.
    prefetch_batches: batches prepared ahead.
    manual_dir: the user's corpus, used if the dataset must be built first.

  Returns:
    A DataIterator of {'mixture', 'sources', 'mask', 'example_mask',
    'length', 'id'} batches; `num_batches` and `bucket_lengths` describe it.
  """
  topology = _topology(num_devices, process_index, process_count)
  builder = registry.load_builder(dataset_name, data_dir, config,
                                  manual_dir=manual_dir)
  split = resolve_split(builder, split)
  source = builder.as_data_source(split)
  sample_rate = int((builder.info.metadata or {}).get('sample_rate') or
                    source[0]['sample_rate'])
  cache_name = 'lengths-' + re.sub(r'[^A-Za-z0-9_.+-]', '_', split) + '.json'
  lengths = example_lengths(source, os.path.join(builder.data_dir, cache_name))
  buckets, bucket_lengths = assign_buckets(
      lengths, [int(round(s * sample_rate)) for s in bucket_seconds],
      long_utterances=long_utterances,
      overflow_multiple=int(round(overflow_multiple_seconds * sample_rate)),
      ids=_LazyIds(source))
  local_size = batch_size_per_device * topology.num_devices
  host_slice = slice(topology.process_index * local_size,
                     (topology.process_index + 1) * local_size)
  plan = PlannedBatches(
      buckets, global_batch_size=local_size * topology.process_count,
      host_slice=host_slice, shuffle=shuffle, seed=seed, num_epochs=num_epochs)
  dataset = plan.map(LoadPaddedBatch(source, topology.num_devices))
  iterable = dataset.to_iter_dataset(
      _read_options(num_threads, prefetch_batches))
  return DataIterator(_with_workers(iterable, worker_count),
                      sample_rate=sample_rate,
                      num_batches=plan.batches_per_epoch,
                      bucket_lengths=bucket_lengths)


class _LazyIds:
  """Example ids read on demand (for error messages only)."""

  def __init__(self, source: Sequence[Mapping[str, Any]]):
    self._source = source

  def __getitem__(self, index: int) -> str:
    example_id = self._source[index]['id']
    return example_id.decode() if isinstance(example_id, bytes) else example_id


def make_eval_iterator(
    dataset_name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = 'test',
    *,
    batch_size_per_device: int = 1,
    num_devices: int | None = None,
    **kwargs,
) -> DataIterator:
  """One ordered pass over whole utterances (see make_full_length_iterator)."""
  kwargs.setdefault('shuffle', False)
  kwargs.setdefault('num_epochs', 1)
  return make_full_length_iterator(
      dataset_name, data_dir, split,
      batch_size_per_device=batch_size_per_device, num_devices=num_devices,
      **kwargs)
