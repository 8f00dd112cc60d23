"""Multi-host start-up: join the processes of one training job before JAX touches a device.

On a Cloud TPU pod slice and on SLURM or Open MPI GPU clusters the environment says who is
who, and `jax.distributed.initialize()` reads it; elsewhere pass --coordinator_address,
--num_processes and --process_id to every process. A single process needs nothing.
"""

from __future__ import annotations

import glob
import os

import jax
from absl import flags

from llm.errors import ConfigError


def define_flags() -> None:
    """--coordinator_address, --num_processes, --process_id: for an entry point's __main__."""
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0, for a multi-process run without a cluster manager.",
    )
    flags.DEFINE_integer(
        "num_processes", None, "Processes in the job (with --coordinator_address)."
    )
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def cluster_detected() -> bool:
    """Whether a cluster manager that `jax.distributed.initialize()` reads started several processes."""
    env = os.environ
    slurm = "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
    open_mpi = "OMPI_MCA_orte_hnp_uri" in env or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    tpu_vm = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))  # Cloud TPU VM
    return slurm or open_mpi or tpu_vm


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the job's processes (arguments default to the flags of `define_flags`, where an
    entry point defined them); a no-op for a single process."""
    coordinator_address = coordinator_address or _flag("coordinator_address")
    num_processes = num_processes if num_processes is not None else _flag("num_processes")
    process_id = process_id if process_id is not None else _flag("process_id")
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ConfigError(
                "multi-process flags: pass all of --coordinator_address=HOST:PORT, "
                "--num_processes=N and --process_id=I (0 on the coordinator), or none."
            )
        if num_processes == 1:
            return
        # CPU processes exchange collectives over gloo (GPU uses NCCL, TPU its own links).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif cluster_detected():
        jax.distributed.initialize()


def _flag(name: str):
    """The flag's value where it is defined and parsed, else None."""
    return flags.FLAGS[name].value if name in flags.FLAGS and flags.FLAGS.is_parsed() else None
