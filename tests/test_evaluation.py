"""Evaluation of exits and policies: the dynamic rule's extremes equal the static exits."""

import jax
import numpy as np
import pytest

from press_jax import compute, evaluation
from press_jax.models import press_net


def batches(count=2, devices=1, batch=2, samples=3200, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    sources = rng.standard_normal((devices, batch, 2, samples)).astype(np.float32) * 0.1
    mask = np.ones((devices, batch, samples), np.float32)
    mask[:, -1, samples // 2:] = 0.0  # One shorter utterance, padded.
    sources *= mask[:, :, None, :]
    yield {"mixture": sources.sum(2), "sources": sources, "mask": mask,
           "example_mask": np.array([[1.0] * (batch - 1) + [1.0]] * devices)}


@pytest.fixture(scope="module")
def summary():
  model, params = perturbed_tiny()
  gmacs = [c.gmac_per_s for c in compute.exit_costs(model.config)]
  policy = evaluation.PolicySettings(target_dbs=(-300.0, 300.0), confidence=0.5)
  return evaluation.evaluate(model, params, batches(), gmacs, policy, with_sdr=True), gmacs


def test_per_exit_rows(summary):
  result, gmacs = summary
  assert result["utterances"] == 4
  assert [e["exit"] for e in result["per_exit"]] == [1, 2]
  assert [e["gmac_per_s"] for e in result["per_exit"]] == pytest.approx(gmacs)
  for entry in result["per_exit"]:
    assert np.isfinite(entry["si_snri_db"]) and np.isfinite(entry["sdri_db"])
    assert 0.0 <= entry["silent_stream_fraction"] <= 1.0


def test_output_level_finds_a_silent_stream_at_its_permutation():
  rng = np.random.default_rng(5)
  sources = rng.standard_normal((2, 2, 400)).astype(np.float32)
  mask = np.ones((2, 400), np.float32)
  mask[1, 300:] = 0.0
  # Exit 1: utterance 0 estimates swapped (estimate 0 is source 1) at 0.1x amplitude; utterance
  # 1's estimate 1 silent on its valid samples (garbage on padding must not count).
  means = np.stack([np.stack([0.1 * sources[0, ::-1], sources[1] * np.array([[1.0], [0.0]])]),
                    np.stack([sources[0], sources[1]])])
  means[0, 1, 1, 300:] = 50.0
  permutation = np.array([[[1, 0], [0, 1]], [[0, 1], [0, 1]]], np.int32)
  level = np.asarray(evaluation.output_level_db(means, sources, mask, permutation))
  valid = sources * mask[:, None, :]
  reference = np.empty((2, 2, 2))
  for e in range(2):
    for b in range(2):
      for j in range(2):
        estimate = means[e, b, j] * mask[b]
        energy = np.sum(estimate.astype(np.float64) ** 2)
        reference[e, b, j] = -np.inf if energy == 0 else 10 * np.log10(
            energy / np.sum(valid[b, permutation[e, b, j]].astype(np.float64) ** 2))
  np.testing.assert_allclose(level, reference, atol=1e-3)
  np.testing.assert_allclose(level[0, 0], [-20.0, -20.0], atol=1e-3)
  assert level[0, 1, 1] < evaluation.SILENT_STREAM_DB < level[0, 1, 0]


def test_lowest_target_exits_first_and_matches_exit_one(summary):
  result, gmacs = summary
  low = result["dynamic"][0]
  assert low["mean_exit"] == 1.0
  assert low["gmac_per_s"] == pytest.approx(gmacs[0])
  assert low["si_snri_db"] == pytest.approx(result["per_exit"][0]["si_snri_db"], abs=1e-3)
  assert low["regret_db"] == 0.0 and low["oracle_regret_db"] == 0.0


def test_highest_target_runs_to_the_last_exit(summary):
  result, gmacs = summary
  high = result["dynamic"][1]
  assert high["mean_exit"] == 2.0
  assert high["gmac_per_s"] == pytest.approx(gmacs[-1])
  assert high["si_snri_db"] == pytest.approx(result["per_exit"][-1]["si_snri_db"], abs=1e-3)
  # Regret at t = 300 dB is t minus the last exit's block SNR: positive and equal to static.
  assert high["regret_db"] == pytest.approx(high["static_regret_db"][-1], rel=1e-6)
  assert high["oracle_regret_db"] == pytest.approx(high["static_regret_db"][-1], rel=1e-6)


def filler_batches():
  """batches() with the last batch's second slot a filler slot: garbage and NaN under a full
  sample mask, marked by example_mask only (the loaders zero filler slots; this must not
  matter)."""
  result = list(batches())
  last = result[-1]
  rng = np.random.default_rng(9)
  last["mixture"][0, 1] = rng.standard_normal(last["mixture"].shape[-1])
  last["mixture"][0, 1, 7] = np.nan
  last["sources"][0, 1] = rng.standard_normal(last["sources"].shape[2:])
  last["mask"][0, 1] = 1.0
  last["example_mask"][0, 1] = 0.0
  return result


@pytest.fixture(scope="module")
def filler_run(summary):
  """The evaluator on filler_batches(), and a plain numpy reference on the 3 valid utterances."""
  _, gmacs = summary
  model, params = perturbed_tiny()
  policy = evaluation.PolicySettings(target_dbs=(-300.0, 300.0), confidence=0.5)
  evaluator = evaluation.Evaluator(model, params, gmacs, policy, with_sdr=True)
  result = evaluator.run(filler_batches())
  valid = [(b, i) for b, batch in enumerate(filler_batches()) for i in range(2)
           if batch["example_mask"][0, i] > 0]
  rows = [filler_batches()[b] for b, _ in valid]
  mixture = np.stack([r["mixture"][0, i] for r, (_, i) in zip(rows, valid)])
  sources = np.stack([r["sources"][0, i] for r, (_, i) in zip(rows, valid)])
  mask = np.stack([r["mask"][0, i] for r, (_, i) in zip(rows, valid)])
  outputs = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))(params, mixture, mask)
  return result, evaluator, numpy_reference(np.asarray(outputs.mean, np.float64), mixture,
                                            sources, mask, model.config.block_length, gmacs)


