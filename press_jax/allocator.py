"""glibc malloc settings that keep XLA:CPU's large buffers off the page-fault path.

XLA:CPU allocates every output buffer with the C allocator. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh `mmap` and gives them back with `munmap` when freed,
and it returns the top of its heaps to the system past `M_TRIM_THRESHOLD`: so a program that
writes large arrays touches new pages on every call, one minor page fault per 4 KiB, and the
kernel's zeroing of those pages shows as system time. Measured on this project's 2-core CPU
(2026-12-07, session 19; README "Speed"): a (20006, 64) x (64, 768) matmul took 33 ms per call
with 18,900 page faults and 39 ms of system time, with the settings below 11-18 ms and 0-5,700
faults; the S preset's forward pass on 5 s of audio 2.31 s with 780,000 faults per call,
against 1.61 s with 15,000; `bench_dynamic --speed-config S` (10 s at S's last exit, 4 s
chunks) 6.92 s against 5.34 s, peak RSS streaming 10 s -> 600 s 653 -> 770 MB against 612 ->
641 MB; S's training step (`bench_step --config S`) 7.24 s against 6.35 s; the demo's
(`bench_step --config demo`, 4 alternating pairs) 82-108 ms against 71-76 ms.

The settings: no mmap for any block (`M_MMAP_MAX = 0`), no trimming of the heap's top
(`M_TRIM_THRESHOLD`), one arena (`M_ARENA_MAX = 1`: XLA's worker threads otherwise get arenas
of their own, whose heaps are mmap-backed and shrink when freed). Freed memory then stays in
the process for the next call: the peak resident memory is the program's high-water mark, as
before, but it is not given back between calls.

Two ways to apply them, measured alike (tests/test_allocator.py's matmul in fresh processes,
the fewest faults of 10 calls: 15,000 with glibc's defaults, 0 with either; averaged over the
10 calls a loaded machine adds faults of its own to some calls):
- `configure()` at run time (`mallopt`), which the command-line entry points, the main job and
  the benchmarks call before their first computation; a script of one's own can call it too;
- the environment before the process starts (`ENVIRONMENT`, read by glibc once, at start-up),
  for a process that calls neither.

`PRESS_JAX_MALLOC=off` leaves the allocator as it is; so does any `MALLOC_*` variable already
set (the user's choice wins). Not glibc (macOS, musl): nothing is done. Accelerators are
unaffected: their buffers are not host allocations.

**Programs with a multi-GiB temporary buffer** (`fit_program`). XLA:CPU gives each execution of
a program one temporary buffer. Above `TRIM_THRESHOLD` (2 GiB - 1, the largest value mallopt
takes), the heap-only settings fail: a freed top block that large is trimmed, so its pages fault
again on the next call, and a freed one that is not at the top is split by the next small
allocations, so the next execution's buffer goes on top of the heap and the heap grows by one
buffer at a time. Measured (2026-12-08, session 25): the S preset's training step with 2 s
crops and no remat (a 4.54 GiB temporary buffer) in the trainer
(`python -m experiments.budget_probe --config S --config.data.crop_seconds=2.0
--config.train.remat=False ...`) grew to 22.8 GiB and was killed by the kernel's OOM killer
within 2.5 minutes at 0.13 steps/s, against a flat 6.0 GiB and 0.25 steps/s with glibc's defaults;
with remat and 4 s crops (1.54 GiB) the heap stayed at 7.4 GiB. So a caller that compiled a
program passes its temporary size to `fit_program`, which, above `TRIM_THRESHOLD`, maps blocks
of `MMAP_THRESHOLD` (32 MiB, glibc's largest) and more again: the large buffer is mapped and
unmapped per call as with glibc's defaults, the small ones stay on the heap. `fit_jitted` does
this for a jitted function and its arguments: the trainer for its step (press_jax/train.py) and
the evaluator for its step at each new batch shape (press_jax/evaluation.py: the M preset's
forward pass on 4 x 8 s, the default configs' longest evaluation bucket, has a 2.35 GiB
temporary buffer; S's 1.42 GiB, and 5.41 GiB on 4 x 30 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

SWITCH = "PRESS_JAX_MALLOC"
_OFF = ("off", "0", "false", "none", "no")
# The same settings as environment variables, for a process that has not started yet.
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000",
               "MALLOC_ARENA_MAX": "1"}
# mallopt parameters (glibc's malloc.h) and the values `configure` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # The largest value mallopt takes (an int).
_SETTINGS = ((_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1))
# What `fit_program` sets for a program whose temporary buffer exceeds TRIM_THRESHOLD: blocks
# from glibc's largest mmap threshold on 64-bit (32 MiB) are mapped again; glibc's default count.
MMAP_THRESHOLD = 32 * 2**20
_LARGE_PROGRAM_SETTINGS = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_MMAP_MAX, 65536))

_state: str | None = None
_large_blocks_mapped = False


def environment_settings(environ=None) -> dict[str, str]:
  """The `MALLOC_*` variables of `environ` (default `os.environ`) that glibc reads."""
  environ = os.environ if environ is None else environ
  return {key: value for key, value in environ.items() if key.startswith("MALLOC_")}


def configure() -> str:
  """Applies the settings once per process; returns what is in effect.

  'environment' (the process started with `MALLOC_*` variables: left as they are), 'mallopt'
  (set now), 'off' (`PRESS_JAX_MALLOC=off`), 'unavailable' (not glibc, or mallopt refused).
  Idempotent: later calls return the first call's answer.
  """
  global _state
  if _state is not None:
    return _state
  if os.environ.get(SWITCH, "").strip().lower() in _OFF and os.environ.get(SWITCH):
    _state = "off"
  elif environment_settings():
    _state = "environment"
  elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    _state = "unavailable"
  else:
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
      _state = "mallopt" if _mallopt(_SETTINGS) else "unavailable"
    except (OSError, AttributeError):
      _state = "unavailable"
  return _state


def _mallopt(settings) -> bool:
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  return all([libc.mallopt(parameter, value) == 1 for parameter, value in settings])


def fit_program(temp_bytes: int) -> bool:
  """Maps large blocks again if a program's temporary buffer exceeds TRIM_THRESHOLD bytes.

  `temp_bytes`: `compiled.memory_analysis().temp_size_in_bytes` of a program this process runs
  repeatedly (the trainer's step). Acts only on the settings of this module (`configure`'s
  mallopt, or `ENVIRONMENT` set before start-up), never on a user's own `MALLOC_*` choice or
  with `PRESS_JAX_MALLOC=off`. Returns whether large blocks are mapped (now or by an earlier
  call); once mapped they stay so for the process.
  """
  global _large_blocks_mapped
  if temp_bytes < 0:
    raise ValueError(f"allocator.fit_program: temp_bytes must be >= 0, got {temp_bytes}")
  ours = _state == "mallopt" or (_state in (None, "environment")
                                 and environment_settings() == ENVIRONMENT)
  if not _large_blocks_mapped and ours and temp_bytes > TRIM_THRESHOLD:
    try:
      _large_blocks_mapped = _mallopt(_LARGE_PROGRAM_SETTINGS)
    except (OSError, AttributeError):
      pass
  return _large_blocks_mapped


def fit_jitted(jitted, *arguments) -> tuple[int, bool]:
  """Compiles `jitted` for `arguments` and passes its temporary-buffer size to `fit_program`.

  Returns (that size in bytes, whether large blocks are now mapped); (0, False) off the CPU or
  where XLA reports no size. The compilation is JAX's cached one: the next call of `jitted` with
  arguments of the same shapes reuses it (tests/test_allocator.py).
  """
  import jax  # pylint: disable=import-outside-toplevel (this module is read before jax starts)

  if jax.default_backend() != "cpu":
    return 0, False  # Device buffers are not host allocations.
  analysis = jitted.lower(*arguments).compile().memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None)
  if temp is None:
    return 0, False
  return int(temp), fit_program(int(temp))


def large_blocks_mapped() -> bool:
  """Whether `fit_program` has mapped large blocks in this process (then they stay mapped)."""
  return _large_blocks_mapped
