"""Experiment configs: bases and ablations build, override works, ablations stay on claim."""

import argparse
import dataclasses
import os
import re

import pytest

from experiments import configs
from experiments.configs import demo as demo_config
from press_jax import compute

# tiny has 2 decoder blocks, demo 3: 4, 6 or 12 exits cannot divide them (PressConfig refuses).
_INVALID = {(base, ablation) for base in ("tiny", "demo", "demo_long")
            for ablation in ("exits_4", "exits_6", "exits_12")}

# What each ablation may change: dotted paths in ExperimentConfig.to_dict() (besides the name).
CLAIMS = {
    "exits_4": {"train.model_overrides.exits"},
    "exits_6": {"train.model_overrides.exits"},
    "exits_12": {"train.model_overrides.exits"},
    "loss_student_t": {"train.loss"},
    "loss_gaussian": {"train.loss"},
    "loss_si_snr": {"train.loss"},
    "pit_joint": {"train.permutation"},
    "pit_per_exit": {"train.permutation"},
    "block_1000": {"train.model_overrides.block_length"},
    "block_2000": {"train.model_overrides.block_length"},
    "block_4000": {"train.model_overrides.block_length"},
    "mixture_consistency": {"train.model_overrides.mixture_consistency"},
    "frame_norm_off": {"train.model_overrides.frame_norm"},
    "frame_norm_on": {"train.model_overrides.frame_norm"},
}


def flatten(value, prefix=""):
  if isinstance(value, dict):
    flat = {}
    for key, item in value.items():
      flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat
  return {prefix: value}


def changed_fields(before, after):
  old, new = flatten(before.to_dict()), flatten(after.to_dict())
  return {key for key in old.keys() | new.keys() if old.get(key, "<absent>") != new.get(
      key, "<absent>")} - {"name"}


def build(config):
  """Everything a run builds from the config before touching data."""
  model = config.train.model_config()
  config.train.loss_config()
  return model


@pytest.mark.parametrize("base", sorted(configs.BASES))
def test_bases_build(base):
  config = configs.get(base)
  assert config.name == base
  model = build(config)
  assert config.data.crop_seconds * model.sample_rate >= model.block_length


@pytest.mark.parametrize("name", [
    f"{base}/{ablation}" for base in sorted(configs.BASES) for ablation in sorted(configs.ABLATIONS)
    if (base, ablation) not in _INVALID])
def test_ablations_build(name):
  config = configs.get(name)
  assert config.name == name
  build(config)


@pytest.mark.parametrize("base, ablation", sorted(_INVALID))
def test_exit_ablations_need_enough_decoder_blocks(base, ablation):
  """tiny/demo have 2/3 decoder blocks: 4, 6 or 12 exits is refused with a clear error."""
  with pytest.raises(ValueError, match="decoder_blocks"):
    build(configs.get(f"{base}/{ablation}"))


@pytest.mark.parametrize("name, message", [
    ("L", "unknown experiment 'L'"), ("S/exits_5", "unknown ablation 'exits_5'")])
def test_unknown_names(name, message):
  with pytest.raises(ValueError, match=message):
    configs.get(name)


@pytest.mark.parametrize("base, ablation", [
    (base, ablation) for base in ("tiny", "S", "M") for ablation in sorted(CLAIMS)
    if (base, ablation) not in _INVALID])
def test_ablations_change_only_what_they_claim(base, ablation):
  config = configs.get(base)
  ablated = configs.get(f"{base}/{ablation}")
  assert changed_fields(config, ablated) <= CLAIMS[ablation]
  model, ablated_model = build(config), build(ablated)
  model_fields = {f.name for f in dataclasses.fields(model)
                  if getattr(model, f.name) != getattr(ablated_model, f.name)}
  assert model_fields <= {path.rsplit(".", 1)[1] for path in CLAIMS[ablation]}


@pytest.mark.parametrize("ablation, exits", [("exits_4", 4), ("exits_6", 6), ("exits_12", 12)])
def test_exit_ablations_keep_the_backbone(ablation, exits):
  base = configs.get("S").train.model_config()
  model = configs.get(f"S/{ablation}").train.model_config()
  assert model.exits == exits
  assert (model.width, model.encoder_blocks, model.decoder_blocks) == (
      base.width, base.encoder_blocks, base.decoder_blocks)
  base_params, params = compute.params_per_exit(base), compute.params_per_exit(model)
  assert len(params) == exits
  assert abs(params[-1] / base_params[-1] - 1) < 0.05  # Only exit heads are added or removed.
  base_gmacs = compute.gmac_per_second(base, base.exits)
  assert abs(compute.gmac_per_second(model, exits) / base_gmacs - 1) < 0.01


