"""Multi-host start-up: jax.distributed.initialize from flags or the standard environment."""

from __future__ import annotations

import os

import jax


def initialize_from_flags_or_environment(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Join a multi-process run; returns True if one was joined, False for a single process.

  Explicit arguments win; otherwise JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID are read. With neither, nothing is done (one process, local devices only).
  On TPU pods and SLURM/Open MPI clusters, set PRESS_AUTO_DISTRIBUTED=1 to let JAX detect the
  cluster itself.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address is None:
    if os.environ.get("PRESS_AUTO_DISTRIBUTED") == "1":
      jax.distributed.initialize()
      return True
    if num_processes not in (None, 1):
      raise ValueError(f"distributed: num_processes={num_processes} needs a coordinator "
                       "address (--coordinator-address or JAX_COORDINATOR_ADDRESS)")
    return False
  if num_processes is None or process_id is None:
    raise ValueError("distributed: with a coordinator address, both num_processes and "
                     "process_id are needed (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"distributed: process_id {process_id} is outside [0, {num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True
