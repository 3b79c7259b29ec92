"""Corpus builders on small generated trees in each supported layout."""

import csv
import os
import pathlib

import numpy as np
import pytest
import soundfile

from data_pipelines import registry

RATE = 8000
SPLITS = {'train': 'tr', 'validation': 'cv', 'test': 'tt'}
COUNTS = {'tr': 3, 'cv': 2, 'tt': 2}


def write_wav(path: pathlib.Path, waveform: np.ndarray, rate: int = RATE,
              subtype: str = 'FLOAT') -> None:
  """Writes a wav, creating folders."""
  path.parent.mkdir(parents=True, exist_ok=True)
  soundfile.write(path, waveform, rate, subtype=subtype)


def reverberate(waveform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A cheap stand-in for a room: convolution with a short decaying IR."""
  response = rng.standard_normal(80) * np.exp(-np.arange(80) / 15.0)
  response[0] = 1.0
  return np.convolve(waveform, response)[:len(waveform)].astype(np.float32)


def make_corpus_tree(root: pathlib.Path, split_counts: dict[str, int], *,
                     rate: int = RATE, with_reverb: bool = False,
                     seed: int = 0) -> None:
  """WHAM!/WHAMR!-style folders: every mixture type, sources and noise."""
  rng = np.random.default_rng(seed)
  for split_folder, count in split_counts.items():
    for index in range(count):
      name = f'{split_folder}_utt{index:02d}.wav'
      length = int(rng.integers(rate // 2, rate))
      s1, s2, noise = (0.1 * rng.standard_normal((3, length))).astype(
          np.float32)
      rooms = {'': (s1, s2)}
      if with_reverb:
        rooms = {'_anechoic': (s1, s2),
                 '_reverb': (reverberate(s1, rng), reverberate(s2, rng))}
      for suffix, (first, second) in rooms.items():
        write_wav(root / split_folder / f's1{suffix}' / name, first, rate)
        write_wav(root / split_folder / f's2{suffix}' / name, second, rate)
        write_wav(root / split_folder / f'mix_clean{suffix}' / name,
                  first + second, rate)
        write_wav(root / split_folder / f'mix_both{suffix}' / name,
                  first + second + noise, rate)
        write_wav(root / split_folder / f'mix_single{suffix}' / name,
                  first + noise, rate)
      write_wav(root / split_folder / 'noise' / name, noise, rate)
      # WSJ0-2mix names its mixture folder 'mix'.
      write_wav(root / split_folder / 'mix' / name, s1 + s2, rate)


@pytest.fixture(scope='module')
def wham_root(tmp_path_factory) -> pathlib.Path:
  """A WSJ0-2mix / WHAM! tree (8k min) with 3/2/2 examples."""
  root = tmp_path_factory.mktemp('wham')
  make_corpus_tree(root / 'wav8k' / 'min', COUNTS)
  return root


@pytest.fixture(scope='module')
def whamr_root(tmp_path_factory) -> pathlib.Path:
  """A WHAMR! tree (8k min) with 3/2/2 examples."""
  root = tmp_path_factory.mktemp('whamr')
  make_corpus_tree(root / 'wav8k' / 'min', COUNTS, with_reverb=True)
  return root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  """Shared output directory of the builds."""
  return tmp_path_factory.mktemp('tfds')


def read_split(builder, split: str) -> list[dict]:
  """All examples of a split."""
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def assert_counts(builder, expected: dict[str, int]) -> None:
  """Number of examples per TFDS split."""
  counts = {name: info.num_examples
            for name, info in builder.info.splits.items()}
  assert counts == expected


def test_wsj0_2mix_sources_sum_to_mixture(wham_root, data_dir):
  builder = registry.build_dataset('wsj0_2mix', data_dir, wham_root, '8k_min')
  assert_counts(builder, {'train': 3, 'validation': 2, 'test': 2})
  examples = read_split(builder, 'train')
  ids = sorted(example['id'].decode() for example in examples)
  assert ids == ['tr_utt00', 'tr_utt01', 'tr_utt02']
  for example in examples:
    assert example['sources'].shape == (2, len(example['mixture']))
    assert example['sample_rate'] == RATE
    np.testing.assert_allclose(example['sources'].sum(0), example['mixture'],
                               atol=1e-6)
    assert 'noise' not in example


def test_wsj0_2mix_pairs_files_by_name(wham_root, data_dir):
  builder = registry.build_dataset('wsj0_2mix', data_dir, wham_root, '8k_min')
  for example in read_split(builder, 'validation'):
    folder = wham_root / 'wav8k' / 'min' / 'cv'
    name = example['id'].decode() + '.wav'
    expected, _ = soundfile.read(folder / 's2' / name, dtype='float32')
    np.testing.assert_array_equal(example['sources'][1], expected)


@pytest.mark.parametrize('mixture_type', ['clean', 'both', 'single'])
def test_wham_mixture_types(wham_root, data_dir, mixture_type):
  builder = registry.build_dataset('wham', data_dir, wham_root,
                                   f'8k_min_{mixture_type}')
  assert_counts(builder, {'train': 3, 'validation': 2, 'test': 2})
  assert builder.info.metadata['task'] == (
      'enhancement' if mixture_type == 'single' else 'separation')
  for example in read_split(builder, 'test'):
    total = example['sources'].sum(0)
    if mixture_type == 'both':
      total = total + example['noise']  # mix_both = s1 + s2 + noise
    else:
      assert 'noise' not in example
    np.testing.assert_allclose(total, example['mixture'], atol=1e-6)
  if mixture_type == 'single':  # Sources are (speech, noise).
    example = read_split(builder, 'train')[0]
    name = example['id'].decode() + '.wav'
    noise, _ = soundfile.read(wham_root / 'wav8k/min/tr/noise' / name,
                              dtype='float32')
    np.testing.assert_array_equal(example['sources'][1], noise)


@pytest.mark.parametrize('condition', ['anechoic', 'reverb_keep_reverb'])
def test_whamr_sum_holds_when_targets_match_the_room(whamr_root, data_dir,
                                                     condition):
  builder = registry.build_dataset('whamr', data_dir, whamr_root,
                                   f'8k_min_both_{condition}')
  assert_counts(builder, {'train': 3, 'validation': 2, 'test': 2})
  assert builder.info.metadata['mixture_is_sum']
  for example in read_split(builder, 'train'):
    np.testing.assert_allclose(
        example['sources'].sum(0) + example['noise'], example['mixture'],
        atol=1e-6)


def test_whamr_reverb_mixture_has_anechoic_targets(whamr_root, data_dir):
  builder = registry.build_dataset('whamr', data_dir, whamr_root,
                                   '8k_min_clean_reverb')
  assert not builder.info.metadata['mixture_is_sum']
  folder = whamr_root / 'wav8k' / 'min' / 'tt'
  for example in read_split(builder, 'test'):
    name = example['id'].decode() + '.wav'
    anechoic, _ = soundfile.read(folder / 's1_anechoic' / name, dtype='float32')
    reverb_mix, _ = soundfile.read(folder / 'mix_clean_reverb' / name,
                                   dtype='float32')
    np.testing.assert_array_equal(example['sources'][0], anechoic)
    np.testing.assert_array_equal(example['mixture'], reverb_mix)


@pytest.fixture(scope='module')
def libri2mix_root(tmp_path_factory) -> pathlib.Path:
  """Libri2Mix/wav8k/min with all four subsets and metadata for two."""
  root = tmp_path_factory.mktemp('librimix')
  corpus = root / 'Libri2Mix' / 'wav8k' / 'min'
  make_corpus_tree(corpus, {'train-100': 2, 'train-360': 3, 'dev': 2,
                            'test': 2})
  for subset in ('train-360', 'test'):
    mixtures = sorted((corpus / subset / 'mix_clean').glob('*.wav'))
    write_metadata(corpus / 'metadata' / f'mixture_{subset}_mix_clean.csv',
                   mixtures)
  return root


def write_metadata(path: pathlib.Path, mixtures: list[pathlib.Path]) -> None:
  """A LibriMix-style metadata csv for the given mixture files."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(['mixture_ID', 'mixture_path', 'source_1_path',
                     'source_2_path', 'length'])
    for mixture in mixtures:
      writer.writerow([mixture.stem, '/elsewhere/' + mixture.name, 'x', 'y',
                       soundfile.info(mixture).frames])


