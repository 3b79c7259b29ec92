"""press_jax.allocator: what configure() reports, and that its settings remove page faults.

Each case runs in a fresh interpreter: glibc's settings are per process and one-way.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A (20006, 64) x (64, 768) matmul writes a 61 MB output per call: with glibc's defaults that is
# a fresh mmap each time, one page fault per 4 KiB page (README, "Speed"). Minor faults are
# counted by the kernel (getrusage), not timed.
_FAULTS = """
import json, resource, sys
from press_jax import allocator
mode = sys.argv[1]  # 'default', 'configure', or 'fit:BYTES' (configure, then fit_program)
state = "untouched" if mode == "default" else allocator.configure()
mapped = again = None
if mode.startswith("fit:"):  # Before the first large output, as the trainer reports.
  mapped = allocator.fit_program(int(mode[4:]))
  again = allocator.fit_program(0)
import jax, jax.numpy as jnp, numpy as np
a = jnp.ones((20006, 64), jnp.float32); b = jnp.ones((64, 768), jnp.float32)
f = jax.jit(lambda a, b: a @ b)
for _ in range(3):
  jax.block_until_ready(f(a, b))
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = f(a, b); jax.block_until_ready(out)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The fewest of 10 calls: a loaded machine adds faults of its own to some calls (reclaimed
# pages), but glibc's defaults fault the whole output on every one.
print(json.dumps({"state": state, "faults_per_call": min(faults), "value": float(out[0, 0]),
                  "mapped": mapped, "again": again}))
"""


def _run(code: str, *args: str, **environment: str) -> dict:
  env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
  env.pop("PRESS_JAX_MALLOC", None)
  env.update(JAX_PLATFORMS="cpu", **environment)
  done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, timeout=240, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


_STATE = ("import json; from press_jax import allocator; "
          "print(json.dumps({'state': allocator.configure(), 'again': allocator.configure()}))")


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's; elsewhere configure() does nothing")
def test_configure_sets_mallopt_once():
  assert _run(_STATE) == {"state": "mallopt", "again": "mallopt"}


@pytest.mark.parametrize("environment, expected", [
    ({"PRESS_JAX_MALLOC": "off"}, "off"),
    ({"MALLOC_ARENA_MAX": "2"}, "environment"),  # The user's own setting wins.
])
def test_configure_respects_the_environment(environment, expected):
  assert _run(_STATE, **environment)["state"] == expected


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's; elsewhere configure() does nothing")
def test_configure_removes_most_page_faults_of_large_outputs():
  default = _run(_FAULTS, "default")
  configured = _run(_FAULTS, "configure")
  assert configured["state"] == "mallopt"
  assert default["value"] == configured["value"] == 64.0
  # Defaults: 15,000 faults in the fewest-faulting call (the 61 MB output, mapped afresh);
  # configured: 0 in session 19's runs, two beside each other. The default must show the
  # problem at all.
  assert default["faults_per_call"] > 10_000, default
  assert configured["faults_per_call"] < 0.25 * default["faults_per_call"], (default, configured)


@pytest.mark.skipif(not ON_GLIBC, reason="MALLOC_* variables are glibc's")
def test_environment_settings_remove_page_faults_too():
  """allocator.ENVIRONMENT, set before the process starts (what the README recommends)."""
  from press_jax import allocator
  default = _run(_FAULTS, "default")
  configured = _run(_FAULTS, "default", **allocator.ENVIRONMENT)
  assert default["value"] == configured["value"] == 64.0
  assert configured["faults_per_call"] < 0.25 * default["faults_per_call"], (default, configured)


def test_environment_settings_are_the_malloc_variables():
  from press_jax import allocator
  assert allocator.environment_settings({"MALLOC_ARENA_MAX": "1", "PATH": "/bin"}) == {
      "MALLOC_ARENA_MAX": "1"}


# fit_program in a fresh process, before the first large output (`_FAULTS` 'fit:BYTES'): with
# a reported size at TRIM_THRESHOLD nothing changes and the 61 MB output stays on the heap (few
# faults); above it, blocks of 32 MiB and more are mapped per call again (glibc serves a block
# from free heap memory first, so the report comes before the program runs, as the trainer's).
@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's; elsewhere configure() does nothing")
def test_fit_program_maps_large_blocks_again_above_the_trim_threshold():
  from press_jax import allocator
  default = _run(_FAULTS, "default")
  at = _run(_FAULTS, f"fit:{allocator.TRIM_THRESHOLD}")
  above = _run(_FAULTS, f"fit:{allocator.TRIM_THRESHOLD + 1}")
  assert at["state"] == above["state"] == "mallopt"
  assert (at["mapped"], at["again"], above["mapped"], above["again"]) == (
      False, False, True, True)
  assert default["value"] == at["value"] == above["value"] == 64.0
  assert default["faults_per_call"] > 10_000, default
  assert at["faults_per_call"] < 0.25 * default["faults_per_call"], (default, at)
  # The 61 MB output is above MMAP_THRESHOLD (32 MiB): mapped afresh, as glibc's defaults do.
  assert above["faults_per_call"] > 0.5 * default["faults_per_call"], (default, above)


_FIT_STATE = ("import json; from press_jax import allocator; s = allocator.configure(); "
              "print(json.dumps({'state': s, 'mapped': allocator.fit_program(2**33)}))")


@pytest.mark.skipif(not ON_GLIBC, reason="MALLOC_* variables are glibc's")
@pytest.mark.parametrize("environment, expected", [
    ({"PRESS_JAX_MALLOC": "off"}, {"state": "off", "mapped": False}),
    ({"MALLOC_ARENA_MAX": "2"}, {"state": "environment", "mapped": False}),  # The user's own.
    ("ours", {"state": "environment", "mapped": True}),  # allocator.ENVIRONMENT before start.
])
def test_fit_program_acts_on_this_modules_settings_only(environment, expected):
  from press_jax import allocator
  environment = dict(allocator.ENVIRONMENT) if environment == "ours" else environment
  assert _run(_FIT_STATE, **environment) == expected


def test_fit_program_refuses_a_negative_size():
  from press_jax import allocator
  with pytest.raises(ValueError, match="temp_bytes must be >= 0"):
    allocator.fit_program(-1)


def test_the_trainer_reports_its_compiled_steps_temporary_buffer(tmp_path, monkeypatch):
  """press_jax.train passes the step's temporary-buffer size to fit_program once, before the
  first step, and that first call reuses the compilation (one compiled step)."""
  from press_jax import optim
  from press_jax import train as train_lib
  from tests import mock_data
  from tests.model_util import SMALL

  reported, built = [], []
  original = train_lib.step_lib.parallel_train_step

  def parallel_train_step(*args, **kwargs):
    built.append(original(*args, **kwargs))
    return built[-1]
  monkeypatch.setattr(train_lib.allocator, "fit_program",
                      lambda temp_bytes: reported.append(temp_bytes) or False)
  monkeypatch.setattr(train_lib.step_lib, "parallel_train_step", parallel_train_step)
  config = train_lib.TrainConfig(
      model="tiny", model_overrides=dict(SMALL), steps=3, log_every=1, eval_every=0,
      checkpoint_every=3, batch_size_per_device=2,
      optimizer=optim.OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=1, total_steps=3))
  result = train_lib.train(config, str(tmp_path / "run"), mock_data.MockIterator(1, 2, 2000))
  assert [row["step"] for row in result.history if "loss" in row] == [1, 2, 3]
  assert len(reported) == 1 and isinstance(reported[0], int) and reported[0] > 0, reported
  assert len(built) == 1 and built[0]._cache_size() == 1


def test_the_evaluator_fits_each_batch_shape_once_and_compiles_once(monkeypatch):
  """press_jax.evaluation passes its step's temporary-buffer size to fit_program at each new
  batch shape, and that compilation is the one the step then runs: one backend compilation per
  shape (jax.monitoring's compile events), none for a repeated shape."""
  import jax
  import numpy as np
  from press_jax import evaluation
  from press_jax.models import press_net
  from tests.model_util import SMALL

  reported, compiles = [], []
  monkeypatch.setattr(evaluation.allocator, "fit_program",
                      lambda temp_bytes: reported.append(temp_bytes) or False)
  model = press_net.create("tiny", **SMALL)
  params = press_net.init_params(model, jax.random.key(0))
  evaluator = evaluation.Evaluator(model, params, policy=None, with_calibration=False)
  rng = np.random.default_rng(0)

  def batch(samples):
    sources = rng.standard_normal((2, 2, samples)).astype(np.float32) * 0.1
    return {"mixture": sources.sum(1), "sources": sources,
            "mask": np.ones((2, samples), np.float32)}

  def listener(event, duration, fun_name="", **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(fun_name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    evaluator.run([batch(2000), batch(2000), batch(3000)])
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(reported) == 2 and all(isinstance(b, int) and b > 0 for b in reported), reported
  # Two shapes of the evaluation step, each compiled once: fit_jitted's compilation is the one
  # the step runs (a separate one would make four). Nothing else compiles in this run.
  assert evaluator._step._cache_size() == 2
  assert len(compiles) == 2, compiles
