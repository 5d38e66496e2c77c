"""Which job this is and which port its ranks meet on, so that two jobs on one machine never meet.

A fixed default port (29500) let a second job's ranks join the first job's store. Now every
launch gets a job id, passed to the ranks as ``IPEX_LARS_JOB_ID`` (the ranks refuse a store of
another job, see ``ipex_lars.distributed.rendezvous``), and a port nobody else uses:

- one ``lars-run`` for the whole job (local machine, mpi, slurm, single-node torchrun-env): a fresh
  id, and a port the kernel says is free on the master address when it is this machine;
- ``torchrun-env`` on several nodes, where each node runs its own ``lars-run``: id and port are
  derived from what every node is given (hosts, master address, program), so all nodes agree.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid

PORT_RANGE = (20000, 60000)  # derived ports: above the usual services, below the ephemeral range


def job_id(given: str | None, shared_inputs: list[str] | None) -> str:
    """``given`` (``--job-id`` or ``IPEX_LARS_JOB_ID``), else derived from ``shared_inputs`` when every
    node computes it itself, else a fresh random id."""
    if given:
        return given
    if shared_inputs is not None:
        return "job-" + hashlib.sha256("\0".join(shared_inputs).encode()).hexdigest()[:12]
    return "job-" + uuid.uuid4().hex[:12]


def free_port(addr: str = "127.0.0.1") -> int | None:
    """A port the kernel reports free on ``addr``, or None when ``addr`` is not this machine's."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
            return s.getsockname()[1]
    except OSError:
        return None


def master_port(given: int | None, master_addr: str, job: str, derive: bool) -> tuple[int, str]:
    """The rendezvous port and one line saying how it was chosen."""
    if given is not None:
        return given, f"master port {given} (as given)"
    port = None if derive else free_port(master_addr)
    if port is not None:
        return port, f"master port {port}: free on {master_addr} when chosen (set --master-port to fix one)"
    lo, hi = PORT_RANGE
    port = lo + int(hashlib.sha256(job.encode()).hexdigest(), 16) % (hi - lo)
    return port, (
        f"master port {port}: derived from job id {job} (the master {master_addr} is not this "
        "machine, or every node chooses it alike); set --master-port if it is taken"
    )


def default_job_id() -> str | None:
    """The job id the environment already names, if any."""
    return os.environ.get("IPEX_LARS_JOB_ID") or None
