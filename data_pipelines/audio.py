"""Reading and checking wav files, and resampling."""

import math
import os
from collections.abc import Mapping

import numpy as np
import scipy.signal
import soundfile

from data_pipelines import errors

PathLike = str | os.PathLike


def read_wav(path: PathLike, expected_sample_rate: int) -> np.ndarray:
  """Reads a mono wav file as float32 after checking its format.

  Args:
    path: the wav file.
    expected_sample_rate: the sample rate the corpus layout promises.

  Returns:
    The waveform, shape (samples,), float32 in [-1, 1] for PCM files.

  Raises:
    MissingDataError: the file does not exist.
    BadAudioError: the file is unreadable, empty, not mono or at another rate.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingDataError(f'Missing audio file {path!r}.')
  try:
    waveform, sample_rate = soundfile.read(path, dtype='float32',
                                           always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
    raise errors.BadAudioError(
        f'Unreadable audio file {path!r}: {error}. Expected a mono wav file '
        f'at {expected_sample_rate} Hz.') from error
  num_samples, num_channels = waveform.shape  # (samples, channels)
  if sample_rate != expected_sample_rate:
    raise errors.BadAudioError(
        f'Wrong sample rate in {path!r}: {sample_rate} Hz, expected '
        f'{expected_sample_rate} Hz.')
  if num_channels != 1:
    raise errors.BadAudioError(
        f'{path!r} has {num_channels} channels, expected a mono file.')
  if num_samples == 0:
    raise errors.BadAudioError(f'Empty audio file {path!r} (0 samples).')
  return waveform[:, 0]


def read_aligned(paths: Mapping[str, PathLike],
                 expected_sample_rate: int) -> dict[str, np.ndarray]:
  """Reads the files of one example and checks that their lengths agree.

  Args:
    paths: role (e.g. 'mixture', 's1') to wav path.
    expected_sample_rate: the sample rate every file must have.

  Returns:
    Role to waveform, each (samples,) float32.

  Raises:
    LengthMismatchError: the files have different numbers of samples.
  """
  waveforms = {role: read_wav(path, expected_sample_rate)
               for role, path in paths.items()}
  lengths = {role: len(waveform) for role, waveform in waveforms.items()}
  if len(set(lengths.values())) > 1:
    described = ', '.join(f'{os.fspath(paths[role])!r}: {length} samples'
                          for role, length in lengths.items())
    raise errors.LengthMismatchError(
        f'Files of one example differ in length ({described}); expected equal '
        'lengths.')
  return waveforms


def resample(waveform: np.ndarray, source_rate: int,
             target_rate: int) -> np.ndarray:
  """Resamples along the last axis with a polyphase filter (float32 out)."""
  if source_rate == target_rate:
    return waveform.astype(np.float32, copy=False)
  divisor = math.gcd(source_rate, target_rate)
  resampled = scipy.signal.resample_poly(
      waveform, target_rate // divisor, source_rate // divisor, axis=-1)
  return resampled.astype(np.float32)
