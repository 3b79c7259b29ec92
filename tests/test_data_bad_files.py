"""Bad data: every problem raises an error naming the file, or is skipped and
counted with skip_bad_files=True."""

import logging
import pathlib
import re

import numpy as np
import pytest
import soundfile

from data_pipelines import errors
from data_pipelines import registry

RATE = 8000


def write_wav(path: pathlib.Path, waveform: np.ndarray, rate: int = RATE,
              subtype: str = 'FLOAT') -> None:
  """Writes a wav, creating folders."""
  path.parent.mkdir(parents=True, exist_ok=True)
  soundfile.write(path, waveform, rate, subtype=subtype)


def make_wsj0_2mix(root: pathlib.Path, count: int = 3) -> pathlib.Path:
  """A valid WSJ0-2mix tree with only a test split; returns the tt folder."""
  split_dir = root / 'wav8k' / 'min' / 'tt'
  rng = np.random.default_rng(0)
  for index in range(count):
    s1, s2 = (0.1 * rng.standard_normal((2, 4000))).astype(np.float32)
    name = f'utt{index}.wav'
    write_wav(split_dir / 's1' / name, s1)
    write_wav(split_dir / 's2' / name, s2)
    write_wav(split_dir / 'mix' / name, s1 + s2)
  return split_dir


def build(root: pathlib.Path, **kwargs):
  """Builds WSJ0-2mix 8k min from root into root/out."""
  return registry.build_dataset('wsj0_2mix', root / 'out', root / 'corpus',
                                '8k_min', **kwargs)


@pytest.fixture
def corpus(tmp_path) -> pathlib.Path:
  """The tt folder of a fresh valid tree under tmp_path/corpus."""
  return make_wsj0_2mix(tmp_path / 'corpus')


def assert_names(error_info: pytest.ExceptionInfo, path: pathlib.Path,
                 expected: str) -> None:
  """The message names the file and says what was expected."""
  message = str(error_info.value)
  assert str(path) in message, message
  assert re.search(expected, message), message


def test_valid_tree_builds(tmp_path, corpus):
  builder = build(tmp_path)
  assert builder.info.splits['test'].num_examples == 3


def test_missing_manual_dir(tmp_path):
  with pytest.raises(errors.MissingDataError) as error_info:
    build(tmp_path)
  assert_names(error_info, tmp_path / 'corpus', 'manual_dir')


def test_no_manual_dir_given(tmp_path):
  with pytest.raises(FileNotFoundError, match='no manual_dir was given'):
    registry.build_dataset('wham', tmp_path / 'out', None, '8k_min_both')


def test_missing_rate_and_mode_directory(tmp_path):
  (tmp_path / 'corpus' / 'wav16k').mkdir(parents=True)
  with pytest.raises(errors.MissingDataError) as error_info:
    build(tmp_path)
  assert_names(error_info, tmp_path / 'corpus' / 'wav8k' / 'min', 'wav16k')


def test_missing_source_directory(tmp_path, corpus):
  for path in (corpus / 's2').iterdir():
    path.unlink()
  (corpus / 's2').rmdir()
  with pytest.raises(FileNotFoundError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 's2', 'Missing directory')


def test_source_file_missing_for_a_mixture(tmp_path, corpus):
  (corpus / 's1' / 'utt1.wav').unlink()
  with pytest.raises(errors.MissingDataError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 's1' / 'utt1.wav', 'Missing audio file')


def test_mismatched_lengths(tmp_path, corpus):
  write_wav(corpus / 's2' / 'utt2.wav', np.zeros(3999, np.float32))
  with pytest.raises(errors.LengthMismatchError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 's2' / 'utt2.wav', '3999 samples')
  assert 'expected equal lengths' in str(error_info.value)


def test_wrong_sample_rate(tmp_path, corpus):
  write_wav(corpus / 'mix' / 'utt0.wav', np.zeros(4000, np.float32), 16000)
  with pytest.raises(errors.BadAudioError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 'mix' / 'utt0.wav',
               '16000 Hz, expected 8000 Hz')


def test_stereo_file(tmp_path, corpus):
  write_wav(corpus / 's1' / 'utt0.wav', np.zeros((4000, 2), np.float32))
  with pytest.raises(errors.BadAudioError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 's1' / 'utt0.wav',
               '2 channels, expected a mono file')


def test_unreadable_file(tmp_path, corpus):
  (corpus / 'mix' / 'utt1.wav').write_bytes(b'this is not a wav file')
  with pytest.raises(errors.BadAudioError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 'mix' / 'utt1.wav', 'Unreadable')


def test_empty_file(tmp_path, corpus):
  write_wav(corpus / 's2' / 'utt0.wav', np.zeros(0, np.float32))
  with pytest.raises(errors.BadAudioError) as error_info:
    build(tmp_path)
  assert_names(error_info, corpus / 's2' / 'utt0.wav', '0 samples')


def test_empty_mixture_folder(tmp_path):
  (tmp_path / 'corpus' / 'wav8k' / 'min' / 'tt' / 'mix').mkdir(parents=True)
  for folder in ('s1', 's2'):
    (tmp_path / 'corpus' / 'wav8k' / 'min' / 'tt' / folder).mkdir()
  with pytest.raises(errors.MissingDataError, match='No .wav files'):
    build(tmp_path)


def test_errors_are_value_or_file_not_found_errors():
  assert issubclass(errors.BadAudioError, ValueError)
  assert issubclass(errors.LengthMismatchError, ValueError)
  assert issubclass(errors.MissingDataError, FileNotFoundError)


def test_skip_bad_files_counts_prints_and_logs(tmp_path, capsys, caplog):
  corpus = make_wsj0_2mix(tmp_path / 'corpus', count=5)
  write_wav(corpus / 's1' / 'utt0.wav', np.zeros((4000, 2), np.float32))
  (corpus / 's2' / 'utt3.wav').unlink()
  with caplog.at_level(logging.WARNING):
    builder = build(tmp_path, skip_bad_files=True)
  assert builder.info.splits['test'].num_examples == 3
  printed = capsys.readouterr().out
  assert 'wsj0_2mix/test: skipped 2 bad example(s)' in printed
  assert 'utt0' in printed and 'utt3' in printed
  assert 'skipped 2 bad example(s)' in caplog.text
  skipped = builder.info.metadata['skipped_examples']['test']
  assert sorted(example_id for example_id, _ in skipped) == ['utt0', 'utt3']
  ids = sorted(builder.as_data_source('test')[i]['id'].decode()
               for i in range(3))
  assert ids == ['utt1', 'utt2', 'utt4']


def test_skip_bad_files_still_fails_on_missing_directories(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'README').write_text('nothing here')
  with pytest.raises(errors.MissingDataError):
    build(tmp_path, skip_bad_files=True)
