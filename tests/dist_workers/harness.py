"""Launch real rank processes the way torchrun and Intel MPI do, and collect what each printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipex_lars.bench.local_job import Ended, finish, start_ranks, without_launcher_vars

WORKERS = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, with threads capped to one per rank."""
    env = {k: v for k, v in without_launcher_vars(os.environ).items() if not k.startswith("CCL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", IPEX_LARS_DIST_TIMEOUT="30", **extra)
    return env


def torchrun_style(
    script: str, args: list[str], world: int, ranks: list[int] | None = None, timeout: float = 120, **extra: str
) -> list[Ended]:
    """Start `ranks` (default all) of a `world`-rank job with torchrun's variables; one Ended per process."""
    return torchrun_command([sys.executable, str(WORKERS / script), *args], world, ranks, timeout, **extra)


def torchrun_command(
    command: list[str], world: int, ranks: list[int] | None = None, timeout: float = 120, **extra: str
) -> list[Ended]:
    """Start `command` as `ranks` (default all) of a `world`-rank job with torchrun's variables."""
    return finish(start_ranks(command, world, env=base_env(**extra), ranks=ranks), timeout)


def single(script: str, args: list[str], timeout: float = 120, **extra: str) -> Ended:
    """Run the script as a plain single process, with no launcher variables."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS / script), *args],
        env=base_env(**extra),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return finish([proc], timeout)[0]


def mpiexec(script: str, args: list[str], world: int, timeout: float = 120, **extra: str) -> Ended:
    """Run the script under Intel MPI's mpiexec; one Ended for the whole job (outputs interleave)."""
    env = base_env(**extra)
    env["PATH"] = f"{MPIEXEC.parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(
        [str(MPIEXEC), "-n", str(world), sys.executable, str(WORKERS / script), *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return finish([proc], timeout)[0]


def describe(results: list[Ended]) -> str:
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