def _si_snr_numpy(estimate, target):
  """Plain SI-SNR (dB) over the given samples, float64, eps 1e-8 as metrics.si_snr."""
  estimate, target = estimate - estimate.mean(), target - target.mean()
  projection = (estimate @ target) / (target @ target + 1e-8) * target
  noise = estimate - projection
  return 10 * np.log10((projection @ projection + 1e-8) / (noise @ noise + 1e-8))


def numpy_reference(means, mixture, sources, mask, block_length, gmacs):
  """Per-exit SI-SNRi means, and per static exit / oracle target: GMAC/s, mean exit and regret,
  computed per utterance in plain numpy (permutations enumerated, blocks looped)."""
  exits, utterances, speakers, _ = means.shape
  si_snri = np.zeros((utterances, exits))
  block_snr = []  # Per utterance (exits, speakers, blocks), targets aligned by the last exit.
  for u in range(utterances):
    length = int(mask[u].sum())
    src, mix = sources[u, :, :length].astype(np.float64), mixture[u, :length].astype(np.float64)
    reference = [_si_snr_numpy(mix, src[j]) for j in range(speakers)]
    permutations = [(0, 1), (1, 0)]
    for e in range(exits):
      scores = [np.mean([_si_snr_numpy(means[e, u, p[j], :length], src[j]) - reference[j]
                         for j in range(speakers)]) for p in permutations]
      si_snri[u, e] = max(scores)
      if e == exits - 1:
        best = permutations[int(np.argmax([np.mean([_si_snr_numpy(means[e, u, p[j], :length],
                                                                  src[j]) for j in range(speakers)])
                                           for p in permutations]))]
    # Estimate j of the last exit matches source best[j]... aligned[j] = source of estimate j.
    aligned = np.empty_like(src)
    for j in range(speakers):
      aligned[best[j]] = src[j]
    blocks = -(-length // block_length)
    snr = np.zeros((exits, speakers, blocks))
    for e in range(exits):
      for j in range(speakers):
        for b in range(blocks):
          part = slice(b * block_length, min((b + 1) * block_length, length))
          signal, error = aligned[j, part], aligned[j, part] - means[e, u, j, part]
          snr[e, j, b] = 10 * np.log10((signal @ signal + 1e-8) / (error @ error + 1e-8))
    block_snr.append(snr)

  def policy(choose, target):
    """GMAC/s, mean exit, regret at `target` of a per-block choice over every valid block."""
    chosen = [choose(snr) for snr in block_snr]  # (blocks,) per utterance
    exits_ = np.concatenate(chosen)
    shortfall = np.concatenate([np.maximum(0.0, target - snr[c, :, np.arange(len(c))]).ravel()
                                for snr, c in zip(block_snr, chosen)])
    return {"gmac_per_s": float(np.mean(np.asarray(gmacs)[exits_])),
            "mean_exit": float(np.mean(exits_) + 1), "regret": float(np.mean(shortfall))}

  def oracle(target):
    def choose(snr):
      ok = np.min(snr, axis=1) >= target  # (exits, blocks)
      ok[-1] = True
      return np.argmax(ok, axis=0)
    return choose

  return {"utterances": utterances, "si_snri": si_snri.mean(0),
          "static": lambda e, t: policy(lambda snr: np.full(snr.shape[-1], e), t),
          "oracle": lambda t: policy(oracle(t), t)}


def perturbed_tiny():
  model = press_net.create("tiny")
  params = press_net.init_params(model, jax.random.key(0))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return model, jax.tree_util.tree_unflatten(
      tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_filler_slots_count_for_nothing(filler_run):
  """A filler slot (example_mask 0) holding NaN is neither counted nor able to poison a sum:
  the summary equals a plain numpy computation on the valid utterances only."""
  result, evaluator, reference = filler_run
  assert result["utterances"] == reference["utterances"] == 3
  assert len(evaluator.per_utterance()["si_snri"]) == 3
  np.testing.assert_allclose([e["si_snri_db"] for e in result["per_exit"]],
                             reference["si_snri"], atol=2e-3)
  for entry in result["per_exit"]:
    assert np.isfinite(entry["sdri_db"]) and np.isfinite(entry["calibration"]["crps_db"])
    # 2 full utterances x 2 blocks + the padded one's 1 valid block, x 2 speakers.
    assert entry["calibration"]["blocks"] == (2 * 2 + 1) * 2


def test_static_and_oracle_rows_match_a_numpy_reference(filler_run):
  """Cost, mean exit and one-sided regret of the static exits and the oracle (at both targets)
  against plain numpy on the valid blocks (block SNRs, exits chosen by loops)."""
  result, _, reference = filler_run
  for row in result["policies"]:
    for key, target in row["regret_db"].items():
      if row["policy"] == "static":
        expected = reference["static"](row["exit"] - 1, float(key))
      elif row["policy"] == "oracle" and float(key) == row["target_db"]:
        expected = reference["oracle"](row["target_db"])
      else:
        continue
      assert target == pytest.approx(expected["regret"], rel=1e-4, abs=2e-3), (row, key)
      assert row["gmac_per_s"] == pytest.approx(expected["gmac_per_s"], rel=1e-6)
      assert row["mean_exit"] == pytest.approx(expected["mean_exit"], abs=1e-9)
  for d in result["dynamic"]:  # The dynamic summary is read from the same rows.
    oracle = reference["oracle"](d["target_db"])
    assert d["oracle_regret_db"] == pytest.approx(oracle["regret"], rel=1e-4, abs=2e-3)
    assert sum(d["exit_histogram"]) == 2 * 2 + 1  # Valid blocks only.


def test_the_trainer_validation_is_the_evaluator_on_exits_only(summary):
  """train.validate: the history row's numbers are the evaluator's per-exit means."""
  from press_jax import train

  result, _ = summary
  model, params = perturbed_tiny()
  evaluator = evaluation.Evaluator(model, policy=None, with_calibration=False)
  row = train.validate(evaluator, params, batches)
  assert row["utterances"] == result["utterances"]
  np.testing.assert_allclose(row["si_snr_improvement"],
                             [e["si_snri_db"] for e in result["per_exit"]], atol=1e-5)
  np.testing.assert_allclose(row["si_snr"], [e["si_snr_db"] for e in result["per_exit"]],
                             atol=1e-5)
  again = evaluator.run(batches(), params=params)  # Reused: accumulators start afresh.
  assert again["utterances"] == result["utterances"] and "policies" not in again
  with pytest.raises(ValueError, match="no utterance"):
    evaluator.run([], params=params)


def test_evaluators_of_one_model_and_plan_share_one_compiled_step(summary):
  """A second Evaluator of the same model, plan and mesh reuses the first one's jitted step (no
  second trace or compilation); other params or calibrations are inputs, not a new program."""
  model, params = perturbed_tiny()
  gmacs = [c.gmac_per_s for c in compute.exit_costs(model.config)]
  policy = evaluation.PolicySettings(target_dbs=(-300.0, 300.0), confidence=0.5)
  first = evaluation.Evaluator(model, params, gmacs, policy, with_sdr=True)
  traces = first._step._cache_size()
  second = evaluation.Evaluator(model, jax.tree_util.tree_map(lambda x: x * 1.01, params),
                                gmacs, policy, with_sdr=True)
  assert second._step is first._step
  second.run(batches())
  assert first._step._cache_size() == traces >= 1  # The summary fixture's shapes: traced.
  other = evaluation.Evaluator(model, params, gmacs, evaluation.PolicySettings(
      target_dbs=(-300.0,), confidence=0.5))
  assert other._step is not first._step
  assert evaluation.Evaluator(model, params, gmacs, policy=None)._step is not first._step


def test_calibration_counts_every_valid_block(summary):
  result, _ = summary
  # 2 batches x (a full utterance: 2 blocks of T = 2000 in 3200 samples, + a padded one whose
  # second block holds no valid sample) x 2 speakers.
  for entry in result["per_exit"]:
    calibration = entry["calibration"]
    assert calibration["blocks"] == 2 * (2 + 1) * 2
    assert 0.0 <= calibration["pit_ks"] <= 1.0
    assert np.mean(calibration["pit_histogram"]) == pytest.approx(1.0)  # A density on [0, 1].


def _outputs_with_errors_from(log_var, log_alpha, sources, rng):
  """Estimates whose block error variance is drawn from InvGamma(alpha, alpha * var)."""
  from press_jax.types import ExitOutputs

  alpha, beta = np.exp(log_alpha), np.exp(log_alpha + log_var)
  variance = beta / rng.gamma(alpha)  # (exits, batch, speakers, blocks)
  block_length = sources.shape[-1] // variance.shape[-1]
  noise = rng.standard_normal(variance.shape[:-1] + (sources.shape[-1],))
  noise *= np.repeat(np.sqrt(variance), block_length, axis=-1)
  return ExitOutputs(mean=(sources[None] + noise).astype(np.float32),
                     log_var=np.asarray(log_var, np.float32),
                     log_alpha=np.asarray(log_alpha, np.float32))


def test_block_pit_values_are_uniform_when_the_prediction_is_right():
  """Monte Carlo: errors drawn from the predicted distribution give uniform PIT values."""
  import scipy.stats

  rng = np.random.default_rng(0)
  exits, batch, speakers, blocks, block_length = 2, 32, 2, 8, 1000
  sources = rng.standard_normal((batch, speakers, blocks * block_length)).astype(np.float32)
  shape = (exits, batch, speakers, blocks)
  log_var = rng.uniform(-6.0, 0.0, shape)
  log_alpha = np.log(rng.uniform(2.0, 20.0, shape))
  mask = np.ones((batch, blocks * block_length), np.float32)
  outputs = _outputs_with_errors_from(log_var, log_alpha, sources, rng)
  values, valid = evaluation.block_pit_values(outputs, sources, mask, block_length)
  values, valid = np.asarray(values), np.asarray(valid)
  assert valid.all()
  assert scipy.stats.kstest(values.ravel(), "uniform").pvalue > 0.01
  # The same errors scored against a variance 4x too large: PIT values pile up near 0.
  values_wide, _ = evaluation.block_pit_values(
      outputs.replace(log_var=outputs.log_var + np.log(4.0)), sources, mask, block_length)
  assert scipy.stats.kstest(np.asarray(values_wide).ravel(), "uniform").statistic > 0.2


def test_block_pit_values_skip_padding():
  rng = np.random.default_rng(1)
  sources = rng.standard_normal((2, 2, 3000)).astype(np.float32)
  mask = np.ones((2, 3000), np.float32)
  mask[1, 1500:] = 0.0  # Second utterance: block 2 half valid, block 3 empty.
  shape = (1, 2, 2, 3)
  outputs = _outputs_with_errors_from(np.zeros(shape), np.log(np.full(shape, 5.0)), sources, rng)
  _, valid = evaluation.block_pit_values(outputs, sources, mask, 1000)
  np.testing.assert_array_equal(np.asarray(valid)[0, :, 0], [[True, True, True],
                                                              [True, True, False]])


def test_post_calibration_round_trip_through_the_model_directory(tmp_path):
  """fit -> store beside the parameters -> model_dir.load -> applied by the evaluator."""
  from press_jax import calibration, model_dir

  model = press_net.create("tiny")
  params = press_net.init_params(model, jax.random.key(0))
  press_net.save(str(tmp_path), model, params)
  gmacs = [c.gmac_per_s for c in compute.exit_costs(model.config)]
  policy = None  # Exits and calibration only.
  raw = evaluation.Evaluator(model, params, gmacs, policy)
  for batch in batches():
    raw.add(batch)
  statistics = raw.block_statistics()
  assert statistics["error_energy"].shape == statistics["log_alpha"].shape
  assert statistics["error_energy"].shape[0] == 2
  fitted = calibration.fit_post_calibration(
      statistics["error_energy"], statistics["count"], statistics["log_var"],
      statistics["log_alpha"], per_exit=True)
  calibration.save_post_calibration(str(tmp_path / model_dir.POST_CALIBRATION_FILE), fitted)
  loaded = model_dir.load(str(tmp_path))
  np.testing.assert_allclose(np.asarray(loaded.calibration.log_beta_scale),
                             np.asarray(fitted.log_beta_scale), rtol=1e-6)
  before = raw.summary()
  calibrated = evaluation.Evaluator(loaded.model, loaded.params, gmacs, policy,
                                    post_calibration=loaded.calibration)
  for batch in batches():
    calibrated.add(batch)
  after_statistics = calibrated.block_statistics()
  after = calibrated.summary()
  # Applied per exit: alpha' = e^a alpha, beta' = e^b beta on every block, errors untouched.
  a = np.asarray(fitted.log_alpha_scale)[:, None]
  b = np.asarray(fitted.log_beta_scale)[:, None]
  np.testing.assert_allclose(after_statistics["log_alpha"], statistics["log_alpha"] + a,
                             atol=1e-5)
  np.testing.assert_allclose(after_statistics["log_var"], statistics["log_var"] + b - a,
                             atol=1e-5)
  np.testing.assert_array_equal(after_statistics["error_energy"], statistics["error_energy"])
  for b_entry, a_entry in zip(before["per_exit"], after["per_exit"]):
    assert a_entry["si_snri_db"] == pytest.approx(b_entry["si_snri_db"], abs=1e-6)
    assert a_entry["calibration"]["crps_db"] != b_entry["calibration"]["crps_db"]
  # The fit maximises the Student-t likelihood of these blocks (scipy's inverse gamma here).
  from scipy import stats

  def mean_nll(stats_, e):
    alpha = np.exp(stats_["log_alpha"][e])
    beta = np.exp(stats_["log_alpha"][e] + stats_["log_var"][e])
    count = stats_["count"][e]
    # ||e||^2 / (T beta / alpha) ~ F(T, 2 alpha): the exact marginal of the block error energy.
    scale = count * beta / alpha
    return -np.mean(stats.f(count, 2 * alpha).logpdf(stats_["error_energy"][e] / scale)
                    - np.log(scale))

  for e in range(2):
    assert mean_nll(after_statistics, e) < mean_nll(statistics, e)


def test_policy_table_agrees_with_the_per_exit_and_dynamic_summaries(summary):
  """Static rows are the per-exit numbers (a spliced static waveform is the exit's own); the
  dynamic rows at p = 0.5 are summary['dynamic']."""
  result, gmacs = summary
  table = result["policies"]
  kinds = [row["policy"] for row in table]
  assert kinds.count("static") == 2 and kinds.count("uniform") == 1
  assert kinds.count("oracle") == 2 and kinds.count("similarity") == 2
  for row in table:
    if row["policy"] == "static":
      entry = result["per_exit"][row["exit"] - 1]
      assert row["si_snri_db"] == pytest.approx(entry["si_snri_db"], abs=1e-4)
      assert row["gmac_per_s"] == pytest.approx(gmacs[row["exit"] - 1], rel=1e-6)
      assert row["mean_exit"] == row["exit"]
      for d in result["dynamic"]:
        assert row["regret_db"][f"{d['target_db']:g}"] == pytest.approx(
            d["static_regret_db"][row["exit"] - 1], abs=1e-4)
    if row["policy"] == "dynamic" and row["confidence"] == 0.5:
      d = next(d for d in result["dynamic"] if d["target_db"] == row["target_db"])
      assert row["si_snri_db"] == pytest.approx(d["si_snri_db"], abs=1e-4)
      assert row["gmac_per_s"] == pytest.approx(d["gmac_per_s"], rel=1e-5)
      assert row["regret_db"][f"{row['target_db']:g}"] == pytest.approx(d["regret_db"], abs=1e-4)
    if row["policy"] == "oracle":
      d = next(d for d in result["dynamic"] if d["target_db"] == row["target_db"])
      assert row["gmac_per_s"] == pytest.approx(d["oracle_gmac_per_s"], rel=1e-5)
      assert row["regret_db"][f"{row['target_db']:g}"] == pytest.approx(d["oracle_regret_db"],
                                                                         abs=1e-4)
    if row["policy"] == "uniform":
      assert 1.0 < row["mean_exit"] < 2.0
