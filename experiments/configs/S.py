r"""PRESS-4 (S) with the paper's recipe (SPEC §9), on the embedded corpus by default.

Command (a GPU/TPU host; WSJ0-2mix on disk):
  python -m experiments.main --config experiments/configs/S.py --workdir runs/S \
      --config.data.dataset=wsj0_2mix --config.data.builder_config=8k_min \
      --config.data.manual_dir=/corpora/wsj0-mix/2speakers
Expected (paper, WSJ0-2mix): SI-SNRi rising over the 4 exits; 3.45 M parameters,
11.0 GMAC/s at exit 4. Not reproducible on the CPU of this project (about 1 step/s at batch 1).
Matmuls in bfloat16 on a GPU/TPU, float32 on CPU (ACCELERATOR_DTYPE); force one with
--config.train.compute_dtype=float32.
Sweeps (the paper's exit ablation, three multi-host runs):
  python -m experiments.sweep --config S --sweep exits --root runs/exits --executor slurm ...
"""

from ml_collections import config_dict

from experiments import configs

STEPS = 200_000
# The S and M runs' compute dtype (TrainConfig.compute_dtype): 'auto' stays in the experiment
# and is resolved when the trainer builds the model (press_jax.train.train, in the training
# process, after jax.distributed.initialize; a sweep's launcher never queries the backend):
# bfloat16 matmuls on an accelerator, float32 on CPU (press_jax.config.resolve_dtype). The demo
# and tiny are CPU recipes and stay float32 everywhere.
ACCELERATOR_DTYPE = "auto"


def get_config(ablation: str | None = None, model: str = "S") -> config_dict.ConfigDict:
  config = configs.defaults(model=model)
  config.name = model
  config.train.compute_dtype = ACCELERATOR_DTYPE
  config.train.steps = STEPS
  config.train.batch_size_per_device = 1
  config.train.log_every = 100
  config.train.remat = True
  config.train.eval_every = 5000
  config.train.checkpoint_every = 2000
  # The paper's optimiser: peak 5e-4, warm-up over a tenth of the steps (at most 5000).
  config.train.optimizer.peak_learning_rate = 5e-4
  config.train.optimizer.warmup_steps = min(5000, STEPS // 10)
  config.train.optimizer.total_steps = STEPS
  config.finetune.min_steps = 1000
  config.finetune.peak_learning_rate = 1e-4
  config.finetune.warmup_steps = 100
  config.policy.target_dbs = (20.0, 22.5, 25.0, 27.5, 30.0, 32.5, 35.0)
  return configs.ablate(config, ablation)


def get_sweep(name: str) -> dict:
  """Sweeps of this config, as data: {'ablations': [...], 'grid': ['field=v1,v2', ...]}.

  exits: the paper's number-of-exits ablation (SPEC §6) at a fixed backbone.
  """
  sweeps = {"exits": {"ablations": ["exits_4", "exits_6", "exits_12"], "grid": []}}
  return sweeps[name]
