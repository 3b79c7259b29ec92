"""Speed perturbation (transforms.change_speed and the crops built on it)."""

import numpy as np
import pytest
from scipy import signal

from data_pipelines import transforms

RATE = 8000


def tone(frequency, seconds=2.0):
  t = np.arange(int(seconds * RATE)) / RATE
  return np.sin(2 * np.pi * frequency * t).astype(np.float32)


def dominant_frequency(waveform):
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  return np.argmax(spectrum) * RATE / len(waveform)


@pytest.mark.parametrize('factor', [0.9, 1.1])
def test_change_speed_scales_pitch_and_length(factor):
  changed = transforms.change_speed(tone(200.0), factor)
  assert changed.shape == (round(2 * RATE / factor),)
  assert dominant_frequency(changed) == pytest.approx(200.0 * factor, abs=1.0)


def test_change_speed_matches_scipy_polyphase_resampling():
  # Speed 1.1 = resampling by 10/11; scipy's polyphase filter is an independent resampler.
  # Noise band-limited to 3 kHz, below both resamplers' transition bands (which differ).
  rng = np.random.default_rng(0)
  lowpass = signal.firwin(255, 3000, fs=RATE)
  noise = signal.lfilter(lowpass, [1.0], rng.standard_normal(16000)).astype(np.float32)
  ours = transforms.change_speed(noise, 1.1)
  reference = signal.resample_poly(noise, 10, 11)
  interior = slice(200, len(reference) - 200)
  error = ours[interior] - reference[interior]
  assert np.sqrt(np.mean(error ** 2)) < 0.01 * np.sqrt(np.mean(reference[interior] ** 2))


def test_change_speed_is_linear_over_channels():
  sources = np.stack([tone(200.0), tone(310.0)])
  changed = transforms.change_speed(sources, 1.07)
  np.testing.assert_allclose(changed.sum(0), transforms.change_speed(sources.sum(0), 1.07),
                             atol=1e-5)


def test_random_crop_with_speed_perturbation():
  sources = np.stack([tone(200.0, 5.0), tone(310.0, 5.0)])
  element = {'mixture': sources.sum(0), 'sources': sources}
  crop = transforms.RandomCrop(16000, speed_perturbation=0.15)
  rng = np.random.default_rng(1)
  frequencies = []
  for _ in range(20):
    example = crop.random_map(element, rng)
    assert example['sources'].shape == (2, 16000)
    assert example['mask'].sum() == 16000  # 5 s of signal fill every 2 s crop
    np.testing.assert_allclose(example['sources'].sum(0), example['mixture'], atol=1e-5)
    frequencies.append(dominant_frequency(example['sources'][0]))
  assert min(frequencies) >= 200 * 0.85 - 1 and max(frequencies) <= 200 * 1.15 + 1
  assert max(frequencies) - min(frequencies) > 20  # the factor is drawn per example


def test_short_input_is_padded_and_masked():
  sources = np.stack([tone(200.0, 1.0), tone(310.0, 1.0)])
  crop = transforms.RandomCrop(16000, speed_perturbation=0.1)
  example = crop.random_map({'mixture': sources.sum(0), 'sources': sources},
                            np.random.default_rng(2))
  valid = int(example['mask'].sum())
  assert 0.9 * 8000 / 1.1 <= valid <= 8000 / 0.9 + 1
  assert np.all(example['mask'][:valid] == 1) and np.all(example['sources'][:, valid:] == 0)
