"""Experiment configurations: ml_collections config files, typed by the dataclasses below.

Every experiment is a config file beside this module, `experiments/configs/<name>.py`, whose
`get_config(ablation=None)` returns an `ml_collections.ConfigDict` (as the Flax examples and
big_vision write them; each file's docstring gives its command and the result to expect), and
whose `get_sweep(name)` declares its sweeps as data. Every entry point takes

  --config experiments/configs/demo.py[:ABLATION]   (or a name: --config demo, --config S/exits_12)
  --config.train.steps=100 --config.data.crop_seconds=1.0 ...

(`ml_collections.config_flags`: a value is parsed by the type of the field it replaces, Python
literals for tuples, dicts and None). The ConfigDict is then built into the typed destination,
`ExperimentConfig` (`from_config_dict`): unknown fields, wrong types and every dataclass's own
checks fail there with one line naming the field. `get(name)` and `override(config, ["a.b=v"])`
do the same from Python. Ablations (`ABLATIONS`, data: dotted field -> value) are selected by
the config argument after the colon.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import types
import typing
from typing import Any, Sequence

from absl import flags
from ml_collections import config_dict, config_flags

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
  # Decoded training records kept in memory after their first read, per process (0: decode
  # every crop's record from disk; docs/data.md, "The waveform cache"). press_synth's training
  # split is ~0.9 GiB; larger corpora are cached up to the bound and read past it.
  train_cache_gib: float = 2.0

  def __post_init__(self):
    if not self.train_cache_gib >= 0:
      raise ValueError(f"DataConfig.train_cache_gib must be >= 0 (GiB of decoded training "
                       f"waveforms kept in memory; 0: none), got {self.train_cache_gib}")


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
  # The paper's Fig. 5 on the test split (PIT histograms before / after fine-tuning and with a
  # post-calibration fitted on validation, not stored): experiments.calibrate.calibration_study.
  calibration_figure: bool = True

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)




CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
# The named config files (experiments/configs/<name>.py); `--config NAME` means that file.
BASES = ("demo", "demo_long", "tiny", "S", "M")

# Ablations as data: dotted field -> value, applied to any base's ConfigDict
# (`--config experiments/configs/S.py:exits_12`, or the name `S/exits_12`).
ABLATIONS: dict[str, dict[str, Any]] = {
    # Number of exits at a fixed backbone (SPEC §6: 4 -> 6 -> 12 exits).
    "exits_4": {"train.model_overrides.exits": 4},
    "exits_6": {"train.model_overrides.exits": 6},
    "exits_12": {"train.model_overrides.exits": 12},
    # Likelihood (SPEC §3: Gaussian -0.5 dB, SI-SNR on par).
    "loss_student_t": {"train.loss": "student_t"},
    "loss_gaussian": {"train.loss": "gaussian"},
    "loss_si_snr": {"train.loss": "si_snr"},
    # Permutation (SPEC §3: per-exit PIT -1.8 dB).
    "pit_joint": {"train.permutation": "joint"},
    "pit_per_exit": {"train.permutation": "per_exit"},
    # Likelihood block length T (samples at 8 kHz: 125, 250, 500 ms).
    "block_1000": {"train.model_overrides.block_length": 1000},
    "block_2000": {"train.model_overrides.block_length": 2000},
    "block_4000": {"train.model_overrides.block_length": 4000},
    # Beyond the paper: every exit's estimates shifted to sum to the mixture.
    "mixture_consistency": {"train.model_overrides.mixture_consistency": True},
    # Beyond the paper: the main path's per-frame RMSNorms off (the demo's choice) or on (SPEC).
    "frame_norm_off": {"train.model_overrides.frame_norm": False},
    "frame_norm_on": {"train.model_overrides.frame_norm": True},
}


# --- dataclass <-> ConfigDict -----------------------------------------------------------------
def _field_type(annotation: Any) -> tuple[Any, bool]:
  """(the type without None, whether None is allowed) of a resolved annotation."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return (args[0] if len(args) == 1 else object), True
  return annotation, False


def _scalar_type(annotation: Any) -> type:
  origin = typing.get_origin(annotation) or annotation
  return origin if isinstance(origin, type) else object


def to_config_dict(node: Any) -> config_dict.ConfigDict:
  """A dataclass (ExperimentConfig or any part of it) as a ConfigDict, every field present.

  Fields whose value is None become typed placeholders, so `--config.data.data_dir=/x` parses
  as the field's type; dict fields (model_overrides) become nested ConfigDicts.
  """
  hints = typing.get_type_hints(type(node))
  result = config_dict.ConfigDict()
  for field in dataclasses.fields(node):
    if not field.init:
      continue
    value = getattr(node, field.name)
    field_type, _ = _field_type(hints[field.name])
    if dataclasses.is_dataclass(value):
      result[field.name] = to_config_dict(value)
    elif isinstance(value, dict):
      result[field.name] = config_dict.ConfigDict(dict(value))
    elif value is None:
      result[field.name] = (None if dataclasses.is_dataclass(field_type)
                            else config_dict.placeholder(_scalar_type(field_type)))
    else:
      result[field.name] = value
  return result


