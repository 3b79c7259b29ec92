"""Seeded synthetic noise for the noisy press_synth configs (numpy only).

Four kinds, drawn uniformly: coloured noise (1/f^alpha spectrum), babble-like
noise (several band-limited noise 'talkers' with syllable-rate envelopes),
hum (mains-like harmonics over a noise floor) and bursts (gated coloured
noise, as from clatter or traffic). Every noise is scaled to unit power.
"""

import numpy as np

KINDS = ('coloured', 'babble', 'hum', 'bursts')


def _shaped_noise(num_samples: int, sample_rate: int, exponent: float,
                  rng: np.random.Generator, low_hz: float = 0.0,
                  high_hz: float | None = None) -> np.ndarray:
  """Gaussian noise with a 1/f^exponent power spectrum in [low, high] Hz."""
  spectrum = np.fft.rfft(rng.standard_normal(num_samples))
  frequencies = np.fft.rfftfreq(num_samples, 1.0 / sample_rate)
  gain = np.maximum(frequencies, 20.0) ** (-exponent / 2.0)
  gain[frequencies < low_hz] = 0.0
  if high_hz is not None:
    gain[frequencies > high_hz] = 0.0
  return np.fft.irfft(spectrum * gain, n=num_samples)


def _envelope(num_samples: int, sample_rate: int, rate_hz: float,
              rng: np.random.Generator) -> np.ndarray:
  """A smooth positive envelope varying at about `rate_hz`."""
  num_points = max(int(num_samples / sample_rate * rate_hz) + 2, 2)
  points = rng.random(num_points) ** 2
  positions = np.linspace(0, num_samples - 1, num_points)
  return np.interp(np.arange(num_samples), positions, points)


def _coloured(num_samples, sample_rate, rng):
  """White to brown noise, sometimes band-limited."""
  high = rng.uniform(0.3, 0.5) * sample_rate if rng.random() < 0.5 else None
  return _shaped_noise(num_samples, sample_rate, rng.uniform(0.0, 2.0), rng,
                       high_hz=high)


def _babble(num_samples, sample_rate, rng):
  """A crowd of 4 to 10 speech-band noise sources with syllabic envelopes."""
  total = np.zeros(num_samples)
  for _ in range(rng.integers(4, 11)):
    talker = _shaped_noise(num_samples, sample_rate, rng.uniform(0.8, 1.5),
                           rng, low_hz=100.0,
                           high_hz=min(3800.0, 0.45 * sample_rate))
    total += talker * _envelope(num_samples, sample_rate, rng.uniform(3, 6),
                                rng)
  return total


def _hum(num_samples, sample_rate, rng):
  """Harmonics of a mains-like fundamental over a pink noise floor."""
  time = np.arange(num_samples) / sample_rate
  fundamental = rng.choice([50.0, 60.0, 100.0, 120.0]) * rng.uniform(0.98, 1.02)
  total = np.zeros(num_samples)
  for harmonic in range(1, 12):
    if harmonic * fundamental < 0.45 * sample_rate:
      total += (rng.random() / harmonic) * np.sin(
          2 * np.pi * harmonic * fundamental * time + rng.uniform(0, 2 * np.pi))
  floor = _shaped_noise(num_samples, sample_rate, 1.0, rng)
  floor *= rng.uniform(0.1, 0.5) * np.std(total) / (np.std(floor) + 1e-12)
  drift = 0.8 + 0.2 * _envelope(num_samples, sample_rate, 0.5, rng)
  return total * drift + floor


def _bursts(num_samples, sample_rate, rng):
  """Coloured noise switched on and off in random bursts."""
  noise = _shaped_noise(num_samples, sample_rate, rng.uniform(0.0, 1.5), rng)
  gate = (_envelope(num_samples, sample_rate, rng.uniform(1, 4), rng) >
          rng.uniform(0.2, 0.5)).astype(np.float64)
  smoothing = np.hanning(max(int(0.02 * sample_rate), 3))
  gate = np.convolve(gate, smoothing / smoothing.sum(), mode='same')
  return noise * (0.05 + gate)


_GENERATORS = {'coloured': _coloured, 'babble': _babble, 'hum': _hum,
               'bursts': _bursts}


def make_noise(num_samples: int, sample_rate: int,
               rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """Returns unit-power noise (samples,) float64 and its kind."""
  kind = KINDS[rng.integers(len(KINDS))]
  noise = _GENERATORS[kind](num_samples, sample_rate, rng)
  power = np.mean(noise ** 2)
  if power <= 0:
    raise ValueError(f'Generated {kind} noise is silent.')
  return noise / np.sqrt(power), kind
