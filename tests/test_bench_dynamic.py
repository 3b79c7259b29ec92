"""experiments.bench_dynamic on a random small model and synthetic utterances (reduced)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import bench_dynamic
from press_jax import compute, model_dir
from press_jax.models import press_net


def test_sweep_reports_every_target_and_the_reference():
  model = press_net.create("tiny", width=16, encoder_channels=16, block_length=400)
  params = press_net.init_params(model, jax.random.key(0))
  loaded = model_dir.LoadedModel(model=model, params=params, calibration=None, directory="",
                                 kind="random")
  rng = np.random.default_rng(0)
  utterances = []
  for length in (3000, 4100):
    sources = 0.1 * rng.standard_normal((2, length)).astype(np.float32)
    utterances.append((sources.sum(0), sources))
  result = bench_dynamic.sweep(loaded, utterances, [-100.0, 100.0], 0.9, chunk_seconds=0.25,
                               context_seconds=0.05)
  low, high = result["targets"]
  assert low["mean_exit"] == 1.0 and high["mean_exit"] == 2.0
  # The reference (static last exit) runs only its own exit's heads; the dynamic loop that
  # reaches the last exit also ran exit 1's heads and rule on the way.
  last = result["last_exit"]["gmac_per_s"]
  assert low["gmac_per_s"] < last < high["gmac_per_s"]
  config = model.config
  assert high["gmac_per_s"] / last == pytest.approx(
      compute.gmac_per_second(config, 2, all_heads=True) / compute.gmac_per_second(config, 2))
  assert low["saving_ratio"] is not None and high["saving_ratio"] is None
  assert low["gmac_saving"] > 0.1
  # The last exit chunked vs whole: the same numbers up to the chunk borders.
  assert abs(result["chunking_cost_db"]) < 3.0
  assert np.isfinite(result["whole_utterance_last_exit_si_snri_db"])
  text = bench_dynamic.format_report(result)
  assert "GMAC save" in text and "chunked vs whole-utterance" in text


def test_speed_and_memory_figures():
  result = bench_dynamic.speed("tiny", seconds=1.0, chunk_seconds=0.5, context_seconds=0.25,
                               memory_seconds=(1.0, 3.0), memory_config="tiny")
  assert result["achieved_gflops"] > 0 and result["matmul_gflops"] > 0
  assert [m["output_samples"] for m in result["memory"]] == [8000, 24000]
  assert "real time" in bench_dynamic.format_report({"speed": result})


def test_estimate_free_rule_spends_only_the_chosen_heads():
  """--conditions snr_ref: at a target no block reaches before the last exit, a window runs
  every stage and variance head but only the last exit's waveform head, so it costs what the
  static reference costs plus exit 1's variance head, not the all-heads figure above."""
  model = press_net.create("tiny", width=16, encoder_channels=16, block_length=400,
                           waveform_head="mask")
  params = press_net.init_params(model, jax.random.key(0))
  loaded = model_dir.LoadedModel(model=model, params=params, calibration=None, directory="",
                                 kind="random")
  rng = np.random.default_rng(1)
  sources = 0.1 * rng.standard_normal((2, 3000)).astype(np.float32)
  result = bench_dynamic.sweep(loaded, [(sources.sum(0), sources)], [100.0], 0.9,
                               chunk_seconds=0.25, context_seconds=0.05,
                               conditions=("snr_ref",))
  (high,), last = result["targets"], result["last_exit"]
  config = model.config
  assert high["mean_exit"] == 2.0 and high["waveform_heads_run_mean"] == 1.0
  expected = (compute.gmac_per_second_run(config, 2, waveform_heads=1, variance_heads=2)
              / compute.gmac_per_second(config, 2))
  assert high["gmac_per_s"] / last["gmac_per_s"] == pytest.approx(expected)
  assert expected < compute.gmac_per_second(config, 2, all_heads=True) / compute.gmac_per_second(
      config, 2)
  assert "conditions snr_ref" in bench_dynamic.format_report(result)
