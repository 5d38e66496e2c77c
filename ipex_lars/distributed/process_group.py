"""``init()``: start torch.distributed from whatever launcher started this process, on the fastest backend."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

from ipex_lars.distributed import auto_backend, interface, layout, liveness, rendezvous
from ipex_lars.distributed import backend as oneccl
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
    hosts: int = 1  # hosts the job's ranks run on
    cpu_sharers: int = 1  # ranks on this host allowed on this rank's CPUs, this one included


def _choose(requested: str, hosts: int, world: int) -> tuple[str, str]:
    if requested == "auto":
        why_not = oneccl.unavailable_reason()
        if not why_not and not oneccl.is_built():
            why_not = "the oneccl extension is not built for this torch; run `ipex-lars build` once"
        return auto_backend.choose(hosts, world, os.environ, why_not)
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
                "and not on PyPI); use backend='oneccl', this project's binding, instead"
            ) from None
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

    Once all ranks have met, every rank learns the job's layout (``layout``: how many hosts, which
    ranks may use its CPUs). Then, before anything loads oneCCL, it sets, unless already set, the
    settings measured fastest (``CCL_ATL_SHM=1`` and ``CCL_WORKER_OFFLOAD=0`` when all ranks are on
    one host, ``CCL_PROCESS_LAUNCHER=none``, ``OMP_NUM_THREADS`` = this rank's share of the CPUs it
    may use, also applied with ``torch.set_num_threads``). A rank pinned to its own CPUs (lars-run,
    taskset, srun or mpiexec pinning) keeps all of them; ranks allowed on the same CPUs split them.

    ``backend``: ``"auto"`` picks by transport (``auto_backend``): ``oneccl`` within one host or on a
    fabric provider, ``gloo`` across hosts over TCP or when oneCCL is not installed and built; the
    choice and its reason are printed by rank 0. ``"oneccl"``, ``"gloo"`` or ``"ccl"`` (Intel's
    retired bindings, if installed) force one. ``timeout`` (seconds, default
    ``$IPEX_LARS_DIST_TIMEOUT`` or 300) bounds the wait for missing ranks and every collective; past
    it the job fails naming the problem.

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
    limit = _timeout(timeout)
    heartbeat = liveness.heartbeat_timeout()
    job = job_id()
    store = rendezvous.open_store(launch, limit, job)
    meeting = dist.PrefixStore(rendezvous.PREFIX, store)
    rendezvous.wait_for_ranks(meeting, launch.rank, launch.world_size, limit)
    _watcher = liveness.start(store, launch, job, heartbeat)
    atexit.register(shutdown)
    where = layout.exchange(meeting, launch.rank, launch.world_size, limit)
    env_set = apply_defaults(ccl_defaults(launch, len(where.cpus), where.cpu_sharers, one_host=where.hosts == 1))
    if "OMP_NUM_THREADS" in env_set:
        torch.set_num_threads(int(env_set["OMP_NUM_THREADS"]))
    chosen, reason = _choose(backend, where.hosts, launch.world_size)  # loads oneCCL: after its settings
    dist.init_process_group(chosen, store=store, rank=launch.rank, world_size=launch.world_size, timeout=limit)
    info = DistInfo(chosen, reason, launch, env_set, where.hosts, where.cpu_sharers)
    if verbose and launch.rank == 0:
        settings = " ".join(f"{k}={v}" for k, v in env_set.items()) or "none"
        print(
            f"[ipex_lars.distributed] backend {chosen} ({reason}); launcher {launch.launcher}, "
            f"{launch.world_size} rank(s); set {settings}",
            file=sys.stderr,
            flush=True,
        )
    return info
