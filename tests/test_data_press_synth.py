"""The embedded press_synth corpus: determinism, splits, levels, noise."""

import hashlib
import pathlib

import numpy as np
import pytest

from data_pipelines import registry
from data_pipelines.builders.press_synth import PressSynth
from data_pipelines.synth import espeak
from data_pipelines.synth import speakers as speakers_lib

TINY = 'clean_8k_tiny'  # 24 / 8 / 8 mixtures


def file_checksum(builder) -> str:
  """SHA-256 over the array_record files of a build."""
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(builder.data_dir).glob('*.array_record*')):
    digest.update(path.name.encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def example_checksum(builder) -> str:
  """SHA-256 over every example's arrays, in id order."""
  digest = hashlib.sha256()
  for split in sorted(builder.info.splits):
    source = builder.as_data_source(split)
    for example in sorted((source[i] for i in range(len(source))),
                          key=lambda example: example['id']):
      digest.update(example['id'])
      for key in ('mixture', 'sources'):
        digest.update(np.ascontiguousarray(example[key]).tobytes())
  return digest.hexdigest()


def all_examples(builder, split: str) -> list[dict]:
  """All examples of a split."""
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def tiny_builds(tmp_path_factory):
  """The tiny config built twice: in-process and with 2 worker processes."""
  first = registry.build_dataset('press_synth', tmp_path_factory.mktemp('a'),
                                 config=TINY, num_workers=0)
  second = registry.build_dataset('press_synth', tmp_path_factory.mktemp('b'),
                                  config=TINY, num_workers=2)
  return first, second


def test_same_seed_gives_identical_files(tiny_builds):
  first, second = tiny_builds
  assert file_checksum(first) == file_checksum(second)
  assert example_checksum(first) == example_checksum(second)


def test_another_seed_gives_other_data(tiny_builds, tmp_path):
  other = registry.build_dataset('press_synth', tmp_path,
                                 config='clean_8k_n4-2-2_seed1')
  assert other.info.splits['train'].num_examples == 4
  assert example_checksum(other) != example_checksum(tiny_builds[0])


def test_sizes_and_shapes(tiny_builds):
  builder = tiny_builds[0]
  counts = {name: split.num_examples
            for name, split in builder.info.splits.items()}
  assert counts == {'train': 24, 'validation': 8, 'test': 8}
  for example in all_examples(builder, 'validation'):
    num_samples = len(example['mixture'])
    assert 2.0 * 8000 - 1 <= num_samples <= 6.0 * 8000 + 1
    assert example['sources'].shape == (2, num_samples)
    assert example['mixture'].dtype == np.float32
    assert example['sample_rate'] == 8000
    np.testing.assert_array_equal(example['sources'].sum(0),
                                  example['mixture'])
    assert np.max(np.abs(example['mixture'])) <= 0.9 + 1e-6


def test_splits_are_speaker_disjoint(tiny_builds):
  builder = tiny_builds[0]
  used = {}
  for split in ('train', 'validation', 'test'):
    used[split] = {speaker.decode()
                   for example in all_examples(builder, split)
                   for speaker in example['speakers']}
  assert not used['train'] & used['validation']
  assert not used['train'] & used['test']
  assert not used['validation'] & used['test']
  table = {s['speaker_id']: s['split']
           for s in builder.info.metadata['speakers']}
  for split, speakers in used.items():
    assert {table[speaker] for speaker in speakers} == {split}


def test_relative_level_range(tiny_builds):
  levels = []
  for split in ('train', 'validation', 'test'):
    for example in all_examples(tiny_builds[0], split):
      power = np.mean(example['sources'].astype(np.float64) ** 2, axis=1)
      measured = 10 * np.log10(power[0] / power[1])
      assert abs(measured - example['relative_level_db']) < 1e-3
      levels.append(measured)
      first, second = example['speakers']
      assert first != second
  assert -5.0 - 1e-3 <= min(levels) and max(levels) <= 5.0 + 1e-3
  assert max(levels) - min(levels) > 4.0  # Levels actually vary.


def test_speakers_are_many_and_distinct():
  speakers = speakers_lib.make_speakers(0)
  assert len(speakers) == 80
  assert len({(s.voice, s.pitch, s.rate) for s in speakers}) == 80
  assert len({s.voice for s in speakers}) == 80
  counts = {split: len(speakers_lib.speakers_of_split(speakers, split))
            for split in speakers_lib.SPLITS}
  assert counts == {'train': 60, 'validation': 10, 'test': 10}


def test_synthesis_does_not_depend_on_history():
  synthesizer = espeak.Synthesizer()
  kwargs = dict(rate=170, pitch=40, pitch_range=60)
  first = synthesizer.synthesize('A quiet river.', 'en-us+m3', **kwargs)
  synthesizer.synthesize('Loud noises everywhere!', 'en+f4', rate=250,
                         pitch=90, pitch_range=99)
  again = synthesizer.synthesize('A quiet river.', 'en-us+m3', **kwargs)
  np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize('mixture_type', ['both', 'single'])
def test_noisy_configs(tmp_path, mixture_type):
  builder = registry.build_dataset('press_synth', tmp_path,
                                   config=f'{mixture_type}_8k_n3-2-2')
  low, high = builder.info.metadata['snr_range_db']
  for example in all_examples(builder, 'train'):
    sources = example['sources'].astype(np.float64)
    if mixture_type == 'both':
      noise = example['noise'].astype(np.float64)
      speech = sources.sum(0)
      np.testing.assert_allclose(sources.sum(0) + noise, example['mixture'],
                                 atol=1e-6)
    else:
      speech, noise = sources
      assert example['speakers'][1] == b'noise'
      np.testing.assert_allclose(speech + noise, example['mixture'], atol=1e-6)
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean(noise ** 2))
    assert abs(snr - example['snr_db']) < 1e-3
    assert low - 1e-3 <= snr <= high + 1e-3


def test_16k_config(tmp_path):
  builder = registry.build_dataset('press_synth', tmp_path,
                                   config='clean_16k_n2-2-2')
  example = all_examples(builder, 'test')[0]
  assert example['sample_rate'] == 16000
  assert 2 * 16000 - 1 <= len(example['mixture']) <= 6 * 16000 + 1


def test_config_names():
  assert PressSynth.config_from_name('clean_8k').num_train == 2000
  assert PressSynth.config_from_name('clean_8k_n24-8-8') is (
      PressSynth.config_from_name('clean_8k_tiny'))
  config = PressSynth.config_from_name('single_16k_n10-4-4_seed7')
  assert (config.mixture_type, config.sample_rate, config.num_train,
          config.seed) == ('single', 16000, 10, 7)
  with pytest.raises(ValueError, match='Unknown press_synth config'):
    PressSynth.config_from_name('clean_44k')


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(registry.DATA_DIR_ENV, raising=False)
  assert registry.resolve_data_dir() == str(tmp_path / 'data' / 'tfds')
  monkeypatch.setenv(registry.DATA_DIR_ENV, str(tmp_path / 'elsewhere'))
  assert registry.resolve_data_dir() == str(tmp_path / 'elsewhere')
  assert registry.resolve_data_dir(tmp_path / 'arg') == str(tmp_path / 'arg')