def test_libri2mix_splits_and_metadata(libri2mix_root, data_dir):
  builder = registry.build_dataset('libri2mix', data_dir, libri2mix_root,
                                   '8k_min_clean')
  assert_counts(builder, {'train_100': 2, 'train_360': 3, 'validation': 2,
                          'test': 2})
  for example in read_split(builder, 'train_360'):
    np.testing.assert_allclose(example['sources'].sum(0), example['mixture'],
                               atol=1e-6)


def test_libri2mix_both_without_metadata(libri2mix_root, data_dir):
  # Pointing at Libri2Mix/ itself works too.
  builder = registry.build_dataset('libri2mix', data_dir,
                                   libri2mix_root / 'Libri2Mix', '8k_min_both')
  for example in read_split(builder, 'validation'):
    np.testing.assert_allclose(
        example['sources'].sum(0) + example['noise'], example['mixture'],
        atol=1e-6)


def test_libri2mix_metadata_length_is_checked(tmp_path):
  corpus = tmp_path / 'Libri2Mix' / 'wav8k' / 'min'
  make_corpus_tree(corpus, {'dev': 2})
  csv_path = corpus / 'metadata' / 'mixture_dev_mix_clean.csv'
  write_metadata(csv_path, sorted((corpus / 'dev/mix_clean').glob('*.wav')))
  text = csv_path.read_text().splitlines()
  fields = text[1].split(',')
  fields[-1] = str(int(fields[-1]) + 5)
  csv_path.write_text('\n'.join([text[0], ','.join(fields)] + text[2:]) + '\n')
  with pytest.raises(ValueError, match='mixture_dev_mix_clean.csv'):
    registry.build_dataset('libri2mix', tmp_path / 'out', tmp_path,
                           '8k_min_clean')