# --- override (--config.x=y through ml_collections.config_flags) ------------------------------
def test_override_nested_fields():
  config = configs.get("tiny")
  changed = configs.override(config, [
      "train.optimizer.peak_learning_rate=0.01", "data.dataset=wham", "train.seed=3",
      "data.max_validation_batches=None", "data.builder_config=8k_min",
      "data.data_dir=/corpora/tfds"])
  assert changed.train.optimizer.peak_learning_rate == 0.01
  assert changed.train.optimizer.total_steps == config.train.optimizer.total_steps
  assert (changed.data.dataset, changed.train.seed) == ("wham", 3)
  assert changed.data.max_validation_batches is None
  assert changed.data.builder_config == "8k_min"
  assert changed.data.data_dir == "/corpora/tfds"  # A None default: a typed placeholder.
  assert config.train.seed == 0 and config.data.dataset == "press_synth"  # Unchanged.
  assert changed_fields(config, changed) == {
      "train.optimizer.peak_learning_rate", "data.dataset", "train.seed",
      "data.max_validation_batches", "data.builder_config", "data.data_dir"}


def test_override_values_parse_by_the_fields_type():
  changed = configs.override(configs.get("tiny"), [
      "policy.target_dbs=(5, 15.5)", "data.bucket_seconds=(2.0,)", "train.remat=true",
      "train.optimizer.peak_learning_rate=1", "train.exit_weights=(1.0, 2.0)"])
  assert changed.policy.target_dbs == (5, 15.5)
  assert changed.data.bucket_seconds == (2.0,)
  assert changed.train.remat is True
  assert changed.train.optimizer.peak_learning_rate == 1.0
  assert isinstance(changed.train.optimizer.peak_learning_rate, float)
  assert changed.train.exit_weights == (1.0, 2.0)


def test_override_dicts():
  config = configs.get("S/exits_6")
  changed = configs.override(config, ["train.model_overrides.width=32",
                                      "train.model_overrides.exits=4"])
  assert changed.train.model_overrides == {"exits": 4, "width": 32}
  assert config.train.model_overrides == {"exits": 6}
  assert changed.train.model_config().width == 32
  replaced = configs.override(config, ["train.model_overrides={'block_length': 1000}"])
  assert replaced.train.model_overrides == {"block_length": 1000}


def test_override_finetune_none():
  assert configs.override(configs.get("tiny"), ["finetune=None"]).finetune is None


@pytest.mark.parametrize("assignment, message", [
    ("train.optimizer.nope=1", r"train.optimizer: OptimizerConfig has no field 'nope'"),
    ("trian.seed=1", r"Did you mean \"train\""),
    ("train.seed.value=1", r"does not exist"),
    ("train.seed", r"expected --config.FIELD.PATH=VALUE"),
    ("train.steps=many", r"invalid literal for int"),
    ("train.seed=None", r"None is not a valid TrainConfig.seed"),
    ("train.model_overrides.nope=1", r"PressConfig"),
    ("data.train_cache_gib=-0.5", r"data: DataConfig.train_cache_gib must be >= 0"),
])
def test_override_errors_name_the_field(assignment, message):
  with pytest.raises(ValueError, match=message) as error:
    configs.override(configs.get("tiny"), [assignment]).train.model_config()
  assert "\n" not in str(error.value)
  if "model_overrides" not in assignment:
    assert f"--config.{assignment}" in str(error.value)


def test_an_override_given_as_a_flag_is_refused_in_one_line():
  """resolve(name, sets) takes 'field.path=value'; a command-line flag there is named as such
  (it was reported as '--config.--config.train.seed=1: malformed node')."""
  with pytest.raises(ValueError, match=r"'--config.train.seed=1': expected FIELD.PATH=VALUE "
                                       r"here, without the --config\. of the command line"):
    configs.resolve("tiny", ["--config.train.seed=1"])


def test_override_validates_the_result():
  with pytest.raises(ValueError, match="batch_size_per_device"):
    configs.override(configs.get("tiny"), ["train.batch_size_per_device=0"])


@pytest.mark.parametrize("order", [1, -1])
def test_override_validates_once_after_all_assignments(order):
  # steps=100 alone leaves total_steps (the demo's steps) beyond the run: only the pair is valid.
  assignments = ["train.steps=100", "train.optimizer.total_steps=100"][::order]
  changed = configs.override(configs.get("demo"), assignments)
  assert (changed.train.steps, changed.train.optimizer.total_steps) == (100, 100)
  with pytest.raises(ValueError, match=rf"total_steps \({demo_config.DEMO_STEPS}\) exceeds") as error:
    configs.override(configs.get("demo"), ["train.steps=100"])
  assert "--config.train.steps=100" in str(error.value)


