"""Launch real rank processes the way torchrun and Intel MPI do, and collect what each printed."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from launchers.identity import free_port

WORKERS = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_PROCID", "SLURM_NTASKS")


@dataclass
class Rank:
    rc: int | None  # None: killed at the harness timeout (a hang)
    out: str
    err: str


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, with threads capped to one per rank."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("CCL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", IPEX_LARS_DIST_TIMEOUT="30", **extra)
    return env


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[Rank]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
            results.append(Rank(p.returncode, out, err))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            results.append(Rank(None, out, err))
    return results


def torchrun_style(script: str, args: list[str], world: int, ranks: list[int] | None = None,
                   timeout: float = 120, **extra: str) -> list[Rank]:
    """Start `ranks` (default all) of a `world`-rank job with torchrun's variables; one Rank per process."""
    return torchrun_command([sys.executable, str(WORKERS / script), *args], world, ranks, timeout, **extra)


def torchrun_command(command: list[str], world: int, ranks: list[int] | None = None, timeout: float = 120,
                     **extra: str) -> list[Rank]:
    """Start `command` as `ranks` (default all) of a `world`-rank job with torchrun's variables."""
    port = str(free_port())
    procs = []
    for r in range(world) if ranks is None else ranks:
        env = base_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        procs.append(subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return _finish(procs, timeout)


def single(script: str, args: list[str], timeout: float = 120, **extra: str) -> Rank:
    """Run the script as a plain single process, with no launcher variables."""
    proc = subprocess.Popen([sys.executable, str(WORKERS / script), *args], env=base_env(**extra), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _finish([proc], timeout)[0]


def mpiexec(script: str, args: list[str], world: int, timeout: float = 120, **extra: str) -> Rank:
    """Run the script under Intel MPI's mpiexec; one Rank for the whole job (outputs interleave)."""
    env = base_env(**extra)
    env["PATH"] = f"{MPIEXEC.parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen([str(MPIEXEC), "-n", str(world), sys.executable, str(WORKERS / script), *args],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _finish([proc], timeout)[0]


def describe(results: list[Rank]) -> str:
    return "\n".join(f"--- rank {i}: rc={r.rc}\n{r.out[-3000:]}\n{r.err[-3000:]}" for i, r in enumerate(results))


@pytest.fixture(scope="session")
def oneccl_built() -> None:
    """Build the backend once, before any rank starts, so ranks never queue on the build lock."""
    from ipex_lars import ext
    from ipex_lars.distributed import backend

    reason = backend.unavailable_reason()
    if reason:
        pytest.skip(reason)
    ext.build(backend.SPEC)
