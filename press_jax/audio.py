"""Audio files in and out, in pieces: soundfile to read and write, soxr to resample.

Reading yields mono float32 pieces at the model's rate (multi-channel input downmixed by the
mean, or one channel picked); writing takes (speakers, samples) pieces at the model's rate,
resamples them back to the file's rate and writes one file per speaker under a temporary name,
renamed only when complete. Neither holds more than a piece of audio in memory.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import soundfile
import soxr

READ_SECONDS = 1.0  # Size of the pieces read from a file.


class AudioError(ValueError):
  """An input file that cannot be separated; the message names the file."""


def audio_extensions() -> set[str]:
  """Lower-case extensions (with the dot) of the formats this soundfile build reads."""
  extensions = {"." + name.lower() for name in soundfile.available_formats()}
  return extensions | {".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3", ".opus"}


def expand_inputs(paths: list[str]) -> list[str]:
  """Files to separate: files as given, directories expanded to their audio files (sorted,
  recursively). Missing paths are kept, so that they are reported as errors in order."""
  extensions = audio_extensions()
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, _, names in os.walk(path):
        found += [os.path.join(root, name) for name in names
                  if os.path.splitext(name)[1].lower() in extensions]
      # A directory without audio files stays in the list, to be reported as an error.
      files += sorted(found) or [path]
    else:
      files.append(path)
  return files


class AudioReader:
  """Opens `path` and checks it; `pieces()` yields mono float32 at `target_rate`."""

  def __init__(self, path: str, target_rate: int, channel: int | None = None,
               min_samples: int = 1):
    self.path = path
    if not os.path.exists(path):
      raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
      raise AudioError(f"{path}: is a directory with no audio files; expected an audio file "
                       "(wav, flac, ogg, ...) or a directory of them")
    _check_riff_length(path)
    try:
      self._file = soundfile.SoundFile(path)
    except Exception as error:  # soundfile.LibsndfileError, RuntimeError
      raise AudioError(f"{path}: not a readable audio file ({_one_line(error)})") from None
    self.sample_rate = int(self._file.samplerate)
    self.channels = int(self._file.channels)
    self.frames = int(self._file.frames)
    self.target_rate = int(target_rate)
    if channel is not None and not 0 <= channel < self.channels:
      self.close()
      raise AudioError(f"{path}: --channel {channel} asked for, the file has {self.channels} "
                       f"channel(s) (0..{self.channels - 1})")
    self.channel = channel
    if self.frames <= 0:
      self.close()
      raise AudioError(f"{path}: holds no samples")
    model_samples = round(self.frames * self.target_rate / self.sample_rate)
    if model_samples < min_samples:
      self.close()
      raise AudioError(
          f"{path}: {self.frames} samples at {self.sample_rate} Hz is shorter than one encoder "
          f"frame ({min_samples} samples at {self.target_rate} Hz)")
    self.model_samples = model_samples

  @property
  def downmixed(self) -> bool:
    return self.channels > 1 and self.channel is None

  def pieces(self) -> Iterator[np.ndarray]:
    resampler = (None if self.sample_rate == self.target_rate else
                 soxr.ResampleStream(self.sample_rate, self.target_rate, 1, dtype="float32"))
    size = max(1, int(READ_SECONDS * self.sample_rate))
    read = 0
    while True:
      try:
        block = self._file.read(size, dtype="float32", always_2d=True)
      except Exception as error:
        raise AudioError(f"{self.path}: reading failed after {read} samples "
                         f"({_one_line(error)}); the file may be truncated or corrupt") from None
      if block.shape[0] == 0:
        break
      finite = np.isfinite(block)
      if not finite.all():
        where = read + int(np.argwhere(~finite)[0][0])
        raise AudioError(f"{self.path}: expected finite samples, found NaN/inf (first at sample "
                         f"{where})")
      mono = block[:, self.channel] if self.channel is not None else block.mean(axis=1)
      read += block.shape[0]
      yield mono if resampler is None else resampler.resample_chunk(mono)
    if read < self.frames:
      raise AudioError(f"{self.path}: the header promises {self.frames} samples, only {read} "
                       "could be read; the file is truncated")
    if resampler is not None:
      yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)

  def close(self):
    self._file.close()


class SourceWriter:
  """One output file per speaker, written under `<final>.tmp` and renamed by `commit`."""

  def __init__(self, paths: list[str], model_rate: int, output_rate: int, output_samples: int):
    self.paths = paths
    self.output_samples = int(output_samples)
    self._temporary = [path + ".tmp" for path in paths]
    self._files = [soundfile.SoundFile(path, "w", samplerate=output_rate, channels=1,
                                       format="WAV", subtype="FLOAT")
                   for path in self._temporary]
    self._resampler = (None if model_rate == output_rate else
                       soxr.ResampleStream(model_rate, output_rate, len(paths), dtype="float32"))
    self._written = 0

  def _write(self, sources: np.ndarray) -> None:  # (samples, speakers) at the output rate
    sources = sources[:max(0, self.output_samples - self._written)]
    for index, handle in enumerate(self._files):
      handle.write(sources[:, index])
    self._written += sources.shape[0]

  def write(self, piece: np.ndarray) -> None:
    """A (speakers, samples) piece at the model's rate."""
    piece = np.ascontiguousarray(np.asarray(piece, np.float32).T)
    if self._resampler is not None:
      piece = self._resampler.resample_chunk(piece)
    self._write(piece)

  def commit(self) -> None:
    """Flushes the resampler, fixes the length to the input's and renames the files."""
    if self._resampler is not None:
      self._write(self._resampler.resample_chunk(
          np.zeros((0, len(self.paths)), np.float32), last=True))
    missing = self.output_samples - self._written
    if missing > 0:  # At most a few samples of resampler rounding.
      self._write(np.zeros((missing, len(self.paths)), np.float32))
    for handle in self._files:
      handle.close()
    for temporary, path in zip(self._temporary, self.paths):
      os.replace(temporary, path)

  def abort(self) -> None:
    """Closes and removes the temporary files (nothing half-written is left)."""
    for handle, temporary in zip(self._files, self._temporary):
      try:
        handle.close()
      except Exception:
        pass
      if os.path.exists(temporary):
        os.remove(temporary)


def _check_riff_length(path: str) -> None:
  """AudioError for a WAV (RIFF) file shorter than its header says.

  libsndfile reads such a file without complaint, shortening it to the bytes that are there;
  a file cut off in a copy would then be separated silently shorter than the recording.
  """
  try:
    with open(path, "rb") as handle:
      header = handle.read(12)
  except OSError as error:
    raise AudioError(f"{path}: cannot be read ({error.strerror or error})") from None
  if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
    return
  declared = int.from_bytes(header[4:8], "little") + 8
  actual = os.path.getsize(path)
  if declared not in (8, 0xFFFFFFFF + 8) and actual < declared:
    raise AudioError(f"{path}: the file is truncated (its header declares {declared} bytes, it "
                     f"holds {actual})")


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__