# --- config files and the command line ---------------------------------------------------------
CONFIG_FILES = sorted(name[:-3] for name in os.listdir(configs.CONFIG_DIR)
                      if name.endswith(".py") and not name.startswith("_"))


def test_every_config_file_is_a_named_base():
  assert CONFIG_FILES == sorted(configs.BASES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_load_validate_and_say_how_to_run_them(name):
  path = os.path.join(configs.CONFIG_DIR, f"{name}.py")
  module = configs.load_module(path)
  assert "Command" in module.__doc__ and "Expected" in module.__doc__
  config = module.get_config()
  experiment = configs.from_config_dict(config)
  assert experiment == configs.get(name) == configs.get(path)
  build(experiment)
  # Round trip: the typed experiment as a ConfigDict builds back to itself.
  assert configs.from_config_dict(configs.to_config_dict(experiment)) == experiment


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if hasattr(
    configs.load_module(n), "get_sweep")])
def test_declared_sweeps_expand_to_valid_runs(name):
  module = configs.load_module(name)
  sweep_names = re.findall(r"^  (\w+): ", module.get_sweep.__doc__, flags=re.M)
  assert sweep_names, f"{name}.get_sweep's docstring lists its sweeps"
  from experiments import sweep

  for sweep_name in sweep_names:
    declared = sweep.declared_sweep(name, sweep_name)
    specs = sweep.expand(name, declared["ablations"], declared["grid"])
    for spec in specs:
      spec.experiment()
  with pytest.raises(ValueError, match="declares no sweep 'nope'"):
    sweep.declared_sweep(name, "nope")


def test_ablation_after_the_colon_equals_the_name():
  path = os.path.join(configs.CONFIG_DIR, "S.py")
  assert configs.get(f"{path}:exits_12") == configs.get("S/exits_12")
  assert configs.get(f"{path}:exits_12").name == "S/exits_12"


def test_a_config_file_outside_the_package(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("from experiments.configs import tiny\n\n"
                  "def get_config(ablation=None):\n"
                  "  config = tiny.get_config(ablation)\n"
                  "  config.name = 'mine'\n  config.train.seed = 7\n  return config\n")
  experiment = configs.resolve(str(path), ["train.log_every=3"])
  assert (experiment.name, experiment.train.seed, experiment.train.log_every) == ("mine", 7, 3)
  with pytest.raises(ValueError, match="no config file"):
    configs.resolve(str(tmp_path / "absent.py"))


def _parser():
  parser = argparse.ArgumentParser(prog="entry")
  parser.add_argument("--workdir")
  return parser


def test_command_line_config_and_overrides():
  path = os.path.join(configs.CONFIG_DIR, "demo.py")
  for argv in (["--config", path, "--config.train.steps=100", "--workdir", "w",
                "--config.train.optimizer.total_steps", "100"],
               ["--workdir=w", "--config=demo", "--config.train.steps=100",
                "--config.train.optimizer.total_steps=100"]):
    args, experiment = configs.parse_command_line(_parser(), argv)
    assert args.workdir == "w"
    assert (experiment.train.steps, experiment.train.optimizer.total_steps) == (100, 100)
    assert experiment.train.model_overrides == demo_config.DEMO_MODEL
    assert args.config_overrides == ["train.steps=100", "train.optimizer.total_steps=100"]
  args, experiment = configs.parse_command_line(_parser(), [], default="tiny")
  assert experiment == configs.get("tiny") and args.config == "tiny"


@pytest.mark.parametrize("argv, message", [
    (["--config", "L"], "unknown experiment 'L'"),
    (["--config.train.steps=many"], "--config.train.steps=many: .*invalid literal for int"),
    (["--config.train.nope=1"], "TrainConfig has no field 'nope'"),
    (["--config"], "expected a config file or name"),
])
def test_command_line_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    configs.parse_command_line(_parser(), argv, default="tiny")
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert re.search(message, error), error


def test_demo_long_is_the_demo_recipe_with_more_steps():
  demo, long = configs.get("demo"), configs.get("demo_long")
  assert changed_fields(demo, long) == {
      "train.steps", "train.eval_every", "train.checkpoint_every", "train.time_limit_s",
      "train.optimizer.total_steps"}
  assert long.train.optimizer.total_steps == long.train.steps > demo.train.steps
