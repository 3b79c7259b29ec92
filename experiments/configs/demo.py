r"""The README's main job: a small PRESS-Net on the embedded corpus, on a 2-core CPU.

Command:
  make demo   (= python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo;
               `--config demo` names the same file)
Expected on 2 cores: corpus build ~1 min (once, cached afterwards), training for its 540 s
limit (a budget of 10000 steps, more than a 2-core machine has fitted: ~8800 at ~17 steps/s
on 2026-12-06, ~5900 at 11 steps/s; the learning-rate schedule is re-planned to the steps that
fit, grown back (up to four times) if the machine speeds up, and still annealed to 0; the
report says so),
fine-tuning and test evaluation ~2.5-4 min; 12-14 min in all from a fresh clone (`.venv` from
scratch included). Spending the whole 540 s instead of stopping at 5400 steps: +0.30 dB
validation SI-SNRi at the last exit (README, probe rows 42-43).
Results (README, "Latest run", 2026-12-08, session 26, fresh clone: 8628 of the 10000 steps
fitted at 13-19 steps/s, 12 min 32 s in all): test SI-SNRi 5.73 / 6.16 / 6.45 dB at exits
1 / 2 / 3, 0.038 / 0.042 / 0.055 GMAC/s; PIT KS 0.109 / 0.069 / 0.074. With LayerScale at
1e-5 the same day: 5.50 / 5.93 / 6.23 dB in 7087 steps, PIT KS 0.086 / 0.054 / 0.039.
Session 23 (7864 steps at 14-19 steps/s): 5.57 / 6.02 / 6.31 dB. Session 20 (5204 steps at
~10 steps/s): 5.32 / 5.69 / 6.02 dB. On slower days (8-9 steps/s, 3900-4400 steps; sessions
15-17) the previous recipe reached 5.28-5.41 dB at the last exit; three seeds at 7500 steps:
5.65-6.22 dB.
The training loader keeps the decoded corpus in memory (data.train_cache_gib, ~0.9 GiB here):
without it the demo trains ~20 % fewer steps (README, "Speed").
Sweeps: python -m experiments.sweep --config demo --sweep seeds --root runs/demo_seeds
"""

from ml_collections import config_dict

from experiments import configs

# The demo's network: the tiny preset reshaped for a 2-core CPU by measurement (README, "How
# the demo recipe was chosen"; every probe's command and result is in its table).
DEMO_MODEL = {
    "encoder_stride": 40,  # 5 ms hop, 200 frames/s: a tenth of the paper's stride 4.
    "encoder_kernel": 160,  # 20 ms analysis frames (the paper: 2 ms); +2.5 dB at equal time.
    "encoder_channels": 256,  # The paper's encoder width.
    # One RNN block before exits 1 and 2, two before exit 3, then speaker attention: +0.27 dB
    # at the last exit at equal time over one block per exit, and exit 3 0.22 dB above exit 2
    # instead of 0.07-0.16 (README, probe rows 45-50).
    "decoder_blocks": 4, "exits": 3, "stage_blocks": (1, 1, 2), "attention_every": 4,
    "frame_norm": False,  # Keep each frame's level on the main path (docs/model.md).
    "waveform_head": "mask",  # Exits mask the encoder's frames (TasNet); +1.0 dB at equal time.
    "mixture_consistency": True,  # Estimates sum to the mixture (no silent streams).
    # Predicted error variance floored at -25 dB re the mixture (was -40): +0.2 dB at equal
    # steps (README, probe rows 33, 38 and 39); errors below the floor no longer steer the gradient.
    "variance_floor": 3e-3,
    # Residual branches start at 0.1 of their output (the paper: 1e-5). At equal steps +0.13 to
    # +1.19 dB at every exit over two seeds, and the seeds' spread at the last exit 0.68 dB
    # instead of 1.75 (README, probe rows 54-60; 0.01 alike, 1.0 worse).
    "layer_scale_init": 0.1,
}
DEMO_STEPS = 10000


def get_config(ablation: str | None = None) -> config_dict.ConfigDict:
  config = configs.defaults(model="tiny")
  config.name = "demo"
  config.train.model_overrides.update(DEMO_MODEL)
  config.train.steps = DEMO_STEPS
  # 8 crops of 1 s a step (the same audio per step as 4 x 2 s, from twice the utterances):
  # +0.5 dB on validation at equal time (README, probe row 27; 0.5, 1.5 and 4 s lost).
  config.train.batch_size_per_device = 8
  config.train.log_every = 100
  config.train.eval_every = 1800
  config.train.checkpoint_every = 900
  config.train.keep_checkpoints = 2
  # Training stops at 540 s; a machine too slow for DEMO_STEPS in that time (every 2-core one
  # measured) re-plans the schedule to the steps that fit, so its learning rate still decays
  # to 0 (docs/training.md).
  config.train.time_limit_s = 540.0
  config.train.anneal_to_time_limit = True
  config.train.optimizer.peak_learning_rate = 6e-3
  config.train.optimizer.warmup_steps = 50
  config.train.optimizer.total_steps = DEMO_STEPS
  config.data.crop_seconds = 1.0
  config.data.max_validation_batches = 8
  # One length bucket: on a CPU each new shape costs a ~20 s compile, more than the padding.
  config.data.bucket_seconds = (6.0,)
  config.finetune.steps_fraction = 0.02
  config.finetune.min_steps = 30
  config.finetune.peak_learning_rate = 2e-4
  config.policy.target_dbs = (0.0, 5.0, 10.0, 15.0, 20.0)
  return configs.ablate(config, ablation)


def get_sweep(name: str) -> dict:
  """Sweeps of this config, as data: {'ablations': [...], 'grid': ['field=v1,v2', ...]}.

  seeds: the demo's spread over three seeds (three runs, ~10 min each on 2 cores).
  """
  sweeps = {"seeds": {"ablations": ["base"], "grid": ["train.seed=0,1,2"]}}
  return sweeps[name]
