"""Libri2Mix: two-speaker LibriSpeech mixtures with WHAM! noise."""

import csv
import itertools
import os
import pathlib
from typing import Any

from data_pipelines import errors
from data_pipelines.builders import base

_INSTRUCTIONS = """\
Point manual_dir at the folder holding `Libri2Mix/` (or at `Libri2Mix/`
itself), as written by the LibriMix scripts:

  <manual_dir>/Libri2Mix/{wav8k,wav16k}/{min,max}/
      {train-100,train-360,dev,test}/
      {mix_clean,mix_both,mix_single,s1,s2,noise}/*.wav
  <manual_dir>/Libri2Mix/{wav8k,wav16k}/{min,max}/metadata/
      mixture_{train-100,train-360,dev,test}_mix_{clean,both,single}.csv
      (optional)

When a metadata csv is present its `mixture_ID` column lists the mixtures (and
its `length` column is checked); otherwise the mixture folder is listed. Files
are paired by name, mono, at the folder's sample rate.
"""


def _configs() -> list[base.CorpusConfig]:
  """Configs such as '8k_min_clean': sample rate x mode x mixture type."""
  return [
      base.CorpusConfig(
          name=f'{base.rate_tag(rate)}_{mode}_{mixture_type}',
          description=(f'{base.rate_tag(rate)} Hz, {mode} mode, '
                       f'mix_{mixture_type}.'),
          sample_rate=rate, mode=mode, mixture_type=mixture_type)
      for rate, mode, mixture_type in itertools.product(
          base.SAMPLE_RATES, base.MODES, base.MIXTURE_TYPES)
  ]


class Libri2mix(base.CorpusBuilder):
  """Libri2Mix from the user's directory.

  Splits: train_100 (train-100), train_360 (train-360), validation (dev) and
  test; the loaders read split 'train' as every training subset present.
  Sources and noise as in WHAM!: (s1, s2) [+ noise for 'both'], or (s1, noise)
  for 'single' (enhancement).
  """

  name = 'libri2mix'
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = '8k_min_clean'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  DESCRIPTION = 'Libri2Mix two-speaker separation (Cosentino et al., 2020).'
  HOMEPAGE = 'https://github.com/JorisCos/LibriMix'
  SPLIT_FOLDERS = {'train_100': 'train-100', 'train_360': 'train-360',
                   'validation': 'dev', 'test': 'test'}
  # Split names the loaders expand to the union of the present splits.
  SPLIT_ALIASES = {'train': ('train_100', 'train_360')}

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    # Mixture path -> (length from the metadata csv, csv path).
    self._csv_lengths: dict[pathlib.Path, tuple[int, pathlib.Path]] = {}

  def corpus_root(self, manual_dir: pathlib.Path) -> pathlib.Path:
    if (manual_dir / 'Libri2Mix').is_dir():
      manual_dir = manual_dir / 'Libri2Mix'
    return super().corpus_root(manual_dir)

  def mixture_folder(self) -> str:
    return f'mix_{self.builder_config.mixture_type}'

  def source_folders(self) -> tuple[str, str]:
    if self.builder_config.mixture_type == 'single':
      return ('s1', 'noise')
    return ('s1', 's2')

  def noise_folder(self) -> str | None:
    return 'noise' if self.builder_config.has_noise_feature else None

  def _metadata_csv(self, split_dir: pathlib.Path) -> pathlib.Path:
    """`metadata/mixture_<subset>_mix_<type>.csv` next to the split folders."""
    name = (f'mixture_{split_dir.name}_mix_'
            f'{self.builder_config.mixture_type}.csv')
    return split_dir.parent / 'metadata' / name

  def list_examples(self, split: str,
                    split_dir: pathlib.Path) -> list[base.ExampleFiles]:
    examples = super().list_examples(split, split_dir)
    csv_path = self._metadata_csv(split_dir)
    if not csv_path.is_file():
      return examples
    rows = _read_metadata(csv_path)
    by_id = {files.example_id: files for files in examples}
    listed = []
    for row in rows:
      files = by_id.pop(row['mixture_ID'], None)
      if files is None:
        mixture = split_dir / self.mixture_folder() / f'{row["mixture_ID"]}.wav'
        raise errors.MissingDataError(
            f'Missing audio file {os.fspath(mixture)!r}, listed in '
            f'{os.fspath(csv_path)!r}.')
      if row.get('length'):
        self._csv_lengths[files.mixture] = (int(row['length']), csv_path)
      listed.append(files)
    if by_id:
      raise errors.DataError(
          f'{len(by_id)} mixture(s) in {os.fspath(split_dir)!r} are not listed '
          f'in {os.fspath(csv_path)!r}, e.g. {sorted(by_id)[:3]}; expected the '
          'metadata to list every mixture.')
    return listed

  def load_example(self, files: base.ExampleFiles) -> dict[str, Any]:
    example = super().load_example(files)
    expected = self._csv_lengths.get(files.mixture)
    if expected and expected[0] != len(example['mixture']):
      raise errors.LengthMismatchError(
          f'{os.fspath(files.mixture)!r} has {len(example["mixture"])} '
          f'samples, but {os.fspath(expected[1])!r} says {expected[0]}.')
    return example


def _read_metadata(csv_path: pathlib.Path) -> list[dict[str, str]]:
  """Rows of a LibriMix metadata csv; needs a `mixture_ID` column."""
  with open(csv_path, newline='') as file:
    rows = list(csv.DictReader(file))
  if rows and 'mixture_ID' not in rows[0]:
    raise errors.DataError(
        f'{os.fspath(csv_path)!r} has no mixture_ID column; expected the '
        f'LibriMix metadata columns (mixture_ID, ..., length), got '
        f'{list(rows[0])}.')
  return rows
