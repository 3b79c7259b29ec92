"""The one evaluator on 2 processes x 2 CPU devices equals one process on the same data.

Both processes run press_jax.evaluation.Evaluator (tests/train_worker.py, mode evaluate) on
their own half of every global batch of 4 (jax.distributed on localhost, gloo collectives);
the reference is one process with 4 devices fed the same global batches. Two splits whose size
does not divide the global batch: 5 utterances (a full batch, then one holding 1: process 1's
rows are all filler) and 3 (one batch, its last slot, on process 1, filler). Filler slots hold
garbage with a full sample mask: only example_mask marks them. SDRi included (numpy on each
host, gathered): ~1 s per utterance here, hence the small splits.

Tolerances: counts (utterances, blocks, exit histograms) exactly; the per-utterance and
per-block arrays to 1e-6 (the same per-device program on the same rows); every other number of
the summary to 1e-5 dB (or relative 1e-6): sums in float32 over devices reduced in a different
order (psum within one process vs across processes), then in float64 on the host.
"""

import json

import numpy as np
import pytest

from tests import worker_util

SPLITS = (5, 3)
GLOBAL_BATCH = 4
POLICY = {"target_dbs": [-5.0, 0.0], "confidences": [0.5], "confidence": 0.7,
          "similarity_dbs": [10.0]}


def spec_for(directory, name, **extra):
  return {"splits": list(SPLITS), "global_batch": GLOBAL_BATCH, "policy": POLICY,
          "out": str(directory / f"{name}_"), **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  directory = tmp_path_factory.mktemp("multihost_evaluation")
  address = f"localhost:{worker_util.free_port()}"
  processes, logs = [], []
  for process_id in range(2):
    spec = spec_for(directory, "multi", result=str(directory / "multi_result.json"),
                    distributed={"coordinator_address": address, "num_processes": 2,
                                 "process_id": process_id})
    logs.append(str(directory / f"process{process_id}.log"))
    processes.append(worker_util.start_worker(
        "evaluate", spec, str(directory / f"spec{process_id}.json"), devices=2,
        log_path=logs[-1]))
  worker_util.wait_for_workers(processes, logs, timeout=300, what="multi-host evaluation workers")
  multi = []
  for process_id in range(2):
    with open(directory / f"multi_result.process{process_id}.json") as handle:
      multi.append(json.load(handle)["result"])
  single = worker_util.run_worker("evaluate", spec_for(directory, "single"), str(directory),
                                  devices=4, name="single")["result"]
  arrays = {name: {size: worker_util.load_tree(str(directory / f"{name}_{size}_process0.npz"))
                   for size in SPLITS} for name in ("multi", "single")}
  arrays["multi1"] = {size: worker_util.load_tree(str(directory / f"multi_{size}_process1.npz"))
                      for size in SPLITS}
  return {"multi": multi, "single": single, "arrays": arrays}


def numbers(tree, path=()):
  """{path: value} of every number of a summary (bools and strings compared as they are)."""
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in numbers(value, path + (key,)).items()}
  if isinstance(tree, list):
    return {k: v for i, value in enumerate(tree) for k, v in numbers(value, path + (i,)).items()}
  return {path: tree}


COUNTS = ("utterances", "blocks", "exit_histogram", "exit")


def assert_summaries_match(actual, expected):
  actual, expected = numbers(actual), numbers(expected)
  assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected), key=str)
  for path, value in expected.items():
    if value is None or isinstance(value, str) or any(c in path for c in COUNTS):
      assert actual[path] == value, path
    else:
      assert actual[path] == pytest.approx(value, rel=1e-6, abs=1e-5), path


def test_processes_joined_one_mesh(runs):
  for process_id, result in enumerate(runs["multi"]):
    assert result["joined_distributed"] and result["process_index"] == process_id
    assert result["process_count"] == 2
    assert result["local_devices"] == 2 and result["global_devices"] == 4
  assert runs["single"]["process_count"] == 1 and runs["single"]["global_devices"] == 4


def test_every_process_writes_the_summary_of_the_whole_split(runs):
  for size in SPLITS:
    first, second = (r["summaries"][str(size)] for r in runs["multi"])
    assert json.dumps(first) == json.dumps(second)  # Bit for bit: the same global sums.
    assert first["utterances"] == size  # Not process 0's slice; filler slots not counted.
    assert len(runs["arrays"]["multi"][size]["utterance.si_snri"]) == size


def test_two_processes_match_one_process(runs):
  for size in SPLITS:
    assert_summaries_match(runs["multi"][0]["summaries"][str(size)],
                           runs["single"]["summaries"][str(size)])


def test_gathered_rows_are_the_global_rows_in_order(runs):
  for size in SPLITS:
    single, multi = runs["arrays"]["single"][size], runs["arrays"]["multi"][size]
    assert single.keys() == multi.keys()
    np.testing.assert_array_equal(multi["utterance.slot"], single["utterance.slot"])
    for name in single:
      np.testing.assert_allclose(multi[name], single[name], rtol=1e-6, atol=1e-6, err_msg=name)
      np.testing.assert_array_equal(runs["arrays"]["multi1"][size][name], multi[name])
    # The valid slots of the split: 0 .. size-1 (filler slots are the last batch's tail).
    np.testing.assert_array_equal(single["utterance.slot"], np.arange(size))


def test_summary_means_are_the_means_of_the_gathered_rows(runs):
  """psum-ed sums (the summary) against plain numpy means of the gathered per-utterance rows."""
  for size in SPLITS:
    summary = runs["multi"][0]["summaries"][str(size)]
    rows = runs["arrays"]["multi"][size]
    for e, entry in enumerate(summary["per_exit"]):
      assert entry["si_snri_db"] == pytest.approx(np.mean(rows["utterance.si_snri"][:, e],
                                                          dtype=np.float64), abs=1e-5)
      assert entry["sdri_db"] == pytest.approx(np.mean(rows["utterance.sdri"][:, e]), abs=1e-9)
    blocks = rows["utterance.blocks"].astype(np.float64)
    for r, row in enumerate(summary["policies"]):
      cost = np.sum(rows["utterance.policy_cost"][:, r] * blocks) / blocks.sum()
      assert row["gmac_per_s"] == pytest.approx(cost, rel=1e-6)
      for t, key in enumerate(row["regret_db"]):
        regret = np.sum(rows["utterance.policy_regret"][:, r, t] * blocks) / blocks.sum()
        assert row["regret_db"][key] == pytest.approx(regret, rel=1e-6, abs=1e-6)
