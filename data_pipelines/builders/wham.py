"""WHAM!: WSJ0-2mix with noise (clean, noisy and one-speaker mixtures)."""

import itertools

from data_pipelines.builders import base

_INSTRUCTIONS = """\
Point manual_dir at the output folder of the WHAM! scripts (usually
`.../wham_mix` or `.../wham`):

  <manual_dir>/{wav8k,wav16k}/{min,max}/{tr,cv,tt}/
      {mix_clean,mix_both,mix_single,s1,s2,noise}/*.wav

Files are paired by name, mono, at the folder's sample rate. Only the folders
of the configured mixture type are needed: mix_clean + s1 + s2 ('clean'),
mix_both + s1 + s2 + noise ('both'), mix_single + s1 + noise ('single').
"""


def _configs() -> list[base.CorpusConfig]:
  """Configs such as '8k_min_both': sample rate x mode x mixture type."""
  return [
      base.CorpusConfig(
          name=f'{base.rate_tag(rate)}_{mode}_{mixture_type}',
          description=(f'{base.rate_tag(rate)} Hz, {mode} mode, '
                       f'mix_{mixture_type}.'),
          sample_rate=rate, mode=mode, mixture_type=mixture_type)
      for rate, mode, mixture_type in itertools.product(
          base.SAMPLE_RATES, base.MODES, base.MIXTURE_TYPES)
  ]


class Wham(base.CorpusBuilder):
  """WHAM! from the user's directory.

  'clean': sources (s1, s2), mix_clean = s1 + s2.
  'both': sources (s1, s2) and feature noise, mix_both = s1 + s2 + noise.
  'single' (enhancement): sources (s1, noise), mix_single = s1 + noise.
  """

  name = 'wham'
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = '8k_min_both'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  DESCRIPTION = 'WHAM! noisy two-speaker separation (Wichern et al., 2019).'
  HOMEPAGE = 'https://wham.whisper.ai/'

  def mixture_folder(self) -> str:
    return f'mix_{self.builder_config.mixture_type}'

  def source_folders(self) -> tuple[str, str]:
    if self.builder_config.mixture_type == 'single':
      return ('s1', 'noise')
    return ('s1', 's2')

  def noise_folder(self) -> str | None:
    return 'noise' if self.builder_config.has_noise_feature else None
