"""The press_synth mixing recipe: speech, levels, noise, one example at a time.

Every example is a pure function of (seed, split, index): its random generator
is seeded with exactly these, and eSpeak NG starts from a fresh state for each
utterance, so a build is byte-identical however many worker processes make it.
"""

import concurrent.futures
import dataclasses
import functools
import multiprocessing
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data_pipelines import audio
from data_pipelines.synth import espeak
from data_pipelines.synth import noise as noise_lib
from data_pipelines.synth import speakers as speakers_lib
from data_pipelines.synth import words

SPLIT_CODES = {'train': 0, 'validation': 1, 'test': 2}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How press_synth mixtures are made.

  Attributes:
    sample_rate: output sample rate.
    mixture_type: 'clean' (two speakers), 'both' (two speakers + noise) or
      'single' (one speaker + noise, sources = speech and noise).
    min_seconds: shortest mixture.
    max_seconds: longest mixture.
    max_relative_level_db: speaker 1 over speaker 2 is drawn uniformly from
      [-max_relative_level_db, max_relative_level_db].
    snr_low_db: lowest SNR (all speech over noise) of the noisy types.
    snr_high_db: highest SNR.
    max_delay_seconds: the second speaker starts after up to this delay.
    speech_rms: RMS of the summed speech before peak limiting.
    peak_limit: largest absolute mixture sample.
  """

  sample_rate: int = 8000
  mixture_type: str = 'clean'
  min_seconds: float = 2.0
  max_seconds: float = 6.0
  max_relative_level_db: float = 5.0
  snr_low_db: float = -5.0
  snr_high_db: float = 10.0
  max_delay_seconds: float = 0.5
  speech_rms: float = 0.05
  peak_limit: float = 0.9

  @property
  def num_speakers(self) -> int:
    """Speakers per mixture."""
    return 1 if self.mixture_type == 'single' else 2

  @property
  def has_noise(self) -> bool:
    """Whether noise is added."""
    return self.mixture_type in ('both', 'single')


def _power(waveform: np.ndarray) -> float:
  """Mean power (float64)."""
  return float(np.mean(np.square(waveform, dtype=np.float64)))


def trim_silence(waveform: np.ndarray, sample_rate: int,
                 threshold: float = 0.02, margin_seconds: float = 0.02
                 ) -> np.ndarray:
  """Cuts leading and trailing near-silence, keeping a short margin."""
  loud = np.flatnonzero(np.abs(waveform) > threshold * np.max(np.abs(waveform)))
  if loud.size == 0:
    return waveform
  margin = int(margin_seconds * sample_rate)
  return waveform[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def utterance(synthesizer: espeak.Synthesizer, speaker: speakers_lib.Speaker,
              num_samples: int, sample_rate: int,
              rng: np.random.Generator) -> np.ndarray:
  """Speech of `speaker`, exactly `num_samples` long (float64).

  Sentences are synthesised until the speech is long enough, joined by short
  pauses, cut to length and faded out over 10 ms.
  """
  pieces, total = [], 0
  while total < num_samples:
    seconds_needed = (num_samples - total) / sample_rate
    num_words = int(np.ceil(seconds_needed * speaker.rate / 60 * 1.2)) + 2
    speech = synthesizer.synthesize(
        words.text_with_words(num_words, rng), speaker.voice,
        rate=speaker.rate, pitch=speaker.pitch, pitch_range=speaker.pitch_range)
    speech = trim_silence(speech, espeak.NATIVE_SAMPLE_RATE)
    speech = audio.resample(speech, espeak.NATIVE_SAMPLE_RATE, sample_rate)
    if pieces:
      pause = np.zeros(int(rng.uniform(0.1, 0.3) * sample_rate))
      pieces.append(pause)
      total += len(pause)
    pieces.append(speech.astype(np.float64))
    total += len(speech)
  speech = np.concatenate(pieces)[:num_samples]
  fade = min(int(0.01 * sample_rate), num_samples)
  speech[num_samples - fade:] *= np.linspace(1.0, 0.0, fade)
  return speech


def make_example(index: int, split: str,
                 split_speakers: Sequence[speakers_lib.Speaker],
                 recipe: Recipe, seed: int,
                 synthesizer: espeak.Synthesizer) -> tuple[str, dict[str, Any]]:
  """Makes example `index` of `split`; returns (id, feature dict)."""
  rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
  rate = recipe.sample_rate
  num_samples = int(round(rng.uniform(recipe.min_seconds, recipe.max_seconds)
                          * rate))
  chosen = rng.choice(len(split_speakers), recipe.num_speakers, replace=False)
  speakers = [split_speakers[i] for i in chosen]
  speech = [utterance(synthesizer, speaker, num_samples, rate, rng)
            for speaker in speakers]
  speech = [s / np.sqrt(_power(s)) for s in speech]  # unit power each
  example = {'sample_rate': rate}
  if recipe.num_speakers == 2:
    delay = int(rng.integers(0, int(recipe.max_delay_seconds * rate) + 1))
    speech[1] = np.concatenate([np.zeros(delay), speech[1]])[:num_samples]
    speech[1] /= np.sqrt(_power(speech[1]))
    level_db = rng.uniform(-recipe.max_relative_level_db,
                           recipe.max_relative_level_db)
    speech = [speech[0] * 10 ** (level_db / 40),
              speech[1] * 10 ** (-level_db / 40)]
    example['relative_level_db'] = np.float32(level_db)
  speech_sum = np.sum(speech, axis=0)
  noise = None
  if recipe.has_noise:
    noise, _ = noise_lib.make_noise(num_samples, rate, rng)
    snr_db = rng.uniform(recipe.snr_low_db, recipe.snr_high_db)
    noise *= np.sqrt(_power(speech_sum) / 10 ** (snr_db / 10))
    example['snr_db'] = np.float32(snr_db)
  scale = recipe.speech_rms / np.sqrt(_power(speech_sum))
  total = speech_sum + (noise if noise is not None else 0.0)
  scale = min(scale, recipe.peak_limit / (np.max(np.abs(total)) + 1e-12))
  speech = [(s * scale).astype(np.float32) for s in speech]
  if recipe.mixture_type == 'single':
    sources = np.stack([speech[0], (noise * scale).astype(np.float32)])
    speaker_ids = [speakers[0].speaker_id, 'noise']
    mixture = sources[0] + sources[1]
  else:
    sources = np.stack(speech)  # (2, samples)
    speaker_ids = [s.speaker_id for s in speakers]
    mixture = sources[0] + sources[1]
    if noise is not None:
      example['noise'] = (noise * scale).astype(np.float32)
      mixture = mixture + example['noise']
  example_id = f'{split}_{index:05d}_{"_".join(speaker_ids)}'
  example.update(mixture=mixture, sources=sources, id=example_id,
                 speakers=np.array(speaker_ids, dtype=object))
  return example_id, example


_WORKER_SYNTHESIZER: espeak.Synthesizer | None = None


def _worker_example(index: int, **kwargs) -> tuple[str, dict[str, Any]]:
  """make_example with this process's synthesizer."""
  global _WORKER_SYNTHESIZER
  if _WORKER_SYNTHESIZER is None:
    _WORKER_SYNTHESIZER = espeak.Synthesizer()
  return make_example(index, synthesizer=_WORKER_SYNTHESIZER, **kwargs)


def make_pool(num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """Worker processes for `generate` (spawned: no state shared with us)."""
  return concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context('spawn'))


def generate(split: str, count: int,
             split_speakers: Sequence[speakers_lib.Speaker], recipe: Recipe,
             seed: int,
             pool: concurrent.futures.Executor | None = None
             ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields the examples 0..count-1 of a split in order.

  Args:
    split: 'train', 'validation' or 'test'.
    count: number of examples.
    split_speakers: the speakers of this split.
    recipe: how to mix.
    seed: the corpus seed.
    pool: worker processes (see make_pool); None synthesises here. The output
      does not depend on it.
  """
  make = functools.partial(_worker_example, split=split,
                           split_speakers=tuple(split_speakers), recipe=recipe,
                           seed=seed)
  if pool is None:
    yield from map(make, range(count))
  else:
    yield from pool.map(make, range(count), chunksize=8)
