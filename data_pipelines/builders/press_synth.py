"""press_synth: the embedded corpus, synthesised locally with eSpeak NG.

Nothing is downloaded: speech comes from eSpeak NG (pip `espeakng-loader`)
with 80 synthetic speakers (accent, variant, pitch, pitch range, rate),
sentences come from an embedded word list, and noise is synthesised with
numpy. Splits are speaker-disjoint (60/10/10 speakers). Two-speaker mixtures
have a relative level drawn from [-5, 5] dB; the noisy types add noise at an
SNR drawn from [-5, 10] dB. Every example is a function of (seed, split,
index), so the same config gives byte-identical files.

Configs are named '<type>_<rate>[_<size>]', e.g. 'clean_8k' (the default,
2000/200/200 mixtures), 'single_16k_small' (200/50/50) or 'both_8k_tiny'
(24/8/8); any size and seed is reachable as
'<type>_<rate>_n<train>-<validation>-<test>[_seed<seed>]'.
"""

import concurrent.futures
import dataclasses
import itertools
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import base
from data_pipelines.synth import mixtures
from data_pipelines.synth import speakers as speakers_lib
from data_pipelines.synth import words

SIZES = {'': (2000, 200, 200), 'small': (200, 50, 50), 'tiny': (24, 8, 8)}
_NAME_PATTERN = re.compile(
    r'^(?P<type>clean|both|single)_(?P<rate>8|16)k'
    r'(?:_(?P<size>small|tiny)|_n(?P<train>\d+)-(?P<validation>\d+)-'
    r'(?P<test>\d+))?(?:_seed(?P<seed>\d+))?$')


@dataclasses.dataclass(eq=False)
class PressSynthConfig(tfds.core.BuilderConfig):
  """Size, seed and recipe of a press_synth build.

  Attributes:
    sample_rate: 8000 or 16000.
    mixture_type: 'clean', 'both' (+ noise) or 'single' (enhancement).
    num_train: training mixtures.
    num_validation: validation mixtures.
    num_test: test mixtures.
    seed: the corpus seed (speakers, sentences, levels, noise).
    speaker_counts: speakers in the train, validation and test splits.
    min_seconds: shortest mixture.
    max_seconds: longest mixture.
    max_relative_level_db: bound of the relative level of the two speakers.
    snr_low_db: lowest SNR of the noisy types.
    snr_high_db: highest SNR of the noisy types.
  """

  sample_rate: int = 8000
  mixture_type: str = 'clean'
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  seed: int = 0
  speaker_counts: tuple[int, int, int] = (60, 10, 10)
  min_seconds: float = 2.0
  max_seconds: float = 6.0
  max_relative_level_db: float = 5.0
  snr_low_db: float = -5.0
  snr_high_db: float = 10.0

  @property
  def recipe(self) -> mixtures.Recipe:
    """The mixing recipe of this config."""
    return mixtures.Recipe(
        sample_rate=self.sample_rate, mixture_type=self.mixture_type,
        min_seconds=self.min_seconds, max_seconds=self.max_seconds,
        max_relative_level_db=self.max_relative_level_db,
        snr_low_db=self.snr_low_db, snr_high_db=self.snr_high_db)

  @property
  def split_sizes(self) -> dict[str, int]:
    """Examples per split."""
    return {'train': self.num_train, 'validation': self.num_validation,
            'test': self.num_test}


def _config(mixture_type: str, sample_rate: int, size: str = '',
            sizes: tuple[int, int, int] | None = None,
            seed: int = 0) -> PressSynthConfig:
  """A config with its canonical name."""
  name = f'{mixture_type}_{base.rate_tag(sample_rate)}'
  if sizes is None:
    sizes = SIZES[size]
    name += f'_{size}' if size else ''
  else:
    name += '_n{}-{}-{}'.format(*sizes)
  if seed:
    name += f'_seed{seed}'
  num_train, num_validation, num_test = sizes
  return PressSynthConfig(
      name=name,
      description=(f'{mixture_type} mixtures at {sample_rate} Hz, '
                   f'{num_train}/{num_validation}/{num_test} examples, '
                   f'seed {seed}.'),
      sample_rate=sample_rate, mixture_type=mixture_type, num_train=num_train,
      num_validation=num_validation, num_test=num_test, seed=seed)


