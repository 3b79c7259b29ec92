"""DNS-Challenge 2020 style speech enhancement (speech + noise)."""

import dataclasses
import os
import pathlib
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import audio
from data_pipelines import errors
from data_pipelines.builders import base

NATIVE_SAMPLE_RATE = 16000

_INSTRUCTIONS = """\
Point manual_dir at the DNS-Challenge `datasets/` folder (all files 16 kHz
mono; the 8k configs resample):

  <manual_dir>/clean/**/*.wav    clean speech for training and validation
  <manual_dir>/noise/**/*.wav    noise clips for training and validation
  <manual_dir>/test_set/synthetic/{no_reverb,with_reverb}/
      clean/clean_fileid_<N>.wav, noisy/<anything>_fileid_<N>.wav
      [noise/noise_fileid_<N>.wav]

Training speech is mixed with a noise clip at a random SNR (seeded, at build
time; the train loader re-draws the noise and SNR on the fly). A share of the
clean files (validation_fraction) is held out for validation. The test set
pairs clean and noisy files by their fileid. Either part may be absent.
"""


@dataclasses.dataclass(eq=False)
class DnsConfig(base.CorpusConfig):
  """DNS config.

  Attributes:
    test_condition: 'no_reverb' or 'with_reverb' (the synthetic test set).
    snr_low_db: lowest training SNR (speech over noise).
    snr_high_db: highest training SNR.
    validation_fraction: share of clean training files held out.
    seed: seed of the validation hold-out, noise choice and SNRs.
  """

  mixture_type: str = 'single'
  test_condition: str = 'no_reverb'
  snr_low_db: float = 0.0
  snr_high_db: float = 40.0
  validation_fraction: float = 0.05
  seed: int = 0


def _configs() -> list[DnsConfig]:
  """'16k' (default), '8k', '16k_with_reverb' and '8k_with_reverb'."""
  configs = []
  for condition in ('no_reverb', 'with_reverb'):
    for rate in (16000, 8000):
      suffix = '' if condition == 'no_reverb' else '_with_reverb'
      configs.append(DnsConfig(
          name=f'{base.rate_tag(rate)}{suffix}',
          description=f'{base.rate_tag(rate)} Hz, test set {condition}.',
          sample_rate=rate, test_condition=condition))
  return configs


