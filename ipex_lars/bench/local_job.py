"""A job of local rank processes started the way torchrun starts them, and their outputs collected.

``ipex-lars bench comm`` and the distributed tests need N processes of one
command on this machine, each told its rank through torchrun's variables and all meeting on
one free port; they all use this module. It does not import torch.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

from launchers.identity import free_port

# Variables by which a launcher (torchrun, Intel MPI, Slurm) tells a process its rank: a rank of
# a local job must see only the ones this module sets, never those of a job it runs inside.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)


@dataclass
class Ended:
    """How one process ended and what it printed."""

    rc: int | None  # None: killed at the deadline (a hang)
    out: str
    err: str


def without_launcher_vars(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` minus every launcher's rank variables."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS}


def start_ranks(
    command: list[str],
    world: int,
    env: Mapping[str, str] | None = None,
    ranks: list[int] | None = None,
    *,
    port: int | None = None,
    outputs: Callable[[int], tuple[IO, IO]] | None = None,
    new_session: bool = False,
) -> list[subprocess.Popen]:
    """Start ``ranks`` (default all) of a ``world``-rank job of ``command`` on this machine.

    Each process gets ``env`` (default: this process's environment) without any launcher's
    variables, plus torchrun's: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and one
    MASTER_ADDR:MASTER_PORT for the job (``port``, default one the kernel reports free).
    Output is piped, as text, unless ``outputs(rank)`` gives the (stdout, stderr) files to
    write to; ``new_session`` starts each rank in a session of its own, so that its whole
    process group can be signalled.
    """
    base = without_launcher_vars(os.environ if env is None else env)
    port = str(port or free_port())
    procs = []
    for rank in range(world) if ranks is None else ranks:
        rank_env = {
            **base,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        out, err = outputs(rank) if outputs else (subprocess.PIPE, subprocess.PIPE)
        procs.append(
            subprocess.Popen(command, env=rank_env, text=True, stdout=out, stderr=err, start_new_session=new_session)
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[Ended]:
    """Wait for every process, for ``timeout`` seconds in all; kill those still running then."""
    deadline = time.monotonic() + timeout
    ended = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            ended.append(Ended(p.returncode, out, err))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            ended.append(Ended(None, out, err))
    return ended
