"""Per-example and per-batch transforms of the loaders (grain transforms).

They live in an importable module so that grain worker processes can unpickle
them. Waveform shapes: mixture (samples,), sources (2, samples), mask
(samples,) with 1 on real samples and 0 on padding.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

Example = dict[str, np.ndarray]


def waveforms_of(record: Mapping[str, Any]) -> Example:
  """The float32 waveforms of a decoded TFDS record."""
  example = {'mixture': np.asarray(record['mixture'], np.float32),
             'sources': np.asarray(record['sources'], np.float32)}
  if 'noise' in record:
    example['noise'] = np.asarray(record['noise'], np.float32)
  return example


def crop_or_pad(waveform: np.ndarray, start: int, length: int) -> np.ndarray:
  """waveform[..., start:start + length], zero-padded at the end if short."""
  piece = waveform[..., start:start + length]
  missing = length - piece.shape[-1]
  if missing > 0:
    padding = [(0, 0)] * (piece.ndim - 1) + [(0, missing)]
    piece = np.pad(piece, padding)
  return piece


def valid_mask(num_valid: int, length: int) -> np.ndarray:
  """(length,) float32: 1 for the first num_valid samples, then 0."""
  mask = np.zeros(length, np.float32)
  mask[:min(num_valid, length)] = 1.0
  return mask


def random_start(num_samples: int, crop_samples: int,
                 rng: np.random.Generator) -> int:
  """A uniform crop start; 0 when the waveform is shorter than the crop."""
  return int(rng.integers(0, max(num_samples - crop_samples, 0) + 1))


def crop_example(example: Example, crop_samples: int,
                 rng: np.random.Generator) -> Example:
  """A random crop of all waveforms at one offset, with its sample mask."""
  num_samples = example['mixture'].shape[-1]
  start = random_start(num_samples, crop_samples, rng)
  return {
      'mixture': crop_or_pad(example['mixture'], start, crop_samples),
      'sources': crop_or_pad(example['sources'], start, crop_samples),
      'mask': valid_mask(num_samples - start, crop_samples),
  }


@dataclasses.dataclass(frozen=True)
class ToWaveforms(grain.transforms.Map):
  """Keeps the float waveforms of a record (drops ids and scalars)."""

  def map(self, element):
    return waveforms_of(element)


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """Random fixed-length crops; short examples are zero-padded (mask 0)."""

  crop_samples: int

  def random_map(self, element, rng: np.random.Generator):
    return crop_example(element, self.crop_samples, rng)


def _power(waveform: np.ndarray) -> float:
  """Mean power in float64."""
  return float(np.mean(np.square(waveform, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class DynamicMix(grain.transforms.RandomMap):
  """Remixes on the fly: re-pairs sources across examples, random levels.

  Separation: source 1 (and the noise, if any) of this example is mixed with a
  random source of a random other example, each cropped independently and
  scaled by a random gain in [-gain_db, gain_db] dB.
  Enhancement (sources = speech, noise): the speech is mixed with the noise of
  a random other example at an SNR drawn from snr_range_db.
  The mixture is always the sum of the returned sources (and noise).

  Attributes:
    source: random-access records (a TFDS data source) to draw partners from.
    crop_samples: crop length.
    enhancement: whether the sources are (speech, noise).
    gain_db: gain range of the separation sources.
    snr_range_db: (low, high) SNR range for enhancement.
  """

  source: Sequence[Mapping[str, Any]]
  crop_samples: int
  enhancement: bool = False
  gain_db: float = 2.5
  snr_range_db: tuple[float, float] = (0.0, 40.0)

  def random_map(self, element, rng: np.random.Generator):
    crop = self.crop_samples
    num_samples = element['mixture'].shape[-1]
    start = random_start(num_samples, crop, rng)
    first = crop_or_pad(element['sources'][0], start, crop)  # (crop,)
    mask = valid_mask(num_samples - start, crop)
    partner = self.source[int(rng.integers(len(self.source)))]
    partner_index = 1 if self.enhancement else int(rng.integers(2))
    partner_waveform = np.asarray(partner['sources'][partner_index], np.float32)
    partner_start = random_start(len(partner_waveform), crop, rng)
    second = crop_or_pad(partner_waveform, partner_start, crop)  # (crop,)
    mask = np.maximum(mask, valid_mask(len(partner_waveform) - partner_start,
                                       crop))
    if self.enhancement:
      sources = self._at_random_snr(first, second, rng)
      mixture = sources.sum(0)
    else:
      gains = 10.0 ** (rng.uniform(-self.gain_db, self.gain_db, size=2) / 20)
      sources = np.stack([first * gains[0], second * gains[1]])
      mixture = sources.sum(0)
      if 'noise' in element:
        mixture = mixture + crop_or_pad(element['noise'], start, crop)
    return {'mixture': mixture.astype(np.float32),
            'sources': sources.astype(np.float32),  # (2, crop)
            'mask': mask}

  def _at_random_snr(self, speech: np.ndarray, noise: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """(2, samples): speech and the noise scaled to a random SNR."""
    snr_db = rng.uniform(*self.snr_range_db)
    speech_power, noise_power = _power(speech), _power(noise)
    if speech_power > 0 and noise_power > 0:
      noise = noise * np.sqrt(speech_power / noise_power / 10 ** (snr_db / 10))
    return np.stack([speech, noise])


@dataclasses.dataclass(frozen=True)
class SplitDevices(grain.transforms.Map):
  """Reshapes every array's leading axis to (devices, per-device batch)."""

  num_devices: int

  def map(self, element):
    return {key: value.reshape(self.num_devices, -1, *value.shape[1:])
            for key, value in element.items()}
