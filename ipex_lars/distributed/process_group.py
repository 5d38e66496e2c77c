"""``init()``: start torch.distributed from whatever launcher started this process, on the fastest backend."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

from ipex_lars.distributed import backend as oneccl
from ipex_lars.distributed.env import Launch, apply_defaults, ccl_defaults, detect

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "IPEX_LARS_DIST_TIMEOUT"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says how to get it."""


@dataclass(frozen=True)
class DistInfo:
    """What ``init`` did: the backend it picked and why, the launch it read, the variables it set."""

    backend: str
    reason: str
    launch: Launch
    env_set: dict[str, str] = field(default_factory=dict)


def _choose(requested: str) -> tuple[str, str]:
    if requested == "auto":
        why_not = oneccl.unavailable_reason()
        if why_not:
            return "gloo", f"oneccl unavailable: {why_not}"
        if not oneccl.is_built():
            return "gloo", "the oneccl extension is not built for this torch; run `ipex-lars build` once"
        return "oneccl", "oneCCL is installed and the backend is built"
    if requested == "oneccl":
        why_not = oneccl.unavailable_reason()
        if why_not:
            raise BackendUnavailableError(f"backend 'oneccl' requested, but {why_not}")
        oneccl.load()  # builds here, once, if `ipex-lars build` was not run
        return "oneccl", "requested"
    if requested == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the 'ccl' backend)
        except ImportError:
            raise BackendUnavailableError(
                "backend 'ccl' needs Intel's oneccl_bindings_for_pytorch, which is not installed (it is retired "
                "and not on PyPI); use backend='oneccl', this project's binding, instead") from None
        return "ccl", "requested (Intel's oneccl_bindings_for_pytorch)"
    return requested, "requested"


def _timeout(timeout: float | timedelta | None) -> timedelta:
    if isinstance(timeout, timedelta):
        return timeout
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    return timedelta(seconds=float(timeout))


def _store(launch: Launch, timeout: timedelta):
    import torch.distributed as dist

    if launch.world_size == 1:
        return dist.HashStore()
    try:
        return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                             is_master=launch.rank == 0, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        if launch.rank == 0:
            raise RuntimeError(f"rank 0 cannot serve the rendezvous store on {launch.master_addr}:"
                               f"{launch.master_port}: {exc}. Pick a free MASTER_PORT.") from exc
        raise oneccl.MissingRankError(
            f"rank {launch.rank} could not reach rank 0's rendezvous store at {launch.master_addr}:"
            f"{launch.master_port} within {timeout.total_seconds():.0f} s: rank 0 never started, or "
            f"MASTER_ADDR/MASTER_PORT point elsewhere ({exc})") from exc


def shutdown() -> None:
    """Tear the process group down; ``init()`` also does this at interpreter exit.

    Left to static destructors, oneCCL's threads abort the process ("terminate called without an
    active exception"). Garbage is collected first because DDP's reference cycles would otherwise
    keep the backend alive past ``destroy_process_group``."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def init(backend: str = "auto", timeout: float | timedelta | None = None, verbose: bool = True) -> DistInfo:
    """Initialise torch.distributed for this process and return what was chosen.

    Reads rank and world size from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), Intel MPI
    (``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``), SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/
    ``SLURM_LOCALID``) or, with none of them, runs as a single process. Without ``MASTER_ADDR``/
    ``MASTER_PORT``, SLURM uses the first node of the allocation and port ``20000 + job id % 20000``;
    a one-node mpiexec uses 127.0.0.1 and a port derived from the shared hydra proxy's pid; a
    multi-node mpiexec must set both (``-genv``).

    Before anything loads oneCCL it sets, unless already set, the settings measured fastest
    (``CCL_ATL_SHM=1`` and ``CCL_WORKER_OFFLOAD=0`` within a node, ``CCL_PROCESS_LAUNCHER=none``,
    ``OMP_NUM_THREADS`` = this rank's share of the CPUs, also applied with ``torch.set_num_threads``).

    ``backend``: ``"auto"`` picks ``oneccl`` when oneCCL is installed and the extension built,
    else ``gloo``; ``"oneccl"``, ``"gloo"`` or ``"ccl"`` (Intel's retired bindings, if installed)
    force one. ``timeout`` (seconds, default ``$IPEX_LARS_DIST_TIMEOUT`` or 300) bounds the wait
    for missing ranks and every collective; past it the job fails naming the problem.
    """
    import torch
    import torch.distributed as dist

    launch = detect()
    cpus = len(os.sched_getaffinity(0))
    env_set = apply_defaults(ccl_defaults(launch, cpus))
    if "OMP_NUM_THREADS" in env_set:
        torch.set_num_threads(int(env_set["OMP_NUM_THREADS"]))
    chosen, reason = _choose(backend)
    limit = _timeout(timeout)
    store = _store(launch, limit)
    dist.init_process_group(chosen, store=store, rank=launch.rank, world_size=launch.world_size, timeout=limit)
    atexit.register(shutdown)
    info = DistInfo(chosen, reason, launch, env_set)
    if verbose and launch.rank == 0:
        settings = " ".join(f"{k}={v}" for k, v in env_set.items()) or "none"
        print(f"[ipex_lars.distributed] backend {chosen} ({reason}); launcher {launch.launcher}, "
              f"{launch.world_size} rank(s); set {settings}", file=sys.stderr, flush=True)
    return info
