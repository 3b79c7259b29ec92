"""Pytest options: slow end-to-end tests run with --run-slow (CI runs their reduced variants)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compilation dominates the in-process tests as it does the workers' (tests/worker_util.py):
# compile with the workers' flags (worker_util.TEST_XLA_FLAGS; PRESS_JAX_TEST_XLA_OPTIMIZE=1 for
# XLA's defaults) and share the session's persistent compilation cache, so programs rebuilt by
# later tests are reused.
from tests import worker_util  # noqa: E402  (stdlib and numpy only: JAX is not imported yet)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                           + worker_util.TEST_XLA_FLAGS).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", worker_util.XLA_CACHE_DIR)
# Command-line runs started by tests (press-separate, the main job) use it too, never the
# user's cache (press_jax/compilation_cache.py keeps a configured cache).
os.environ["JAX_COMPILATION_CACHE_DIR"] = worker_util.XLA_CACHE_DIR
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run tests marked slow (full-size end-to-end runs)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow"):
    return
  skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (make test-all)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)
