"""Where the ranks of one job meet: rank 0's c10d store, and the checks that keep jobs apart.

- Rank 0 listens on MASTER_ADDR's address only, not on every interface, with one
  exception: a host *name* that resolves to a loopback address on a job that may span
  nodes (Debian maps a host's own name to 127.0.1.1; other nodes could not reach that),
  which listens on every interface. A busy port is a one-line error naming the port and
  the fix (``MASTER_PORT``, ``lars-run --master-port``).
- Under torchrun, whose agent already serves a store at MASTER_ADDR:MASTER_PORT, every
  rank uses that one, under this restart attempt's prefix.
- Rank 0 writes the job's identity (``env.job_id``: ``IPEX_LARS_JOB_ID`` or the launcher's
  job id, and the world size) in the store. Every other rank waits up to the timeout for
  something to listen at MASTER_ADDR:MASTER_PORT, then refuses a store of another job.
- Every rank claims its rank number in the store; a second process claiming the same
  number (a rank of another job that happens to have no or the same job id) is refused.
- Every rank waits for all the others; the missing ones are named within the timeout.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

from ipex_lars.distributed.env import JOB_ID_ENV, Launch, agent_store_prefix

TIMEOUT_ENV = "IPEX_LARS_DIST_TIMEOUT"
PREFIX = "ipex_lars"  # this package's keys in the job's store
_JOB_KEY = f"{PREFIX}/job"


class RendezvousError(RuntimeError):
    """The ranks of this job cannot meet; the message says why and what to change."""


class MissingRankError(RendezvousError):
    """Some ranks did not join the process group within its timeout."""


def identity() -> str:
    """This process, as the other ranks' messages name it."""
    return f"host {socket.gethostname()}, pid {os.getpid()}"


def first_line(exc: BaseException) -> str:
    """An exception's message without the C++ backtrace torch appends to some of them."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def bind_address(launch: Launch) -> str:
    """The address rank 0's listeners bind: MASTER_ADDR's own, or "" for every interface (see the module doc)."""
    try:
        address = socket.getaddrinfo(launch.master_addr, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as exc:
        raise RendezvousError(
            f"rank 0 cannot resolve MASTER_ADDR={launch.master_addr!r} ({exc.strerror}); "
            "set MASTER_ADDR to rank 0's host name or address"
        ) from None
    if ipaddress.ip_address(address).is_loopback and not launch.single_node and address != launch.master_addr:
        return ""
    return address


def listen(address: str, port: int) -> socket.socket:
    """A socket listening on address:port ("": every interface), or a one-line error naming the fix."""
    where = f"{address or '*'}:{port}"
    try:
        if address:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return socket.create_server((address, port), family=family, backlog=1024)
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024)
        return socket.create_server(("", port), backlog=1024)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise RendezvousError(
                f"rank 0 cannot serve the rendezvous store on {where}: port {port} is already in use (another "
                "job, or one still exiting). Give this job a free port: set MASTER_PORT, or pass lars-run "
                "--master-port"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise RendezvousError(
                f"rank 0 cannot listen on {where}: MASTER_ADDR is not an address of this host "
                f"({socket.gethostname()}); set MASTER_ADDR to rank 0's host"
            ) from None
        raise RendezvousError(
            f"rank 0 cannot listen on {where} for the rendezvous store: {exc.strerror}; "
            "check MASTER_ADDR and MASTER_PORT"
        ) from None


def open_store(launch: Launch, timeout: timedelta, job: str) -> Any:
    """This job's c10d store: rank 0 serves it, the other ranks reach it and check it is their job's."""
    import torch.distributed as dist

    if launch.world_size == 1:
        return dist.HashStore()
    deadline = time.monotonic() + timeout.total_seconds()
    attempt = agent_store_prefix()
    serve = launch.rank == 0 and attempt is None
    if serve:  # rank 0 binds the port itself, so a port in use is a one-line error naming it
        listening = {"master_listen_fd": listen(bind_address(launch), launch.master_port).detach()}
    else:
        listening = {}
        _reach(launch, deadline, timeout, "torchrun's agent" if attempt else "rank 0")
    store = dist.TCPStore(
        launch.master_addr,
        launch.master_port,
        launch.world_size,
        is_master=serve,
        timeout=timeout,
        wait_for_workers=False,
        **listening,
    )
    if attempt is not None:
        store = dist.PrefixStore(attempt, store)
    if launch.rank == 0:
        store.set(_JOB_KEY, json.dumps({"job": job, "world": launch.world_size, "rank0": identity()}))
    else:
        _check_job(store, launch, job, deadline)
    return store


def _reach(launch: Launch, deadline: float, timeout: timedelta, host: str) -> None:
    """Wait until something listens at MASTER_ADDR:MASTER_PORT; by the deadline, name `host` as missing."""
    pause = 0.05
    while True:
        try:
            socket.create_connection(
                (launch.master_addr, launch.master_port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))
            ).close()
            return
        except OSError as exc:
            if time.monotonic() + pause > deadline:
                missing = f"rank(s) 0 of {launch.world_size} never joined" if host == "rank 0" else "it is gone"
                raise MissingRankError(
                    f"rank {launch.rank} could not reach {host}'s rendezvous store at {launch.master_addr}:"
                    f"{launch.master_port} within {timeout.total_seconds():g} s ({exc.strerror or exc}): {missing}. "
                    f"Check that {host} started and that MASTER_ADDR and MASTER_PORT point at it; raise the wait "
                    f"with {TIMEOUT_ENV}=<seconds> or init(timeout=...)"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def _check_job(store: Any, launch: Launch, job: str, deadline: float) -> None:
    """Refuse a store that another job's rank 0 serves (another job id or world size)."""
    where = f"{launch.master_addr}:{launch.master_port}"
    try:
        store.wait([_JOB_KEY], timedelta(seconds=max(0.1, deadline - time.monotonic())))
        theirs = json.loads(store.get(_JOB_KEY))
    except (RuntimeError, ValueError):
        raise RendezvousError(
            f"rank {launch.rank}: the store at {where} never said which job it serves: it is not an ipex-lars "
            "job's rendezvous store. Give this job its own MASTER_PORT (lars-run --master-port)"
        ) from None
    if (theirs.get("job"), theirs.get("world")) != (job, launch.world_size):
        raise RendezvousError(
            f"rank {launch.rank} of job {job or '(no id)'} ({launch.world_size} ranks) reached the rendezvous "
            f"store at {where} of another job ({theirs.get('job') or '(no id)'}, {theirs.get('world')} ranks, rank "
            f"0 on {theirs.get('rank0')}) and will not join it. Give each job its own MASTER_PORT (lars-run "
            f"--master-port); if this is one job, give all its ranks the same {JOB_ID_ENV}"
        )


