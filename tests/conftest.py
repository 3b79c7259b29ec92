"""Pytest options: slow end-to-end tests run with --run-slow (CI runs their reduced variants)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


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
