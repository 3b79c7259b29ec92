"""A persistent XLA compilation cache for the command-line entry points.

`press-separate`, `press-export` and the experiments' main job, `experiments.evaluate` and
`experiments.calibrate` call `enable()` before they compile: a second run of the same command on
the same machine loads its programs from disk instead of compiling them again (press-separate
on the demo model: 5.1 s of its ~9.7 s were compiling). JAX keys every entry on the program,
the JAX/XLA versions, the flags and the device, so a changed model or library never reads a
stale entry (https://docs.jax.dev/en/latest/persistent_compilation_cache.html).

Where: `$PRESS_JAX_XLA_CACHE` if set (`off` turns the cache off), else
`$XDG_CACHE_HOME/press_jax/xla` (`~/.cache/press_jax/xla`), capped at `MAX_BYTES` (JAX evicts the
least recently used). A cache
configured already (`JAX_COMPILATION_CACHE_DIR`, or `jax.config` set by the caller, as the test
suite does) is kept. Benchmarks that time compilation never call this.
"""

from __future__ import annotations

import os

ENVIRONMENT_VARIABLE = "PRESS_JAX_XLA_CACHE"
MAX_BYTES = 2 * 2**30
_OFF = ("off", "0", "false", "none", "no")


def default_directory() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "press_jax", "xla")


def enable(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None: off).

  `directory` overrides `$PRESS_JAX_XLA_CACHE` and the default. A directory that cannot be
  created leaves the cache off (the run compiles as without it).
  """
  import jax

  setting = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
  if directory is None and setting.lower() in _OFF and setting:
    return None
  configured = jax.config.jax_compilation_cache_dir
  if configured and directory is None:
    return configured
  directory = directory or setting or default_directory()
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  if jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return directory
