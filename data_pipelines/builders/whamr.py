"""WHAMR!: WHAM! with reverberation (anechoic or reverberant targets)."""

import dataclasses
import itertools

from data_pipelines.builders import base

_INSTRUCTIONS = """\
Point manual_dir at the output folder of the WHAMR! scripts (usually
`.../whamr`):

  <manual_dir>/{wav8k,wav16k}/{min,max}/{tr,cv,tt}/
      {mix_clean_anechoic,mix_clean_reverb,mix_both_anechoic,mix_both_reverb,
       mix_single_anechoic,mix_single_reverb,s1_anechoic,s2_anechoic,
       s1_reverb,s2_reverb,noise}/*.wav

Files are paired by name, mono, at the folder's sample rate. Only the folders
used by the configured mixture type and condition are needed.
"""

# Condition name -> (reverberant mixture, reverberant targets).
CONDITIONS = {
    'anechoic': (False, False),
    'reverb': (True, False),
    'reverb_keep_reverb': (True, True),
}


@dataclasses.dataclass(eq=False)
class WhamrConfig(base.CorpusConfig):
  """A WHAM! config plus the reverberation condition.

  Attributes:
    condition: 'anechoic' (anechoic mixture and targets), 'reverb'
      (reverberant mixture, anechoic targets: the usual WHAMR! task of joint
      separation, denoising and dereverberation) or 'reverb_keep_reverb'
      (reverberant mixture and reverberant targets).
  """

  condition: str = 'reverb'

  @property
  def reverb_mixture(self) -> bool:
    return CONDITIONS[self.condition][0]

  @property
  def reverb_targets(self) -> bool:
    return CONDITIONS[self.condition][1]


def _configs() -> list[WhamrConfig]:
  """Configs such as '8k_min_both_reverb'."""
  return [
      WhamrConfig(
          name=f'{base.rate_tag(rate)}_{mode}_{mixture_type}_{condition}',
          description=(f'{base.rate_tag(rate)} Hz, {mode} mode, '
                       f'mix_{mixture_type}, condition {condition}.'),
          sample_rate=rate, mode=mode, mixture_type=mixture_type,
          condition=condition)
      for rate, mode, mixture_type, condition in itertools.product(
          base.SAMPLE_RATES, base.MODES, base.MIXTURE_TYPES, CONDITIONS)
  ]


class Whamr(base.CorpusBuilder):
  """WHAMR! from the user's directory.

  Sources are (s1, s2) or, for 'single' (enhancement), (s1, noise), taken from
  the `_anechoic` or `_reverb` folders as the condition says; 'both' also
  stores the noise. The mixture equals the sum of sources (and noise) except in
  the 'reverb' condition, whose targets are anechoic.
  """

  name = 'whamr'
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = '8k_min_both_reverb'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  DESCRIPTION = ('WHAMR! noisy reverberant two-speaker separation '
                 '(Maciejewski et al., 2020).')
  HOMEPAGE = 'https://wham.whisper.ai/'

  def mixture_folder(self) -> str:
    config = self.builder_config
    room = 'reverb' if config.reverb_mixture else 'anechoic'
    return f'mix_{config.mixture_type}_{room}'

  def source_folders(self) -> tuple[str, str]:
    config = self.builder_config
    room = 'reverb' if config.reverb_targets else 'anechoic'
    if config.mixture_type == 'single':
      return (f's1_{room}', 'noise')
    return (f's1_{room}', f's2_{room}')

  def noise_folder(self) -> str | None:
    return 'noise' if self.builder_config.has_noise_feature else None

  def mixture_is_sum(self) -> bool:
    config = self.builder_config
    return config.reverb_mixture == config.reverb_targets
