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
import soxr

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


def change_speed(waveform: np.ndarray, factor: float) -> np.ndarray:
  """`waveform` (..., samples) played `factor` times faster (pitch and tempo).

  Speed perturbation as Kaldi's and WHAM!'s recipes do it: the samples are
  read as if recorded at factor × the rate and resampled (soxr) back to the
  rate, so the length becomes round(samples / factor). Linear in the waveform:
  the sum of changed sources is the changed sum.
  """
  if factor == 1.0:
    return waveform
  flat = waveform.reshape(-1, waveform.shape[-1]).T  # (samples, channels)
  changed = soxr.resample(np.ascontiguousarray(flat, np.float32), factor, 1.0,
                          quality='HQ')
  return np.ascontiguousarray(changed.T).reshape(*waveform.shape[:-1], -1)


def random_speed(max_change: float, rng: np.random.Generator) -> float:
  """A speed factor uniform in [1 - max_change, 1 + max_change]."""
  if max_change == 0.0:
    return 1.0
  return float(rng.uniform(1.0 - max_change, 1.0 + max_change))


def _speed_changed_crop(waveform: np.ndarray, crop_samples: int,
                        factor: float, rng: np.random.Generator
                        ) -> tuple[np.ndarray, int]:
  """A random crop of `waveform` (..., samples) after changing its speed.

  Only the stretch the crop needs (plus a margin for the resampler's edges)
  is resampled. Returns the crop and its number of valid samples.
  """
  num_samples = waveform.shape[-1]
  if factor == 1.0:
    start = random_start(num_samples, crop_samples, rng)
    return (crop_or_pad(waveform, start, crop_samples),
            min(num_samples - start, crop_samples))
  margin = 64
  needed = int(np.ceil((crop_samples + 2 * margin) * factor)) + 1
  start = random_start(num_samples, needed, rng)
  piece = change_speed(waveform[..., start:start + needed], factor)
  lead = margin if start > 0 else 0  # Keep the true beginning of the signal.
  valid = max(min(piece.shape[-1] - lead, crop_samples), 0)
  if start + needed < num_samples:  # More signal follows: drop the tail edge.
    valid = min(valid, max(piece.shape[-1] - lead - margin, 0))
  crop = crop_or_pad(piece[..., lead:lead + valid], 0, crop_samples)
  return crop, valid


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """Random fixed-length crops; short examples are zero-padded (mask 0).

  With `speed_perturbation` s > 0 the whole example (mixture, sources, noise)
  is first sped up by one factor uniform in [1 - s, 1 + s] (change_speed), so
  the mixture stays the sum of the sources.
  """

  crop_samples: int
  speed_perturbation: float = 0.0

  def random_map(self, element, rng: np.random.Generator):
    factor = random_speed(self.speed_perturbation, rng)
    if factor == 1.0:
      return crop_example(element, self.crop_samples, rng)
    keys = [key for key in ('mixture', 'sources', 'noise') if key in element]
    stacked = np.concatenate([element[key].reshape(-1, element[key].shape[-1])
                              for key in keys])
    crop, valid = _speed_changed_crop(stacked, self.crop_samples, factor, rng)
    example, row = {}, 0
    for key in keys:
      rows = 1 if element[key].ndim == 1 else element[key].shape[0]
      example[key] = crop[row:row + rows].reshape(
          *element[key].shape[:-1], self.crop_samples)
      row += rows
    example.pop('noise', None)
    example['mask'] = valid_mask(valid, self.crop_samples)
    return example


def _power(waveform: np.ndarray) -> float:
  """Mean power in float64."""
  return float(np.mean(np.square(waveform, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class DynamicMix(grain.transforms.RandomMap):
  """Remixes on the fly: re-pairs sources across examples, random levels.

  Separation: source 1 (and the noise, if any) of this example is mixed with a
  random source of a random other example, each cropped independently and
  scaled by a random gain in [-gain_db, gain_db] dB and, with
  `speed_perturbation` s > 0, sped up by its own factor uniform in
  [1 - s, 1 + s] (change_speed: pitch and tempo, as in WHAM!'s recipes).
  Enhancement (sources = speech, noise): the speech is mixed with the noise of
  a random other example at an SNR drawn from snr_range_db.
  The mixture is always the sum of the returned sources (and noise).

  Attributes:
    source: random-access records (a TFDS data source) to draw partners from.
    crop_samples: crop length.
    enhancement: whether the sources are (speech, noise).
    gain_db: gain range of the separation sources.
    snr_range_db: (low, high) SNR range for enhancement.
    speed_perturbation: maximum relative speed change of each speech source.
  """

  source: Sequence[Mapping[str, Any]]
  crop_samples: int
  enhancement: bool = False
  gain_db: float = 2.5
  snr_range_db: tuple[float, float] = (0.0, 40.0)
  speed_perturbation: float = 0.0

  def random_map(self, element, rng: np.random.Generator):
    crop = self.crop_samples
    num_samples = element['mixture'].shape[-1]
    start = random_start(num_samples, crop, rng)
    if 'noise' in element or self.speed_perturbation == 0.0:
      # The noise stays aligned with source 1, so source 1 keeps its speed.
      first = crop_or_pad(element['sources'][0], start, crop)  # (crop,)
      first_valid = num_samples - start
    else:
      first, first_valid = _speed_changed_crop(
          element['sources'][0], crop, random_speed(self.speed_perturbation, rng),
          rng)
    mask = valid_mask(first_valid, crop)
    partner = self.source[int(rng.integers(len(self.source)))]
    partner_index = 1 if self.enhancement else int(rng.integers(2))
    partner_waveform = np.asarray(partner['sources'][partner_index], np.float32)
    partner_speed = (1.0 if self.enhancement
                     else random_speed(self.speed_perturbation, rng))
    second, second_valid = _speed_changed_crop(partner_waveform, crop,
                                               partner_speed, rng)  # (crop,)
    mask = np.maximum(mask, valid_mask(second_valid, crop))
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
