"""Shared parts of the corpus builders: configs, features, the folder walker.

Every builder stores one example per mixture with the same core features:

  mixture      (samples,)            float32
  sources      (2, samples)          float32  speakers, or (speech, noise)
  noise        (samples,)            float32  only where noise is in the
                                              mixture but not a source
  sample_rate  ()                    int32
  id           ()                    text     the utterance id (file stem)

Waveforms are `tfds.features.Tensor`s (not `tfds.features.Audio`, which needs
TensorFlow) and the files are written as `array_record`, read back with
`tfds.data_source` / `builder.as_data_source` and grain.
"""

import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import audio
from data_pipelines import errors

_log = logging.getLogger(__name__)

VERSION = tfds.core.Version('1.0.0')
SAMPLE_RATES = (8000, 16000)
MODES = ('min', 'max')
MIXTURE_TYPES = ('clean', 'both', 'single')

TASK_SEPARATION = 'separation'
TASK_ENHANCEMENT = 'enhancement'


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  """Sample rate, mode and mixture type of a mixture corpus.

  Attributes:
    sample_rate: 8000 or 16000 (the `wav8k` / `wav16k` folder).
    mode: 'min' (mixtures cut to the shorter utterance) or 'max' (padded).
    mixture_type: 'clean' (two speakers), 'both' (two speakers + noise) or
      'single' (one speaker + noise: enhancement, sources = speech and noise).
  """

  sample_rate: int = 8000
  mode: str = 'min'
  mixture_type: str = 'clean'

  @property
  def task(self) -> str:
    """'enhancement' for one speaker + noise, else 'separation'."""
    if self.mixture_type == 'single':
      return TASK_ENHANCEMENT
    return TASK_SEPARATION

  @property
  def has_noise_feature(self) -> bool:
    """Whether noise is in the mixture but not one of the two sources."""
    return self.mixture_type == 'both'


def rate_tag(sample_rate: int) -> str:
  """8000 -> '8k'."""
  return f'{sample_rate // 1000}k'


def waveform_feature() -> tfds.features.Tensor:
  """A variable-length float32 waveform, (samples,)."""
  return tfds.features.Tensor(shape=(None,), dtype=np.float32)


def example_features(*, has_noise: bool,
                     extra: Mapping[str, Any] | None = None
                     ) -> tfds.features.FeaturesDict:
  """The feature dict shared by all builders, plus corpus-specific `extra`."""
  features = {
      'mixture': waveform_feature(),  # (samples,)
      'sources': tfds.features.Tensor(shape=(2, None), dtype=np.float32),
      'sample_rate': tfds.features.Scalar(dtype=np.int32),
      'id': tfds.features.Text(),
  }
  if has_noise:
    features['noise'] = waveform_feature()  # (samples,)
  features.update(extra or {})
  return tfds.features.FeaturesDict(features)


def manual_directory(dl_manager: tfds.download.DownloadManager,
                     dataset_name: str, instructions: str) -> pathlib.Path:
  """The user's corpus directory, with a clear error when it is missing."""
  try:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as error:
    raise errors.MissingDataError(
        f'{dataset_name}: the corpus directory (manual_dir) does not exist or '
        f'is empty: {error.args[0].splitlines()[0]}\nPass '
        'manual_dir=<your corpus directory> to build_dataset. What it must '
        f'hold:\n{instructions}') from None


def require_directory(path: pathlib.Path, what: str) -> pathlib.Path:
  """Returns `path` if it is a directory, else raises naming what is missing."""
  if not path.is_dir():
    parent = path.parent
    present = []
    if parent.is_dir():
      present = sorted(p.name for p in parent.iterdir())
    raise errors.MissingDataError(
        f'Missing directory {os.fspath(path)!r} ({what}). '
        f'{os.fspath(parent)!r} contains: {present or "nothing"}.')
  return path