def _plain(value: Any) -> Any:
  if isinstance(value, config_dict.ConfigDict):
    return value.to_dict()
  if isinstance(value, list):
    return tuple(value)
  return value


def _build(cls: type, node: Any, path: str) -> Any:
  """`cls` built from the ConfigDict `node` (recursively); errors name the field."""
  where = path or "config"
  if not isinstance(node, (config_dict.ConfigDict, dict)):
    raise ValueError(f"{where}: expected the fields of {cls.__name__}, got {node!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  keys = list(node.keys())
  unknown = [key for key in keys if key not in fields]
  if unknown:
    raise ValueError(f"{where}: {cls.__name__} has no field {unknown[0]!r} (fields: "
                     f"{', '.join(sorted(fields))})")
  kwargs = {}
  for key in keys:
    value = node[key]
    field_type, optional = _field_type(hints[key])
    child = f"{path}.{key}" if path else key
    if dataclasses.is_dataclass(field_type) and value is not None:
      kwargs[key] = _build(field_type, value, child)
    elif value is None and not optional and not dataclasses.is_dataclass(field_type):
      raise ValueError(f"{child}: None is not a valid {cls.__name__}.{key}")
    else:
      kwargs[key] = _plain(value)
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{where}: {error}") from error


def from_config_dict(config: config_dict.ConfigDict) -> ExperimentConfig:
  """The typed ExperimentConfig of a config file's ConfigDict (validated, errors name fields)."""
  return _build(ExperimentConfig, config, "")


def defaults(model: str = "tiny") -> config_dict.ConfigDict:
  """Every field of an ExperimentConfig at the library's defaults: what config files start from."""
  return to_config_dict(ExperimentConfig(name="", train=TrainConfig(model=model)))


def ablate(config: config_dict.ConfigDict, ablation: str | None) -> config_dict.ConfigDict:
  """`config` with the named ablation's fields set and its name suffixed (None: unchanged)."""
  if not ablation:
    return config
  if ablation not in ABLATIONS:
    raise ValueError(f"unknown ablation {ablation!r} in {config.name}/{ablation}; choose one "
                     f"of {sorted(ABLATIONS)}")
  for path, value in ABLATIONS[ablation].items():
    *parents, leaf = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  config.name = f"{config.name}/{ablation}"
  return config


# --- loading and overriding -------------------------------------------------------------------
def config_file(spec: str) -> str:
  """'demo' -> '<CONFIG_DIR>/demo.py', 'S/exits_12' -> '<...>/S.py:exits_12'; a path as given."""
  path, colon, argument = spec.partition(":")
  if path.endswith(".py") or os.sep in path and not colon and path.split(os.sep)[0] not in BASES:
    if not os.path.isfile(path):
      raise ValueError(f"--config {spec}: no config file {path!r}")
    return spec
  base, _, ablation = spec.partition("/")
  if base not in BASES:
    raise ValueError(f"unknown experiment {spec!r}; names: {list(BASES)}, ablations: "
                     f"<name>/{{{','.join(sorted(ABLATIONS))}}}, or a path to a config file")
  if ablation and ablation not in ABLATIONS:
    raise ValueError(f"unknown ablation {ablation!r} in {spec!r}; choose one of "
                     f"{sorted(ABLATIONS)}")
  return os.path.join(CONFIG_DIR, f"{base}.py") + (f":{ablation}" if ablation else "")


def _flag_error(error: Exception) -> str:
  text = (error.args[0] if isinstance(error, KeyError) and error.args else str(error))
  text = str(text).strip().splitlines()
  return " ".join(line.strip() for line in text if line.strip())[:400] or type(error).__name__


_NONE = ("None", "none", "null")


def _parse(define, argv: Sequence[str]) -> tuple[config_dict.ConfigDict, list[str]]:
  """Parses `--config...` flags out of argv with config_flags; returns (ConfigDict, the rest).

  `--config.a.b=None` (config_flags parses by the field's type, which is never None) is set
  after the others: it clears an optional field, and the typed build checks that it may.
  """
  argv, cleared = ["press"] + list(argv), []
  for arg in list(argv):
    field, separator, value = arg.partition("=")
    if field.startswith("--config.") and separator and value in _NONE:
      argv.remove(arg)
      cleared.append(field[len("--config."):])
  holder = flags.FlagValues()
  try:
    flag = define(holder, argv)
    rest = holder(argv, known_only=True)
    value = flag.value
    for path in cleared:
      *parents, leaf = path.split(".")
      node = value
      for parent in parents:
        node = node[parent]
      if leaf not in node:
        raise KeyError(f"no field {leaf!r}")
      node[leaf] = None
  except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as error:
    overrides = [arg for arg in list(argv) if arg.startswith("--config.")] + [
        f"--config.{path}=None" for path in cleared]
    raise ValueError(f"{' '.join(overrides) or '--config'}: {_flag_error(error)}") from error
  return value, rest[1:]


def _override_flags(overrides: Sequence[str]) -> list[str]:
  argv = []
  for assignment in overrides:
    field, separator, _ = assignment.partition("=")
    if field.startswith("-"):  # A command-line flag given where 'field.path=value' is expected.
      raise ValueError(f"config override {assignment!r}: expected FIELD.PATH=VALUE here, "
                       "without the --config. of the command line")
    if not separator or not field:
      raise ValueError(f"--config.{assignment}: expected --config.FIELD.PATH=VALUE")
    argv.append(f"--config.{assignment}")
  return argv


def load_config_dict(spec: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """The ConfigDict of config file or name `spec` with 'field.path=value' overrides applied."""
  argv = ["--config", config_file(spec)] + _override_flags(overrides)
  config, _ = _parse(lambda holder, args: config_flags.DEFINE_config_file(
      "config", flag_values=holder, lock_config=False, accept_new_attributes=True,
      sys_argv=args), argv)
  return config


def _validated(config: config_dict.ConfigDict, overrides: Sequence[str]) -> ExperimentConfig:
  try:
    return from_config_dict(config)
  except ValueError as error:
    raise ValueError(" ".join(f"--config.{o}" for o in overrides) + (": " if overrides else "")
                     + str(error)) from error


def resolve(spec: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
  """The typed experiment of a config file or name, with 'field.path=value' overrides."""
  return _validated(load_config_dict(spec, overrides), overrides)


def get(name: str) -> ExperimentConfig:
  """'demo', 'tiny', 'S', 'M', '<name>/<ablation>' (see ABLATIONS) or a config file's path."""
  return resolve(name)


def override(experiment: ExperimentConfig, assignments: Sequence[str]) -> ExperimentConfig:
  """`experiment` with 'field.path=value' assignments, parsed as `--config.field.path=value`.

  The assignments are applied in order and the result is validated once at the end, so
  `train.steps=100` and `train.optimizer.total_steps=100` work together in either order.
  """
  if not assignments:
    return experiment
  config, _ = _parse(lambda holder, args: config_flags.DEFINE_config_dict(
      "config", to_config_dict(experiment), flag_values=holder, lock_config=False,
      accept_new_attributes=True, sys_argv=args), _override_flags(assignments))
  return _validated(config, assignments)


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the `--config` and `--config.x=y` arguments, the rest) of a command line."""
  config_args, rest, items = [], [], list(argv)
  i = 0
  while i < len(items):
    arg = items[i]
    if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
      config_args += items[i:i + 2]
      i += 2
      continue
    if arg.startswith("--config=") or arg.startswith("--config."):
      config_args.append(arg)
    else:
      rest.append(arg)
    i += 1
  return config_args, rest


def config_args_to_spec(config_args: Sequence[str], default: str) -> tuple[str, list[str]]:
  """(the config file or name, ['field.path=value', ...]) of split_config_args' first part."""
  spec, overrides, items, i = default, [], list(config_args), 0
  while i < len(items):
    arg = items[i]
    if arg == "--config":
      if i + 1 >= len(items):
        raise ValueError("--config: expected a config file or name")
      spec, i = items[i + 1], i + 2
      continue
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif "=" in arg:
      overrides.append(arg[len("--config."):])
    else:  # '--config.x' 'value'
      if i + 1 >= len(items):
        raise ValueError(f"{arg}: expected a value")
      overrides.append(f"{arg[len('--config.'):]}={items[i + 1]}")
      i += 1
    i += 1
  return spec, overrides


CONFIG_HELP = ("config file or name (demo, demo_long, tiny, S, M; NAME/ABLATION or "
               "FILE.py:ABLATION); override fields with --config.FIELD.PATH=VALUE")


def parse_command_line(parser, argv: Sequence[str] | None = None, default: str = "demo"):
  """(argparse namespace, ExperimentConfig) of an entry point's command line.

  `--config` and `--config.x=y` are taken out and resolved through ml_collections; the rest
  goes to `parser`. The namespace also carries `config` (the spec) and `config_overrides`.
  A bad config or override exits through `parser.error` with one line.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  config_args, rest = split_config_args(argv)
  if not any(action.dest == "config" for action in parser._actions):  # For --help only.
    parser.add_argument("--config", default=default, help=CONFIG_HELP)
  args = parser.parse_args(rest)
  try:
    spec, overrides = config_args_to_spec(config_args, default)
    experiment = resolve(spec, overrides)
  except ValueError as error:
    parser.error(str(error))
  args.config, args.config_overrides = spec, overrides
  return args, experiment


def load_module(spec: str) -> types.ModuleType:
  """The Python module of a config file or name (for its get_sweep)."""
  path = config_file(spec).split(":", 1)[0]
  module_spec = importlib.util.spec_from_file_location(
      "press_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module
