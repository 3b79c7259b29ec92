r"""A smoke run of the whole pipeline in a few minutes.

Command: python -m experiments.main --config tiny --workdir runs/tiny
Expected: finishes in ~3 minutes on 2 CPU cores; numbers are not meaningful.
Sweeps: python -m experiments.sweep --config tiny --sweep loss --root runs/sweep
"""

from ml_collections import config_dict

from experiments import configs

STEPS = 40


def get_config(ablation: str | None = None) -> config_dict.ConfigDict:
  config = configs.defaults(model="tiny")
  config.name = "tiny"
  config.train.steps = STEPS
  config.train.batch_size_per_device = 2
  config.train.log_every = 10
  config.train.eval_every = 20
  config.train.checkpoint_every = 20
  config.train.optimizer.peak_learning_rate = 2e-3
  config.train.optimizer.warmup_steps = 5
  config.train.optimizer.total_steps = STEPS
  config.data.crop_seconds = 1.0
  config.data.max_validation_batches = 2
  config.data.bucket_seconds = (6.0,)
  config.finetune.min_steps = 4
  config.with_sdr = False
  config.max_test_batches = 4
  config.policy.target_dbs = (0.0, 10.0)
  return configs.ablate(config, ablation)


def get_sweep(name: str) -> dict:
  """Sweeps of this config, as data: {'ablations': [...], 'grid': ['field=v1,v2', ...]}.

  loss: Student-t against Gaussian likelihood over two seeds (four runs, a few minutes each).
  """
  sweeps = {"loss": {"ablations": ["base", "loss_gaussian"], "grid": ["train.seed=0,1"]}}
  return sweeps[name]