def list_wavs(directory: pathlib.Path) -> list[pathlib.Path]:
  """Sorted `*.wav` files of a directory."""
  return sorted(p for p in directory.iterdir()
                if p.suffix.lower() == '.wav' and not p.name.startswith('.'))


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
  """The wav files of one mixture."""

  example_id: str
  mixture: pathlib.Path
  sources: tuple[pathlib.Path, pathlib.Path]
  noise: pathlib.Path | None = None

  def as_roles(self) -> dict[str, pathlib.Path]:
    """Role name to path, in the order mixture, sources, noise."""
    roles = {'mixture': self.mixture, 'source_1': self.sources[0],
             'source_2': self.sources[1]}
    if self.noise is not None:
      roles['noise'] = self.noise
    return roles


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for builders reading a mixture corpus from the user's directory.

  Subclasses say where the splits and folders are; this class walks them,
  reads and checks every wav and applies the bad-data policy: raise on the
  first bad example, or with `skip_bad_files=True` skip it, then print and log
  how many were skipped (also stored in the dataset's metadata).
  """

  VERSION = VERSION
  # TFDS split name -> corpus folder name.
  SPLIT_FOLDERS: ClassVar[Mapping[str, str]] = {
      'train': 'tr', 'validation': 'cv', 'test': 'tt'}
  DESCRIPTION: ClassVar[str] = ''
  HOMEPAGE: ClassVar[str] = ''

  def __init__(self, *, skip_bad_files: bool = False, **kwargs):
    self.skip_bad_files = skip_bad_files
    super().__init__(**kwargs)
    self.skipped = errors.SkippedFiles(self.name)

  # Layout, overridden by subclasses.

  def corpus_root(self, manual_dir: pathlib.Path) -> pathlib.Path:
    """The directory holding the split folders for this config."""
    config = self.builder_config
    root = manual_dir / f'wav{rate_tag(config.sample_rate)}' / config.mode
    return require_directory(
        root, f'the {rate_tag(config.sample_rate)} {config.mode} mixtures of '
        f'{self.name}; expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')

  def mixture_folder(self) -> str:
    """Folder of the mixtures inside a split folder."""
    raise NotImplementedError

  def source_folders(self) -> tuple[str, str]:
    """Folders of the two sources inside a split folder."""
    raise NotImplementedError

  def noise_folder(self) -> str | None:
    """Folder of the noise kept as a separate feature, if any."""
    return None

  def mixture_is_sum(self) -> bool:
    """Whether the mixture equals the sum of the sources (and noise)."""
    return True

  def extra_metadata(self) -> dict[str, Any]:
    """Corpus-specific entries of the dataset metadata."""
    return {}

  def features(self) -> tfds.features.FeaturesDict:
    """The stored features of this config."""
    return example_features(has_noise=self.builder_config.has_noise_feature)

  # TFDS hooks.

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    metadata = {
        'task': config.task,
        'sample_rate': config.sample_rate,
        'mixture_is_sum': self.mixture_is_sum(),
        'has_noise_feature': config.has_noise_feature,
        **self.extra_metadata(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=self.features(),
        homepage=self.HOMEPAGE or None,
        metadata=tfds.core.MetadataDict(metadata),
    )

  def _split_generators(self, dl_manager):
    manual_dir = manual_directory(dl_manager, self.name,
                                  self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    root = self.corpus_root(manual_dir)
    generators, missing = {}, []
    for split, folder in self.SPLIT_FOLDERS.items():
      split_dir = root / folder
      if split_dir.is_dir():
        examples = self.list_examples(split, split_dir)
        generators[split] = self._generate_examples(split, examples)
      else:
        missing.append(os.fspath(split_dir))
    if not generators:
      raise errors.MissingDataError(
          f'{self.name}: no split folder found under {os.fspath(root)!r}; '
          f'expected some of {missing}.')
    if missing:
      message = (f'{self.name}: split folder(s) {missing} not found; building '
                 f'only {sorted(generators)}.')
      print(message)
      _log.warning(message)
    return generators

  def list_examples(self, split: str,
                    split_dir: pathlib.Path) -> list[ExampleFiles]:
    """Pairs every mixture with its source (and noise) files by file name."""
    del split  # Unused by the folder layouts.
    mixture_dir = require_directory(
        split_dir / self.mixture_folder(),
        f'mixtures of type {self.builder_config.mixture_type!r}')
    folders = list(self.source_folders())
    if self.noise_folder():
      folders.append(self.noise_folder())
    for folder in folders:
      require_directory(split_dir / folder, f'files paired with {mixture_dir}')
    mixtures = list_wavs(mixture_dir)
    if not mixtures:
      raise errors.MissingDataError(
          f'No .wav files in {os.fspath(mixture_dir)!r}; expected the '
          'mixtures of this split.')
    self._warn_unpaired(mixtures, [split_dir / f for f in folders])
    first, second = self.source_folders()
    noise = self.noise_folder()
    return [
        ExampleFiles(
            example_id=path.stem,
            mixture=path,
            sources=(split_dir / first / path.name,
                     split_dir / second / path.name),
            noise=split_dir / noise / path.name if noise else None,
        ) for path in mixtures
    ]

  def _warn_unpaired(self, mixtures: Sequence[pathlib.Path],
                     folders: Sequence[pathlib.Path]) -> None:
    """Logs files in source folders that no mixture refers to."""
    names = {path.name for path in mixtures}
    for folder in folders:
      unpaired = [p.name for p in list_wavs(folder) if p.name not in names]
      if unpaired:
        _log.warning('%s: %d file(s) in %s have no mixture and are ignored, '
                     'e.g. %s', self.name, len(unpaired), folder, unpaired[:3])

  def load_example(self, files: ExampleFiles) -> dict[str, Any]:
    """Reads and checks the wavs of one example."""
    sample_rate = self.builder_config.sample_rate
    waveforms = audio.read_aligned(files.as_roles(), sample_rate)
    example = {
        'mixture': waveforms['mixture'],
        'sources': np.stack([waveforms['source_1'], waveforms['source_2']]),
        'sample_rate': sample_rate,
        'id': files.example_id,
    }
    if 'noise' in waveforms:
      example['noise'] = waveforms['noise']
    return example

  def _generate_examples(self, split: str,
                         examples: Sequence[ExampleFiles]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    for files in examples:
      try:
        example = self.load_example(files)
      except (errors.DataError, errors.MissingDataError) as error:
        if not self.skip_bad_files:
          raise
        self.skipped.add(split, files.example_id, error)
        continue
      yield files.example_id, example
    self._finish_split(split)

  def _finish_split(self, split: str) -> None:
    """Reports skipped examples of a finished split and stores them."""
    if self.skip_bad_files:
      self.skipped.report(split)
      self.info.metadata['skipped_examples'] = self.skipped.as_metadata()
