"""``init()``: start torch.distributed from whatever launcher started this process, on the fastest backend."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

from ipex_lars.distributed import backend as oneccl
from ipex_lars.distributed import interface, liveness, rendezvous
from ipex_lars.distributed.env import Launch, apply_defaults, ccl_defaults, detect, job_id
from ipex_lars.distributed.rendezvous import TIMEOUT_ENV

DEFAULT_TIMEOUT_S = 300.0
_watcher: liveness.Watcher | None = None


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
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return timedelta(seconds=float(timeout))


def shutdown() -> None:
    """Leave the job: tell the other ranks' watchers, then tear the process group down.

    ``init()`` also does this at interpreter exit. The watchers hear a goodbye, or, after an
    uncaught exception, that this rank failed and why. Left to static destructors, oneCCL's
    threads abort the process ("terminate called without an active exception"). Garbage is
    collected first because DDP's reference cycles would otherwise keep the backend alive
    past ``destroy_process_group``."""
    import gc

    import torch.distributed as dist

    global _watcher
    if _watcher is not None:
        liveness.stop(_watcher)
        _watcher = None
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

    Isolation (``rendezvous``): rank 0's store listens on MASTER_ADDR's interface only, and a
    rank refuses a store of another job (another ``IPEX_LARS_JOB_ID`` or launcher job id, another
    world size, or its rank number already taken). Failures to meet raise ``RendezvousError``
    (``MissingRankError`` for ranks that never came) with a one-line message.

    Liveness (``liveness``): once all ranks have joined, a watcher thread in every rank ends the
    process (exit code 1, one line naming the rank) as soon as another rank dies, and after
    ``$IPEX_LARS_HEARTBEAT_TIMEOUT`` seconds (default 30; 0: off) of silence from one.
    """
    global _watcher
    import torch
    import torch.distributed as dist

    launch = detect()
    iface = interface.apply(launch)  # before any backend reads CCL_KVS_IFACE / FI_TCP_IFACE / GLOO_SOCKET_IFNAME
    if verbose and launch.rank == 0 and launch.world_size > 1:
        print(f"[ipex_lars.distributed] {iface.line()}", file=sys.stderr, flush=True)
    cpus = len(os.sched_getaffinity(0))
    env_set = apply_defaults(ccl_defaults(launch, cpus))
    if "OMP_NUM_THREADS" in env_set:
        torch.set_num_threads(int(env_set["OMP_NUM_THREADS"]))
    chosen, reason = _choose(backend)
    limit = _timeout(timeout)
    heartbeat = liveness.heartbeat_timeout()
    job = job_id()
    store = rendezvous.open_store(launch, limit, job)
    rendezvous.wait_for_ranks(dist.PrefixStore(rendezvous.PREFIX, store), launch.rank, launch.world_size, limit)
    _watcher = liveness.start(store, launch, job, heartbeat)
    atexit.register(shutdown)
    dist.init_process_group(chosen, store=store, rank=launch.rank, world_size=launch.world_size, timeout=limit)
    info = DistInfo(chosen, reason, launch, env_set)
    if verbose and launch.rank == 0:
        settings = " ".join(f"{k}={v}" for k, v in env_set.items()) or "none"
        print(f"[ipex_lars.distributed] backend {chosen} ({reason}); launcher {launch.launcher}, "
              f"{launch.world_size} rank(s); set {settings}", file=sys.stderr, flush=True)
    return info
