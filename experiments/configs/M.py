r"""PRESS-12 (M) with the paper's recipe: the S recipe with the M preset.

Command: as S's (experiments/configs/S.py) with --config experiments/configs/M.py.
Expected (paper, WSJ0-2mix): SI-SNRi rising over the 12 exits. Not reproducible on this CPU.
"""

from ml_collections import config_dict

from experiments.configs import S


def get_config(ablation: str | None = None) -> config_dict.ConfigDict:
  return S.get_config(ablation, model="M")


get_sweep = S.get_sweep