@pytest.fixture(scope='module')
def dns_root(tmp_path_factory) -> pathlib.Path:
  """DNS-Challenge `datasets/`: clean + noise for training, a test set."""
  root = tmp_path_factory.mktemp('dns')
  rng = np.random.default_rng(3)
  for index in range(6):
    write_wav(root / 'clean' / f'book_{index:05d}_chp_0001_reader_{index}.wav',
              0.1 * rng.standard_normal(int(rng.integers(9000, 16000))),
              16000)
  for index in range(3):
    write_wav(root / 'noise' / f'noise_type{index}_{index}.wav',
              0.1 * rng.standard_normal(int(rng.integers(4000, 20000))), 16000)
  test_dir = root / 'test_set' / 'synthetic' / 'no_reverb'
  for fileid in (3, 12, 40):
    clean = (0.1 * rng.standard_normal(12000)).astype(np.float32)
    noise = (0.05 * rng.standard_normal(12000)).astype(np.float32)
    write_wav(test_dir / 'clean' / f'clean_fileid_{fileid}.wav', clean, 16000)
    write_wav(test_dir / 'noisy' /
              f'book_x_snr{fileid % 20}_fileid_{fileid}.wav', clean + noise,
              16000)
  return root


def test_dns_challenge_training_mixes_at_random_snr(dns_root, data_dir):
  builder = registry.build_dataset('dns_challenge', data_dir, dns_root, '16k')
  assert_counts(builder, {'train': 5, 'validation': 1, 'test': 3})
  assert builder.info.metadata['dynamic_mixing_default']
  low, high = builder.info.metadata['snr_range_db']
  for example in read_split(builder, 'train') + read_split(builder,
                                                           'validation'):
    speech, noise = example['sources'].astype(np.float64)
    np.testing.assert_allclose(speech + noise, example['mixture'], atol=1e-6)
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean(noise ** 2))
    assert low - 1e-3 <= snr <= high + 1e-3
    assert abs(snr - example['snr_db']) < 1e-3


