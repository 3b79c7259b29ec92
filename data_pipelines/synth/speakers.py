"""Synthetic speakers: an eSpeak NG accent and variant plus pitch and rate.

Speakers are drawn from a seed: 80 by default, half with male and half with
female variants, split speaker-disjointly into 60 train, 10 validation and 10
test speakers (balanced by variant gender in each split).
"""

import dataclasses

import numpy as np

# English accents of eSpeak NG (voice names, lower case).
ACCENTS = ('en', 'en-us', 'en-gb-scotland', 'en-gb-x-rp', 'en-gb-x-gbclan',
           'en-gb-x-gbcwmd', 'en-029', 'en-us-nyc')

# Human-sounding variants: no Klatt, robot, whisper or novelty variants, and
# none with breath noise (eSpeak's breath noise is not reproducible run to run).
MALE_VARIANTS = (
    'm1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8', 'Andy', 'Denis', 'Diogo',
    'Gene', 'Henrique', 'Hugo', 'Jacky', 'Lee', 'Mario', 'Michael', 'Mike',
    'antonio', 'ed', 'gustave', 'ian', 'iven', 'john', 'marcelo', 'michel',
    'miguel', 'norbert', 'pablo', 'paul', 'pedro', 'quincy', 'rob', 'robert',
    'travis', 'grandpa')
FEMALE_VARIANTS = (
    'f1', 'f4', 'Andrea', 'Annie', 'anika',
    'aunty', 'belinda', 'linda', 'steph', 'steph2', 'steph3', 'grandma',
    'shelby')

SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class Speaker:
  """One synthetic speaker.

  Attributes:
    speaker_id: e.g. 'spk07'.
    voice: eSpeak voice name with variant, e.g. 'en-us+m3'.
    pitch: eSpeak base pitch parameter, 0 to 99.
    pitch_range: eSpeak pitch range parameter, 0 to 99.
    rate: speaking rate in words per minute.
    gender: 'male' or 'female' (of the variant).
    split: 'train', 'validation' or 'test'.
  """

  speaker_id: str
  voice: str
  pitch: int
  pitch_range: int
  rate: int
  gender: str
  split: str


def _voices(variants: tuple[str, ...], count: int,
            rng: np.random.Generator) -> list[str]:
  """`count` distinct accent+variant voice names."""
  combos = [f'{accent}+{variant}' for accent in ACCENTS for variant in variants]
  order = rng.permutation(len(combos))[:count]
  return [combos[i] for i in order]


def make_speakers(seed: int, counts: tuple[int, int, int] = (60, 10, 10)
                  ) -> list[Speaker]:
  """Draws speakers for the train, validation and test splits.

  Args:
    seed: the corpus seed.
    counts: number of speakers per split (each count must be even: half
      male, half female variants).

  Returns:
    Speakers ordered by split, ids 'spk00', 'spk01', ...
  """
  if any(count % 2 or count < 2 for count in counts):
    raise ValueError(f'Speaker counts must be even and >= 2, got {counts}.')
  rng = np.random.default_rng([seed, 1])
  total = sum(counts) // 2
  by_gender = {'male': _voices(MALE_VARIANTS, total, rng),
               'female': _voices(FEMALE_VARIANTS, total, rng)}
  speakers, taken = [], {'male': 0, 'female': 0}
  for split, count in zip(SPLITS, counts):
    for gender in ('male', 'female') * (count // 2):
      voice = by_gender[gender][taken[gender]]
      taken[gender] += 1
      speakers.append(Speaker(
          speaker_id=f'spk{len(speakers):02d}', voice=voice,
          pitch=int(rng.integers(25, 76)),
          pitch_range=int(rng.integers(20, 81)),
          rate=int(rng.integers(140, 201)), gender=gender, split=split))
  return speakers


def speakers_of_split(speakers: list[Speaker], split: str) -> list[Speaker]:
  """The speakers assigned to `split`."""
  return [speaker for speaker in speakers if speaker.split == split]
