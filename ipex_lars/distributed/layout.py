"""Where the ranks of a job run: how many hosts, and which ranks share this rank's CPUs.

Two choices in ``init()`` need every rank's view, not just this one's: the thread cap (a
rank pinned to its own cores may use all of them; ranks that share one set of CPUs split
it) and ``backend="auto"`` (one host or several). Launchers say some of it
(``LOCAL_WORLD_SIZE``, ``MPI_LOCALNRANKS``, ``SLURM_TASKS_PER_NODE``), not all of them, and
none say how the ranks were pinned, so every rank publishes its host and its allowed CPUs
(``os.sched_getaffinity``) in the rendezvous store and reads back what it needs: a
constant number of store requests per rank, whatever the job's size.

A host is a hostname, the kernel's boot id and the network namespace: ranks in different
network namespaces of one machine (containers, or the simulated nodes of the tests) reach
each other only over the network, so they count as different hosts. CPUs, though, belong
to the machine (the boot id): ranks in two containers of one machine can still share them.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

_KEY = "layout"


@dataclass(frozen=True)
class Layout:
    """What this rank learned about the job: its host count and the CPU masks of the ranks on its machine."""

    hosts: int
    cpus: frozenset[int]  # this rank's allowed CPUs
    local_masks: tuple[frozenset[int], ...]  # every rank on this machine, this one included

    @property
    def cpu_sharers(self) -> int:
        """Ranks on this machine whose allowed CPUs overlap this rank's, this one included: with identical masks
        (nobody pinned) all local ranks; with disjoint ones (each pinned to its share) this rank alone."""
        return sum(1 for mask in self.local_masks if mask & self.cpus)

    @property
    def threads(self) -> int:
        """This rank's share of its allowed CPUs: all of them when no other rank may use them."""
        return max(1, len(self.cpus) // max(1, self.cpu_sharers))


def machine_id() -> str:
    """This machine (the running kernel's boot id), or its hostname where the kernel does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def host_id() -> str:
    """This machine and network namespace, as ``hostname/boot id/net namespace``."""
    try:
        net = os.readlink("/proc/self/ns/net")
    except OSError:
        net = "?"
    return f"{socket.gethostname()}/{machine_id()}/{net}"


def exchange(store: Any, rank: int, world: int, timeout: timedelta) -> Layout:
    """Publish this rank's host and CPUs in ``store`` and learn the job's layout; every rank must call it."""
    host, machine, cpus = host_id(), machine_id(), frozenset(os.sched_getaffinity(0))
    if store.compare_set(f"{_KEY}/first/{host}", "", str(rank)).decode() == str(rank):
        store.add(f"{_KEY}/hosts", 1)
    store.append(f"{_KEY}/cpus/{machine}", json.dumps(sorted(cpus)) + "\n")
    if store.add(f"{_KEY}/arrived", 1) == world:
        store.set(f"{_KEY}/complete", "1")
    store.wait([f"{_KEY}/complete"], timeout)
    lines = store.get(f"{_KEY}/cpus/{machine}").decode().splitlines()
    masks = tuple(frozenset(json.loads(line)) for line in lines)
    return Layout(hosts=store.add(f"{_KEY}/hosts", 0), cpus=cpus, local_masks=masks)