def test_dns_challenge_test_set_pairs_by_fileid(dns_root, data_dir):
  builder = registry.build_dataset('dns_challenge', data_dir, dns_root, '16k')
  test_dir = dns_root / 'test_set' / 'synthetic' / 'no_reverb'
  examples = read_split(builder, 'test')
  assert sorted(e['id'].decode() for e in examples) == [
      'fileid_12', 'fileid_3', 'fileid_40']
  for example in examples:
    fileid = example['id'].decode().split('_')[1]
    clean, _ = soundfile.read(test_dir / 'clean' / f'clean_fileid_{fileid}.wav',
                              dtype='float32')
    np.testing.assert_array_equal(example['sources'][0], clean)
    np.testing.assert_allclose(example['sources'].sum(0), example['mixture'],
                               atol=1e-6)


def test_dns_challenge_8k_resamples(dns_root, data_dir):
  builder = registry.build_dataset('dns_challenge', data_dir, dns_root, '8k')
  example = read_split(builder, 'test')[0]
  assert example['sample_rate'] == 8000
  assert len(example['mixture']) == 6000


def test_dns_challenge_unpaired_noisy_file_is_named(tmp_path):
  test_dir = tmp_path / 'test_set' / 'synthetic' / 'no_reverb'
  write_wav(test_dir / 'clean' / 'clean_fileid_1.wav', np.zeros(100) + 0.1,
            16000)
  write_wav(test_dir / 'noisy' / 'noisy_fileid_1.wav', np.zeros(100) + 0.1,
            16000)
  write_wav(test_dir / 'noisy' / 'noisy_fileid_2.wav', np.zeros(100), 16000)
  with pytest.raises(FileNotFoundError, match='noisy_fileid_2.wav'):
    registry.build_dataset('dns_challenge', tmp_path / 'out', tmp_path, '16k')


def test_rebuild_is_skipped(wham_root, data_dir):
  builder = registry.build_dataset('wsj0_2mix', data_dir, wham_root, '8k_min')
  stamp = os.path.getmtime(builder.data_dir)
  registry.build_dataset('wsj0_2mix', data_dir, None, '8k_min')
  assert os.path.getmtime(builder.data_dir) == stamp


def test_reverb_targets_cannot_be_remixed(whamr_root, data_dir):
  from data_pipelines import loaders  # pylint: disable=g-import-not-at-top
  registry.build_dataset('whamr', data_dir, whamr_root, '8k_min_clean_reverb')
  with pytest.raises(ValueError, match='not the sum of the sources'):
    loaders.make_train_iterator(
        'whamr', data_dir, 'train', config='8k_min_clean_reverb',
        batch_size_per_device=1, num_devices=1, dynamic_mixing=True,
        process_index=0, process_count=1)


def test_libri2mix_train_alias_joins_subsets(libri2mix_root, data_dir):
  from data_pipelines import loaders  # pylint: disable=g-import-not-at-top
  registry.build_dataset('libri2mix', data_dir, libri2mix_root, '8k_min_clean')
  iterator = loaders.make_train_iterator(
      'libri2mix', data_dir, 'train', config='8k_min_clean',
      batch_size_per_device=1, num_devices=1, num_epochs=1,
      process_index=0, process_count=1)
  assert len(iterator) == 5  # train-100 (2) + train-360 (3)


def test_dns_trains_with_dynamic_mixing_by_default(dns_root, data_dir):
  from data_pipelines import loaders  # pylint: disable=g-import-not-at-top
  registry.build_dataset('dns_challenge', data_dir, dns_root, '16k')
  iterator = loaders.make_train_iterator(
      'dns_challenge', data_dir, 'train', config='16k', crop_seconds=0.5,
      batch_size_per_device=2, num_devices=1, process_index=0,
      process_count=1)
  batch = next(iterator)
  assert batch['mixture'].shape == (1, 2, 8000)
  np.testing.assert_allclose(batch['sources'].sum(2), batch['mixture'],
                             atol=1e-6)
