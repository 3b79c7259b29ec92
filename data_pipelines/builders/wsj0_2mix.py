"""WSJ0-2mix: two-speaker mixtures of Wall Street Journal utterances."""

import itertools

from data_pipelines.builders import base

_INSTRUCTIONS = """\
Point manual_dir at the folder holding the output of the WSJ0-2mix scripts
(usually `.../wsj0-mix/2speakers`):

  <manual_dir>/{wav8k,wav16k}/{min,max}/{tr,cv,tt}/{mix,s1,s2}/*.wav

Files are paired by name (mix/x.wav, s1/x.wav, s2/x.wav), mono, at the folder's
sample rate. Only the configured sample rate and mode need to be present.
"""


def _configs() -> list[base.CorpusConfig]:
  """One config per sample rate and mode, e.g. '8k_min' (the default)."""
  return [
      base.CorpusConfig(
          name=f'{base.rate_tag(rate)}_{mode}',
          description=f'{base.rate_tag(rate)} Hz, {mode} mode.',
          sample_rate=rate, mode=mode, mixture_type='clean')
      for rate, mode in itertools.product(base.SAMPLE_RATES, base.MODES)
  ]


class Wsj02mix(base.CorpusBuilder):
  """WSJ0-2mix from the user's directory (mix = s1 + s2)."""

  name = 'wsj0_2mix'
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = '8k_min'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  DESCRIPTION = 'WSJ0-2mix two-speaker separation (Hershey et al., 2016).'
  HOMEPAGE = 'https://www.merl.com/research/highlights/deep-clustering'

  def mixture_folder(self) -> str:
    return 'mix'

  def source_folders(self) -> tuple[str, str]:
    return ('s1', 's2')