def wait_for_ranks(store: Any, rank: int, size: int, timeout: timedelta) -> None:
    """Claim this rank's number and wait until all `size` ranks have; name the missing ones on timeout.

    The first rank to time out publishes the missing ranks, so every waiting rank reports
    the same list, and rank 0, which hosts the store, keeps it up until they have read it.
    """
    me = identity()
    holder = store.compare_set(f"arrived/{rank}", "", me).decode()
    if holder != me:
        raise RendezvousError(
            f"rank {rank} ({me}) found rank {rank} taken in its rendezvous store by another process ({holder}): "
            f"the store belongs to another job on the same MASTER_ADDR:MASTER_PORT, or the launcher started rank "
            f"{rank} twice. Give each job its own MASTER_PORT (lars-run --master-port) and {JOB_ID_ENV}"
        )
    arrived = store.add("arrived", 1)
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 0.005
    try:
        while arrived < size:
            if store.check(["missing"]):
                break
            if time.monotonic() > deadline:
                late = [str(r) for r in range(size) if not store.check([f"arrived/{r}"])]
                store.compare_set("missing", "", ",".join(late) or "?")
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
            arrived = store.add("arrived", 0)
        else:
            return
        missing = store.get("missing").decode()
        told = store.add("told", 1)
        while rank == 0 and told < arrived and time.monotonic() < deadline + 10:
            time.sleep(0.05)
            told = store.add("told", 0)
    except RuntimeError as exc:  # the store went away: rank 0 failed while we waited
        raise MissingRankError(
            f"rank {rank} lost rank 0's rendezvous store while waiting for all {size} ranks to "
            f"join ({first_line(exc)}); see rank 0's error"
        ) from None
    raise MissingRankError(
        f"rank {rank} waited {timeout.total_seconds():g} s but rank(s) {missing} of {size} never joined the "
        f"process group. Check that they started and reach init; raise the wait with {TIMEOUT_ENV}=<seconds> "
        "or init(timeout=...)"
    )
