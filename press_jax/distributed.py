"""Multi-host start-up: jax.distributed.initialize from flags, the JAX_* variables or SLURM."""

from __future__ import annotations

import os

import jax

# What jax.distributed.initialize() reads to join a SLURM job step without arguments
# (jax/_src/clusters/slurm_cluster.py): the coordinator is the step's first node, on a port
# derived from the job id; the process count and id are the task count and rank; the local id
# picks the process's GPU. srun sets all of them in every task.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def slurm_process_count() -> int | None:
  """The task count of the SLURM job step this process belongs to; None outside one."""
  if not all(name in os.environ for name in SLURM_VARIABLES):
    return None
  return int(os.environ["SLURM_NTASKS"])


def initialize_from_flags_or_environment(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Join a multi-process run; returns True if one was joined, False for a single process.

  In order:
  1. explicit arguments, else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID;
  2. PRESS_AUTO_DISTRIBUTED=1: jax.distributed.initialize() with no arguments, JAX detecting
     the cluster itself (TPU pods, SLURM, Open MPI);
  3. a SLURM job step of more than one task (`srun`, or a submitit SLURM job; see
     SLURM_VARIABLES): jax.distributed.initialize() with no arguments, which reads SLURM's
     variables. PRESS_AUTO_DISTRIBUTED=0 turns this detection off.
  Otherwise nothing is done (one process, local devices only).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address is None:
    automatic = os.environ.get("PRESS_AUTO_DISTRIBUTED")
    if automatic == "1":
      jax.distributed.initialize()
      return True
    if num_processes not in (None, 1):
      raise ValueError(f"distributed: num_processes={num_processes} needs a coordinator "
                       "address (--coordinator-address or JAX_COORDINATOR_ADDRESS)")
    if num_processes is None and automatic != "0" and (slurm_process_count() or 1) > 1:
      jax.distributed.initialize()  # Coordinator, process count and id from SLURM.
      return True
    return False
  if num_processes is None or process_id is None:
    raise ValueError("distributed: with a coordinator address, both num_processes and "
                     "process_id are needed (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"distributed: process_id {process_id} is outside [0, {num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True
