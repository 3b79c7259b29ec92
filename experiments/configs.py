"""Experiment configurations: presets, the main demo job, ablations.

Each named config is a plain dataclass built by a function below; `get(name)` returns it and
`python -m experiments.main --config NAME --workdir DIR` runs it (`--set a.b=value` overrides a
field, values parsed as JSON). Ablations are named `<base>/<ablation>`, e.g. `S/exits_12`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from press_jax import optim
from press_jax.evaluation import PolicySettings
from press_jax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data comes from and how it is batched (read by data_pipelines)."""

  dataset: str = "press_synth"  # press_synth, wsj0_2mix, wham, whamr, libri2mix, dns_challenge
  builder_config: str | None = "clean_8k"  # e.g. '8k_min' for wsj0_2mix
  data_dir: str | None = None  # Default: $PRESS_DATA_DIR or ./data/tfds
  manual_dir: str | None = None  # The user's corpus directory (not for press_synth)
  crop_seconds: float = 4.0
  dynamic_mixing: bool | None = None  # None: the dataset's default
  speed_perturbation: float = 0.0  # Max relative speed change of training sources (0: off)
  validation_split: str = "validation"
  test_split: str = "test"
  bucket_seconds: tuple[float, ...] = (3.0, 4.5, 6.0, 8.0)
  eval_batch_size_per_device: int = 4
  max_validation_batches: int | None = 8  # Validation during training uses at most this many.


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Full-length fine-tuning after the crop training (SPEC §5: ~3% more steps)."""

  steps_fraction: float = 0.03
  min_steps: int = 20
  peak_learning_rate: float = 1e-4
  warmup_steps: int = 5
  batch_size_per_device: int = 1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole run: train on crops, fine-tune on full-length utterances, evaluate on test."""

  name: str
  train: TrainConfig
  data: DataConfig = DataConfig()
  finetune: FinetuneConfig | None = FinetuneConfig()
  policy: PolicySettings = PolicySettings()
  with_sdr: bool = True
  max_test_batches: int | None = None  # None: the whole test split.

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _paper_optimizer(steps: int) -> optim.OptimizerConfig:
  return optim.OptimizerConfig(peak_learning_rate=5e-4, warmup_steps=min(5000, steps // 10),
                               total_steps=steps)


# The demo's network: the tiny preset reshaped for a 2-core CPU by measurement (README, "How
# the demo recipe was chosen"; every probe's command and result is in its table).
DEMO_MODEL = {
    "encoder_stride": 40,  # 5 ms hop, 200 frames/s: a tenth of the paper's stride 4.
    "encoder_kernel": 160,  # 20 ms analysis frames (the paper: 2 ms); +2.5 dB at equal time.
    "encoder_channels": 256,  # The paper's encoder width.
    "decoder_blocks": 3, "exits": 3, "attention_every": 3,  # One RNN block per exit.
    "frame_norm": False,  # Keep each frame's level on the main path (docs/model.md).
    "waveform_head": "mask",  # Exits mask the encoder's frames (TasNet); +1.0 dB at equal time.
    "mixture_consistency": True,  # Estimates sum to the mixture (no silent streams).
    "variance_floor": 1e-4,  # Predicted error variance floored at -40 dB re the mixture.
}
DEMO_STEPS = 2700

# The S and M runs' compute dtype (TrainConfig.compute_dtype): 'auto' stays in the experiment
# and is resolved when the trainer builds the model (press_jax.train.train, in the training
# process, after jax.distributed.initialize; a sweep's launcher never queries the backend):
# bfloat16 matmuls on an accelerator, float32 on CPU (press_jax.config.resolve_dtype). The demo
# and tiny are CPU recipes and stay float32 everywhere.
ACCELERATOR_DTYPE = "auto"


def demo() -> ExperimentConfig:
  """The README's main job: a small PRESS-Net on the embedded corpus, on a 2-core CPU.

  Command: make demo   (= python -m experiments.main --config demo --workdir runs/demo)
  Expected on 2 cores: corpus build ~1.5 min (once, cached afterwards), training 2700 steps in
  ~6.5 min (~7 steps/s; sized so that a machine half as fast still finishes them inside the
  15-minute time limit, with ~10 % to spare), fine-tuning and test evaluation ~2 min; ~12 min in
  all from a fresh clone. Results: README, "What it gives today" (test SI-SNRi per exit with this config).
  """
  steps = DEMO_STEPS
  return ExperimentConfig(
      name="demo",
      train=TrainConfig(
          model="tiny", model_overrides=dict(DEMO_MODEL),
          steps=steps, batch_size_per_device=4, log_every=100, eval_every=900,
          checkpoint_every=450, keep_checkpoints=2, time_limit_s=15 * 60,
          optimizer=optim.OptimizerConfig(peak_learning_rate=6e-3, warmup_steps=50,
                                          total_steps=steps)),
      # One length bucket: on a CPU each new shape costs a ~20 s compile, more than the padding.
      data=DataConfig(crop_seconds=2.0, max_validation_batches=8, bucket_seconds=(6.0,)),
      finetune=FinetuneConfig(steps_fraction=0.03, min_steps=30, peak_learning_rate=2e-4),
      policy=PolicySettings(target_dbs=(0.0, 5.0, 10.0, 15.0, 20.0)))


def demo_long() -> ExperimentConfig:
  """The demo recipe for about 40 minutes of this 2-core CPU: what a larger budget does.

  Command: python -m experiments.main --config demo_long --workdir runs/demo_long
  Expected: ~50 min of training (20000 steps at ~7 steps/s), then fine-tuning and test
  evaluation. Not yet measured with the current demo recipe (the README's learning curve is
  an older recipe's: 5.3 dB validation SI-SNRi at step 6000).
  """
  base = demo()
  steps = 20000
  return dataclasses.replace(
      base, name="demo_long",
      train=dataclasses.replace(
          base.train, steps=steps, eval_every=4000, checkpoint_every=2000,
          time_limit_s=62 * 60,
          optimizer=dataclasses.replace(base.train.optimizer, total_steps=steps)))


def tiny() -> ExperimentConfig:
  """A smoke run of the whole pipeline in a few minutes.

  Command: python -m experiments.main --config tiny --workdir runs/tiny
  Expected: finishes in ~3 minutes on 2 CPU cores; numbers are not meaningful.
  """
  steps = 40
  return ExperimentConfig(
      name="tiny",
      train=TrainConfig(model="tiny", steps=steps, batch_size_per_device=2, log_every=10,
                        eval_every=20, checkpoint_every=20,
                        optimizer=optim.OptimizerConfig(peak_learning_rate=2e-3,
                                                        warmup_steps=5, total_steps=steps)),
      data=DataConfig(crop_seconds=1.0, max_validation_batches=2, bucket_seconds=(6.0,)),
      finetune=FinetuneConfig(min_steps=4),
      with_sdr=False, max_test_batches=4,
      policy=PolicySettings(target_dbs=(0.0, 10.0)))


def small() -> ExperimentConfig:
  """PRESS-4 (S) with the paper's recipe (SPEC §9), on the embedded corpus by default.

  Command (a GPU/TPU host; WSJ0-2mix on disk):
    python -m experiments.main --config S --workdir runs/S \\
        --set data.dataset='"wsj0_2mix"' --set data.builder_config='"8k_min"' \\
        --set data.manual_dir='"/corpora/wsj0-mix/2speakers"'
  Expected (paper, WSJ0-2mix): SI-SNRi rising over the 4 exits; 3.45 M parameters,
  11.0 GMAC/s at exit 4. Not reproducible on the CPU of this project (about 1 step/s at batch 1).
  Matmuls in bfloat16 on a GPU/TPU, float32 on CPU (ACCELERATOR_DTYPE); force one with
  --set train.compute_dtype=float32.
  """
  steps = 200_000
  return ExperimentConfig(
      name="S",
      train=TrainConfig(model="S", compute_dtype=ACCELERATOR_DTYPE,
                        steps=steps, batch_size_per_device=1, log_every=100, remat=True,
                        eval_every=5000, checkpoint_every=2000,
                        optimizer=_paper_optimizer(steps)),
      finetune=FinetuneConfig(min_steps=1000, peak_learning_rate=1e-4, warmup_steps=100),
      policy=PolicySettings(target_dbs=(20.0, 22.5, 25.0, 27.5, 30.0, 32.5, 35.0)))


def medium() -> ExperimentConfig:
  """PRESS-12 (M) with the paper's recipe. Same command as S with --config M."""
  base = small()
  return dataclasses.replace(base, name="M", train=dataclasses.replace(base.train, model="M"))


BASES: dict[str, Callable[[], ExperimentConfig]] = {
    "demo": demo, "demo_long": demo_long, "tiny": tiny, "S": small, "M": medium}


def _with_model(base: ExperimentConfig, suffix: str, **model_overrides) -> ExperimentConfig:
  overrides = dict(base.train.model_overrides, **model_overrides)
  return dataclasses.replace(base, name=f"{base.name}/{suffix}",
                             train=dataclasses.replace(base.train, model_overrides=overrides))


def _with_train(base: ExperimentConfig, suffix: str, **train_fields) -> ExperimentConfig:
  return dataclasses.replace(base, name=f"{base.name}/{suffix}",
                             train=dataclasses.replace(base.train, **train_fields))


ABLATIONS: dict[str, Callable[[ExperimentConfig], ExperimentConfig]] = {
    # Number of exits at a fixed backbone (SPEC §6: 4 -> 6 -> 12 exits).
    "exits_4": lambda base: _with_model(base, "exits_4", exits=4),
    "exits_6": lambda base: _with_model(base, "exits_6", exits=6),
    "exits_12": lambda base: _with_model(base, "exits_12", exits=12),
    # Likelihood (SPEC §3: Gaussian -0.5 dB, SI-SNR on par).
    "loss_student_t": lambda base: _with_train(base, "loss_student_t", loss="student_t"),
    "loss_gaussian": lambda base: _with_train(base, "loss_gaussian", loss="gaussian"),
    "loss_si_snr": lambda base: _with_train(base, "loss_si_snr", loss="si_snr"),
    # Permutation (SPEC §3: per-exit PIT -1.8 dB).
    "pit_joint": lambda base: _with_train(base, "pit_joint", permutation="joint"),
    "pit_per_exit": lambda base: _with_train(base, "pit_per_exit", permutation="per_exit"),
    # Likelihood block length T (samples at 8 kHz: 125, 250, 500 ms).
    "block_1000": lambda base: _with_model(base, "block_1000", block_length=1000),
    "block_2000": lambda base: _with_model(base, "block_2000", block_length=2000),
    "block_4000": lambda base: _with_model(base, "block_4000", block_length=4000),
    # Beyond the paper: every exit's estimates shifted to sum to the mixture.
    "mixture_consistency": lambda base: _with_model(base, "mixture_consistency",
                                                    mixture_consistency=True),
    # Beyond the paper: the main path's per-frame RMSNorms off (the demo's choice) or on (SPEC).
    "frame_norm_off": lambda base: _with_model(base, "frame_norm_off", frame_norm=False),
    "frame_norm_on": lambda base: _with_model(base, "frame_norm_on", frame_norm=True),
}


def get(name: str) -> ExperimentConfig:
  """'demo', 'tiny', 'S', 'M', or '<base>/<ablation>' (see ABLATIONS)."""
  base_name, _, ablation = name.partition("/")
  if base_name not in BASES:
    raise ValueError(f"unknown experiment {name!r}; bases: {sorted(BASES)}, ablations: "
                     f"<base>/{{{','.join(sorted(ABLATIONS))}}}")
  config = BASES[base_name]()
  if ablation:
    if ablation not in ABLATIONS:
      raise ValueError(f"unknown ablation {ablation!r} in {name!r}; choose one of "
                       f"{sorted(ABLATIONS)}")
    config = ABLATIONS[ablation](config)
  return config


def override(config: Any, assignments: list[str]) -> Any:
  """Apply 'a.b.c=JSON' assignments to nested frozen dataclasses (bare words are strings).

  The assignments are applied in order and the result is validated once at the end, so
  `--set train.steps=100 --set train.optimizer.total_steps=100` works in either order.
  """
  for assignment in assignments:
    path, separator, text = assignment.partition("=")
    if not separator:
      raise ValueError(f"--set {assignment!r}: expected FIELD.PATH=VALUE")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    config = _replace_path(config, path.split("."), value, assignment)
  try:
    return _validated(config)
  except (TypeError, ValueError) as error:
    raise ValueError(f"--set {' '.join(assignments)}: {error}") from error


def _validated(node: Any) -> Any:
  """`node` rebuilt through its constructors, innermost first, so every check runs again."""
  if not dataclasses.is_dataclass(node):
    return node
  return type(node)(**{f.name: _validated(getattr(node, f.name))
                       for f in dataclasses.fields(node) if f.init})


def _unchecked_replace(node: Any, **changes) -> Any:
  """A copy of the frozen dataclass `node` with `changes`, skipping its checks (see _validated)."""
  copy = object.__new__(type(node))
  for field in dataclasses.fields(node):
    object.__setattr__(copy, field.name, changes.get(field.name, getattr(node, field.name)))
  return copy


def _replace_path(node: Any, path: list[str], value: Any, assignment: str) -> Any:
  head = path[0]
  if isinstance(node, dict):
    if len(path) == 1:
      return {**node, head: value}
    return {**node, head: _replace_path(node.get(head, {}), path[1:], value, assignment)}
  if not dataclasses.is_dataclass(node) or head not in {f.name for f in
                                                        dataclasses.fields(node)}:
    raise ValueError(f"--set {assignment!r}: {type(node).__name__} has no field {head!r}")
  current = getattr(node, head)
  if len(path) > 1:
    return _unchecked_replace(node, **{head: _replace_path(current, path[1:], value,
                                                            assignment)})
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return _unchecked_replace(node, **{head: value})