def _content(config: PressSynthConfig) -> tuple[Any, ...]:
  """The fields that decide what a config builds (all but name and docs)."""
  return tuple(getattr(config, field.name)
               for field in dataclasses.fields(PressSynthConfig)
               if field.name not in ('name', 'description', 'version',
                                     'release_notes', 'supported_versions',
                                     'tags'))


def _predefined_configs() -> list[PressSynthConfig]:
  """All types x rates x preset sizes; 'clean_8k' first (the default)."""
  return [_config(mixture_type, rate, size)
          for size, mixture_type, rate in itertools.product(
              SIZES, base.MIXTURE_TYPES, base.SAMPLE_RATES)]


class PressSynth(tfds.core.GeneratorBasedBuilder):
  """The embedded, locally synthesised multi-speaker corpus."""

  name = 'press_synth'
  VERSION = base.VERSION
  BUILDER_CONFIGS = _predefined_configs()
  DEFAULT_CONFIG_NAME = 'clean_8k'

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """Like any TFDS builder; `num_workers` synthesis processes (None: auto)."""
    self.num_workers = num_workers
    super().__init__(**kwargs)

  @classmethod
  def config_from_name(cls, name: str) -> PressSynthConfig:
    """A predefined config, or one parsed from '<type>_<rate>_n<a>-<b>-<c>'."""
    for config in cls.BUILDER_CONFIGS:
      if config.name == name:
        return config
    match = _NAME_PATTERN.match(name)
    if not match:
      raise ValueError(
          f'Unknown press_synth config {name!r}; expected e.g. clean_8k, '
          'both_16k_small, single_8k_tiny or clean_8k_n40-10-10_seed3.')
    parts = match.groupdict()
    sizes = None
    if parts['train'] is not None:
      sizes = (int(parts['train']), int(parts['validation']),
               int(parts['test']))
    config = _config(parts['type'], int(parts['rate']) * 1000,
                     parts['size'] or '', sizes, int(parts['seed'] or 0))
    for predefined in cls.BUILDER_CONFIGS:  # Same content as a preset name.
      if _content(predefined) == _content(config):
        return predefined
    return config

  def _speakers(self) -> list[speakers_lib.Speaker]:
    """The speakers of this config."""
    config = self.builder_config
    return speakers_lib.make_speakers(config.seed, config.speaker_counts)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    extra = {'speakers': tfds.features.Tensor(shape=(2,), dtype=np.str_)}
    if config.mixture_type != 'single':
      extra['relative_level_db'] = tfds.features.Scalar(dtype=np.float32)
    if config.recipe.has_noise:
      extra['snr_db'] = tfds.features.Scalar(dtype=np.float32)
    metadata = {
        'task': (base.TASK_ENHANCEMENT if config.mixture_type == 'single'
                 else base.TASK_SEPARATION),
        'sample_rate': config.sample_rate,
        'mixture_is_sum': True,
        'has_noise_feature': config.mixture_type == 'both',
        'relative_level_range_db': [-config.max_relative_level_db,
                                    config.max_relative_level_db],
        'snr_range_db': [config.snr_low_db, config.snr_high_db],
        'seed': config.seed,
        'vocabulary_size': words.vocabulary_size(),
        'speakers': [dataclasses.asdict(s) for s in self._speakers()],
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=base.example_features(has_noise=config.mixture_type == 'both',
                                       extra=extra),
        metadata=tfds.core.MetadataDict(metadata),
    )

  def _workers(self) -> int:
    """Synthesis processes: the requested number, or 2+ for large builds."""
    if self.num_workers is not None:
      return self.num_workers
    total = sum(self.builder_config.split_sizes.values())
    return 0 if total < 400 else min(os.cpu_count() or 1, 4)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download or read.
    speakers = self._speakers()
    splits = [(split, count) for split, count
              in self.builder_config.split_sizes.items() if count]
    workers = self._workers()
    pool = mixtures.make_pool(workers) if workers > 0 else None
    return {
        split: self._generate_examples(
            split, count, speakers_lib.speakers_of_split(speakers, split),
            pool, last=split == splits[-1][0])
        for split, count in splits
    }

  def _generate_examples(self, split: str, count: int,
                         split_speakers: list[speakers_lib.Speaker],
                         pool: concurrent.futures.Executor | None,
                         last: bool) -> Any:
    config = self.builder_config
    try:
      yield from mixtures.generate(split, count, split_speakers, config.recipe,
                                   config.seed, pool)
    except BaseException:
      if pool is not None:
        pool.shutdown(cancel_futures=True)
      raise
    if pool is not None and last:
      pool.shutdown()
