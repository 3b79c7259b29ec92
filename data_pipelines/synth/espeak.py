"""eSpeak NG through ctypes, from the library and voices of `espeakng-loader`.

eSpeak keeps synthesis state (pitch flutter phase, wave phase, ...) in static
variables, so the same text comes out slightly differently depending on what
was spoken before. To make every utterance a pure function of its inputs the
library is unloaded and loaded again (fresh static state) before each one and
libc's `rand` is reseeded.
"""

import ctypes
import threading

import _ctypes
import espeakng_loader
import numpy as np

NATIVE_SAMPLE_RATE = 22050

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POSITION_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETER_RATE = 1
_PARAMETER_PITCH = 3
_PARAMETER_RANGE = 4

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
    ctypes.c_void_p)


class EspeakError(RuntimeError):
  """eSpeak NG failed to load, to find a voice or to synthesise."""


def _close_library(library: ctypes.CDLL) -> None:
  """Unloads a shared library so that its static state is reset."""
  close = getattr(_ctypes, 'dlclose', None) or getattr(_ctypes, 'FreeLibrary')
  close(library._handle)  # pylint: disable=protected-access


class Synthesizer:
  """Deterministic text to speech at 22.05 kHz (one per process)."""

  _lock = threading.Lock()

  def __init__(self):
    self._chunks: list[np.ndarray] = []
    self._callback = _SynthCallback(self._collect)
    self._libc = ctypes.CDLL(None)

  def _collect(self, samples, num_samples, unused_events) -> int:
    """The synth callback: keeps each chunk of 16-bit samples."""
    if num_samples > 0 and samples:
      chunk = np.ctypeslib.as_array(samples, shape=(num_samples,))
      self._chunks.append(chunk.copy())
    return 0

  def _load(self) -> ctypes.CDLL:
    """Loads a fresh copy of the library and initialises it."""
    library = ctypes.CDLL(espeakng_loader.get_library_path())
    library.espeak_Initialize.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_SetParameter.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    data_path = espeakng_loader.get_data_path().encode()
    sample_rate = library.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
    if sample_rate != NATIVE_SAMPLE_RATE:
      raise EspeakError(f'espeak_Initialize returned {sample_rate}, expected '
                        f'{NATIVE_SAMPLE_RATE} (data path {data_path!r}).')
    library.espeak_SetSynthCallback(self._callback)
    return library

  def synthesize(self, text: str, voice: str, *, rate: int, pitch: int,
                 pitch_range: int) -> np.ndarray:
    """Speaks `text`; returns (samples,) float32 at 22.05 kHz.

    Args:
      text: the text (UTF-8).
      voice: an eSpeak voice name with optional variant, e.g. 'en-us+m3'.
      rate: speaking rate in words per minute (80 to 450).
      pitch: base pitch, 0 to 99 (50 is the voice's default).
      pitch_range: pitch range, 0 (monotone) to 99.
    """
    with self._lock:
      library = self._load()
      try:
        return self._speak(library, text, voice, rate, pitch, pitch_range)
      finally:
        library.espeak_Terminate()
        _close_library(library)

  def _speak(self, library: ctypes.CDLL, text: str, voice: str, rate: int,
             pitch: int, pitch_range: int) -> np.ndarray:
    """Runs one synthesis on a freshly loaded library."""
    if library.espeak_SetVoiceByName(voice.encode()) != 0:
      raise EspeakError(f'eSpeak NG has no voice {voice!r}.')
    for parameter, value in ((_PARAMETER_RATE, rate), (_PARAMETER_PITCH, pitch),
                             (_PARAMETER_RANGE, pitch_range)):
      library.espeak_SetParameter(parameter, int(value), 0)
    self._chunks = []
    self._libc.srand(0)
    encoded = text.encode()
    status = library.espeak_Synth(encoded, len(encoded) + 1, 0,
                                  _POSITION_CHARACTER, 0, _CHARS_UTF8, None,
                                  None)
    library.espeak_Synchronize()
    if status != 0 or not self._chunks:
      raise EspeakError(f'eSpeak NG failed on {text[:40]!r} (status {status}).')
    waveform = np.concatenate(self._chunks).astype(np.float32)
    return waveform / 32768.0