def _speech_power(waveform: np.ndarray) -> float:
  """Mean power of a waveform (float64)."""
  return float(np.mean(np.square(waveform, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class TestPair:
  """The files of one test example, paired by fileid."""

  example_id: str
  clean: pathlib.Path
  noisy: pathlib.Path
  noise: pathlib.Path | None = None


def _example_rng(seed: int, example_id: str) -> np.random.Generator:
  """A generator that depends only on the seed and the example id."""
  return np.random.default_rng([seed, zlib.crc32(example_id.encode())])


def _fit_length(noise: np.ndarray, num_samples: int,
                rng: np.random.Generator) -> np.ndarray:
  """Tiles the noise if short, then takes a random window of `num_samples`."""
  if len(noise) < num_samples:
    noise = np.tile(noise, -(-num_samples // len(noise)))
  start = rng.integers(0, len(noise) - num_samples + 1)
  return noise[start:start + num_samples]


class DnsChallenge(base.CorpusBuilder):
  """DNS-Challenge 2020 enhancement: sources are (speech, noise)."""

  name = 'dns_challenge'
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = '16k'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  DESCRIPTION = 'DNS-Challenge 2020 speech enhancement (Reddy et al., 2020).'
  HOMEPAGE = 'https://github.com/microsoft/DNS-Challenge'
  FILEID_PATTERN = re.compile(r'fileid_(\d+)\.wav$', re.IGNORECASE)

  def extra_metadata(self) -> dict[str, Any]:
    config = self.builder_config
    return {'snr_range_db': [config.snr_low_db, config.snr_high_db],
            'dynamic_mixing_default': True}

  def features(self) -> tfds.features.FeaturesDict:
    return base.example_features(
        has_noise=False,
        extra={'snr_db': tfds.features.Scalar(dtype=np.float32)})

  def _read(self, path: pathlib.Path) -> np.ndarray:
    """Reads a 16 kHz file and resamples it to the config's rate."""
    waveform = audio.read_wav(path, NATIVE_SAMPLE_RATE)
    return audio.resample(waveform, NATIVE_SAMPLE_RATE,
                          self.builder_config.sample_rate)

  def _split_generators(self, dl_manager):
    root = base.manual_directory(dl_manager, self.name,
                                 self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    generators = {}
    if (root / 'clean').is_dir() or (root / 'noise').is_dir():
      generators.update(self._training_generators(root))
    test_dir = (root / 'test_set' / 'synthetic' /
                self.builder_config.test_condition)
    if test_dir.is_dir():
      generators['test'] = self._generate_test(self._test_pairs(test_dir))
    if not generators:
      raise errors.MissingDataError(
          f'{self.name}: found neither {os.fspath(root / "clean")!r} + '
          f'{os.fspath(root / "noise")!r} nor {os.fspath(test_dir)!r}. '
          f'Expected layout:\n{_INSTRUCTIONS}')
    return generators

  def _training_generators(self, root: pathlib.Path) -> dict[str, Iterator]:
    """Train and validation generators from the clean and noise folders."""
    clean_dir = base.require_directory(root / 'clean', 'clean training speech')
    noise_dir = base.require_directory(root / 'noise', 'training noise clips')
    clean = sorted(clean_dir.rglob('*.wav'))
    noise = sorted(noise_dir.rglob('*.wav'))
    for folder, files in ((clean_dir, clean), (noise_dir, noise)):
      if not files:
        raise errors.MissingDataError(
            f'No .wav files in {os.fspath(folder)!r}.')
    config = self.builder_config
    order = np.random.default_rng(config.seed).permutation(len(clean))
    num_validation = 0
    if len(clean) > 1 and config.validation_fraction > 0:
      num_validation = max(1, round(len(clean) * config.validation_fraction))
    validation = sorted(clean[i] for i in order[:num_validation])
    train = sorted(clean[i] for i in order[num_validation:])
    generators = {'train': self._generate_training('train', train, clean_dir,
                                                   noise)}
    if validation:
      generators['validation'] = self._generate_training(
          'validation', validation, clean_dir, noise)
    return generators

  def _generate_training(self, split: str, clean: Sequence[pathlib.Path],
                         clean_dir: pathlib.Path,
                         noise: Sequence[pathlib.Path]):
    for path in clean:
      example_id = path.relative_to(clean_dir).with_suffix('').as_posix()
      example_id = example_id.replace('/', '_')
      try:
        example = self._mix_training_example(example_id, path, noise)
      except (errors.DataError, errors.MissingDataError) as error:
        if not self.skip_bad_files:
          raise
        self.skipped.add(split, example_id, error)
        continue
      yield example_id, example
    self._finish_split(split)

  def _mix_training_example(self, example_id: str, clean_path: pathlib.Path,
                            noise_paths: Sequence[pathlib.Path]
                            ) -> dict[str, Any]:
    """Mixes one clean file with a seeded noise clip at a seeded SNR."""
    config = self.builder_config
    rng = _example_rng(config.seed, example_id)
    speech = self._read(clean_path)  # (samples,)
    noise_path = noise_paths[rng.integers(len(noise_paths))]
    noise = _fit_length(self._read(noise_path), len(speech), rng)
    for path, waveform in ((clean_path, speech), (noise_path, noise)):
      if _speech_power(waveform) == 0.0:
        raise errors.BadAudioError(
            f'{os.fspath(path)!r} is all zeros; expected audible audio.')
    snr_db = rng.uniform(config.snr_low_db, config.snr_high_db)
    gain = np.sqrt(_speech_power(speech) / _speech_power(noise)
                   / 10.0 ** (snr_db / 10.0))
    sources = np.stack([speech, noise * gain])  # (2, samples)
    peak = np.max(np.abs(sources.sum(0)))
    if peak > 0.99:
      sources *= 0.99 / peak
    sources = sources.astype(np.float32)
    return {
        'mixture': sources.sum(0),
        'sources': sources,
        'sample_rate': config.sample_rate,
        'id': example_id,
        'snr_db': np.float32(snr_db),
    }

  def _test_pairs(self, test_dir: pathlib.Path) -> list[TestPair]:
    """Pairs clean/*fileid_N.wav with noisy/*fileid_N.wav (and noise/)."""
    clean_dir = base.require_directory(test_dir / 'clean', 'clean test speech')
    noisy_dir = base.require_directory(test_dir / 'noisy', 'noisy test speech')
    noisy = self._by_fileid(noisy_dir)
    noise_dir = test_dir / 'noise'
    noise = self._by_fileid(noise_dir) if noise_dir.is_dir() else {}
    pairs = []
    for fileid, clean_path in sorted(self._by_fileid(clean_dir).items()):
      if fileid not in noisy:
        raise errors.MissingDataError(
            f'No noisy file for {os.fspath(clean_path)!r}: expected '
            f'{os.fspath(noisy_dir)}/*fileid_{fileid}.wav.')
      pairs.append(TestPair(
          example_id=f'fileid_{fileid}', clean=clean_path,
          noisy=noisy.pop(fileid), noise=noise.get(fileid)))
    if noisy:
      raise errors.MissingDataError(
          f'No clean file for {os.fspath(next(iter(noisy.values())))!r} '
          f'(and {len(noisy) - 1} more): expected '
          f'{os.fspath(clean_dir)}/clean_fileid_<N>.wav.')
    return pairs

  def _by_fileid(self, directory: pathlib.Path) -> dict[int, pathlib.Path]:
    """fileid -> path for the wavs of a folder; the id must be unique."""
    files = {}
    for path in base.list_wavs(directory):
      match = self.FILEID_PATTERN.search(path.name)
      if not match:
        raise errors.DataError(
            f'{os.fspath(path)!r} has no fileid; expected a name ending in '
            '_fileid_<N>.wav.')
      fileid = int(match.group(1))
      if fileid in files:
        raise errors.DataError(
            f'{os.fspath(path)!r} and {os.fspath(files[fileid])!r} share '
            f'fileid {fileid}; expected one file per fileid.')
      files[fileid] = path
    if not files:
      raise errors.MissingDataError(
          f'No .wav files in {os.fspath(directory)!r}.')
    return files

  def _generate_test(self, pairs: Sequence[TestPair]):
    for pair in pairs:
      try:
        example = self._load_test_example(pair)
      except (errors.DataError, errors.MissingDataError) as error:
        if not self.skip_bad_files:
          raise
        self.skipped.add('test', pair.example_id, error)
        continue
      yield pair.example_id, example
    self._finish_split('test')

  def _load_test_example(self, pair: TestPair) -> dict[str, Any]:
    """Reads a clean/noisy pair; the noise is noisy - clean unless given."""
    paths = {'noisy': pair.noisy, 'clean': pair.clean}
    if pair.noise is not None:
      paths['noise'] = pair.noise
    waveforms = {role: self._read(path) for role, path in paths.items()}
    lengths = {role: len(waveform) for role, waveform in waveforms.items()}
    if len(set(lengths.values())) > 1:
      described = ', '.join(f'{os.fspath(paths[role])!r}: {length} samples'
                            for role, length in lengths.items())
      raise errors.LengthMismatchError(
          f'Files of test example {pair.example_id} differ in length '
          f'({described}); expected equal lengths.')
    speech = waveforms['clean']
    noise = waveforms.get('noise', waveforms['noisy'] - speech)
    snr_db = 10 * np.log10(max(_speech_power(speech), 1e-20) /
                           max(_speech_power(noise), 1e-20))
    return {
        'mixture': waveforms['noisy'],
        'sources': np.stack([speech, noise]).astype(np.float32),
        'sample_rate': self.builder_config.sample_rate,
        'id': pair.example_id,
        'snr_db': np.float32(snr_db),
    }
