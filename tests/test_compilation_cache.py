"""press_jax.compilation_cache: where the command-line entry points cache compiled programs."""

import os
import subprocess
import sys

import jax

from press_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("from press_jax import compilation_cache; import jax; "
         "print(compilation_cache.enable()); print(jax.config.jax_compilation_cache_dir); "
         "print(jax.config.jax_compilation_cache_max_size)")


def run_probe(tmp_path, **environment):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", compilation_cache.ENVIRONMENT_VARIABLE)}
  env.update(environment, PYTHONPATH=REPO, XDG_CACHE_HOME=str(tmp_path / "xdg"))
  output = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, check=True).stdout.split()
  return output


def test_a_configured_cache_is_kept():
  before = jax.config.jax_compilation_cache_dir  # The test session's (tests/conftest.py).
  assert before and compilation_cache.enable() == before
  assert jax.config.jax_compilation_cache_dir == before


def test_default_directory_variable_and_off(tmp_path):
  enabled, configured, size = run_probe(tmp_path)
  assert enabled == configured == str(tmp_path / "xdg" / "press_jax" / "xla")
  assert os.path.isdir(enabled) and int(size) == compilation_cache.MAX_BYTES
  chosen = str(tmp_path / "chosen")
  assert run_probe(tmp_path, PRESS_JAX_XLA_CACHE=chosen)[:2] == [chosen, chosen]
  assert run_probe(tmp_path, PRESS_JAX_XLA_CACHE="off")[:2] == ["None", "None"]
  blocked = tmp_path / "a_file"
  blocked.write_text("")
  assert run_probe(tmp_path, PRESS_JAX_XLA_CACHE=str(blocked / "xla"))[:2] == ["None", "None"]
  # JAX's own variable wins: the cache is left where the user put it.
  own = str(tmp_path / "own")
  assert run_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=own)[:2] == [own, own]
