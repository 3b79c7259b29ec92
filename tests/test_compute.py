"""Parameter and GMAC/s counts of the presets, cross-checked against real models and XLA."""

import json

import jax
import pytest

from experiments import model_table
from press_jax import compute
from press_jax import config as config_lib


def within(value, target, tolerance):
  return abs(value - target) <= tolerance * target


def test_s_preset_matches_the_paper():
  costs = compute.exit_costs(config_lib.preset("S"))
  assert len(costs) == 4
  assert 3.40e6 <= costs[-1].params <= 3.60e6
  assert within(costs[-1].gmac_per_s, 11.3, 0.10)


def test_m_preset_matches_the_paper():
  costs = compute.exit_costs(config_lib.preset("M"))
  assert len(costs) == 12
  assert within(costs[11].params, 22.4e6, 0.05)
  assert within(costs[7].params, 15.6e6, 0.05)
  assert within(costs[7].gmac_per_s, 54.4, 0.10)
  assert within(costs[11].gmac_per_s, 79.7, 0.10)


def test_costs_grow_with_depth():
  costs = compute.exit_costs(config_lib.preset("M"))
  params = [c.params for c in costs]
  gmacs = [c.gmac_per_s for c in costs]
  assert params == sorted(params) and gmacs == sorted(gmacs)


@pytest.mark.parametrize("name,exit_number", [("S", 2), ("tiny", 2), ("M", 5)])
def test_params_per_exit_equal_a_truncated_model(name, exit_number):
  """A separately built network cut after that exit has exactly that many parameters."""
  config = config_lib.preset(name)
  cut = compute.truncated(config, exit_number)
  shapes = compute.parameter_shapes(cut)
  total = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
  assert total == compute.params_per_exit(config)[exit_number - 1]


UNEQUAL = {"decoder_blocks": 4, "exits": 3, "stage_blocks": (1, 1, 2), "attention_every": 3}


def test_unequal_stages_count_like_the_uniform_network_they_extend():
  """Exits 1-2 of stage_blocks (1, 1, 2) are a uniform 2-exit network; exit 3 is all of it."""
  config = config_lib.preset("tiny", **UNEQUAL)
  counts = compute.params_per_exit(config)
  everything = sum(leaf.size for leaf in jax.tree_util.tree_leaves(
      compute.parameter_shapes(config)))
  # Attention comes after the third RNN block: none in the shallow network's two stages.
  shallow = config_lib.preset("tiny", decoder_blocks=2, exits=2, attention_every=0)
  assert counts[-1] == everything
  assert counts[:2] == compute.params_per_exit(shallow)
  assert compute.gmac_per_second(config, 2) == pytest.approx(compute.gmac_per_second(shallow, 2))


@pytest.mark.parametrize("name,exit_number,overrides", [
    ("tiny", 2, {}), ("S", 1, {}), ("tiny", 2, {"waveform_head": "mask"}),
    ("tiny", 3, dict(UNEQUAL, waveform_head="mask"))])
def test_analytic_count_agrees_with_xla_cost_analysis(name, exit_number, overrides):
  """XLA counts every flop (activations, norms, the scan's extra work); dense MACs dominate."""
  config = config_lib.preset(name, **overrides)
  analytic = compute.gmac_per_second(config, exit_number, all_heads=True)
  xla = compute.xla_gmac_per_second(config, exit_number, seconds=0.5)
  assert 1.0 <= xla / analytic <= 1.3, (xla, analytic)


def test_model_table_json(capsys):
  model_table.main(["--json", "--presets", "S"])
  table = json.loads(capsys.readouterr().out)
  assert [row["exit"] for row in table] == [1, 2, 3, 4]
  assert set(table[0]) == {"preset", "exit", "params", "gmac_per_s"}
  assert table[-1]["preset"] == "S"


def test_model_table_readable(capsys):
  model_table.main(["--presets", "S"])
  out = capsys.readouterr().out
  assert "GMAC/s" in out and "11.3" in out
