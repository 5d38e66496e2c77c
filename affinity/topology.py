"""Discover or load the CPU topology: sockets, NUMA nodes, physical cores, hyper-thread siblings.

Sources, in order: a file of ``lscpu -p=CPU,CORE,SOCKET,NODE`` output (plan any machine
from anywhere), sysfs (no subprocess), ``lscpu`` itself, and finally a flat fallback
that treats every CPU as its own core on node 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from affinity.cpuset import format_cpulist
from affinity.errors import UsageError


class TopologyError(UsageError):
    """The topology data is missing or malformed."""


@dataclass(frozen=True)
class Cpu:
    """One logical CPU. ``core`` is unique per (socket, core) pair, as lscpu and sysfs number them."""

    cpu: int
    core: int
    socket: int
    node: int


@dataclass(frozen=True)
class Core:
    """A physical core: its logical CPUs in ascending order (first = primary, rest = HT siblings)."""

    socket: int
    node: int
    threads: tuple[int, ...]

    @property
    def primary(self) -> int:
        return self.threads[0]

    @property
    def siblings(self) -> tuple[int, ...]:
        return self.threads[1:]


@dataclass
class Topology:
    """The logical CPUs of one machine and where they came from."""

    cpus: list[Cpu]
    source: str = "unknown"
    notes: list[str] = field(default_factory=list)

    def restricted(self, allowed: set[int]) -> Topology:
        """The same machine seen through an allowed-CPU set (scheduler mask / cgroup cpuset)."""
        return Topology([c for c in self.cpus if c.cpu in allowed], self.source, list(self.notes))

    @property
    def cpu_ids(self) -> set[int]:
        return {c.cpu for c in self.cpus}

    @property
    def nodes(self) -> list[int]:
        return sorted({c.node for c in self.cpus})

    @property
    def sockets(self) -> list[int]:
        return sorted({c.socket for c in self.cpus})

    def cores(self, node: int | None = None) -> list[Core]:
        """Physical cores (optionally of one NUMA node), ordered by their primary CPU id."""
        groups: dict[tuple[int, int], list[Cpu]] = {}
        for c in self.cpus:
            if node is None or c.node == node:
                groups.setdefault((c.socket, c.core), []).append(c)
        cores = [
            Core(key[0], min(x.node for x in grp), tuple(sorted(x.cpu for x in grp))) for key, grp in groups.items()
        ]
        return sorted(cores, key=lambda k: k.primary)

    def summary(self) -> dict:
        """Counts for reports and ``--dry-run`` output."""
        cores = self.cores()
        return {
            "source": self.source,
            "sockets": len(self.sockets),
            "numa_nodes": len(self.nodes),
            "physical_cores": len(cores),
            "logical_cpus": len(self.cpus),
            "threads_per_core": max((len(k.threads) for k in cores), default=0),
            "cpus": format_cpulist(self.cpu_ids),
        }


def parse_lscpu(text: str, source: str = "lscpu") -> Topology:
    """Parse ``lscpu -p=CPU,CORE,SOCKET,NODE`` output. An empty NODE (no NUMA) means node 0."""
    cpus: list[Cpu] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            raise TopologyError(f"{source} line {lineno}: expected CPU,CORE,SOCKET,NODE, got {line!r}")
        fields += [""] * (4 - len(fields))
        try:
            cpu, core, socket = (int(f) for f in fields[:3])
            node = int(fields[3]) if fields[3] else 0
        except ValueError:
            raise TopologyError(
                f"{source} line {lineno}: expected integers CPU,CORE,SOCKET,NODE, got {line!r}"
            ) from None
        cpus.append(Cpu(cpu, core, socket, node))
    if not cpus:
        raise TopologyError(f"{source}: no CPU lines; produce it with `lscpu -p=CPU,CORE,SOCKET,NODE`")
    if len({c.cpu for c in cpus}) != len(cpus):
        raise TopologyError(f"{source}: a CPU id appears twice")
    return Topology(sorted(cpus, key=lambda c: c.cpu), source)


def load_topology(path: str | Path) -> Topology:
    """Read a topology file (``lscpu -p=CPU,CORE,SOCKET,NODE`` output) for planning elsewhere."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TopologyError(
            f"cannot read topology file {path}: {exc.strerror}; "
            "create it on the target with `lscpu -p=CPU,CORE,SOCKET,NODE > FILE`"
        ) from None
    return parse_lscpu(text, source=str(path))


def from_sysfs(root: str | Path = "/sys/devices/system/cpu") -> Topology | None:
    """Read ``cpuN/topology`` and the ``cpuN/nodeM`` links; None if sysfs lacks them."""
    root = Path(root)
    cpus: list[Cpu] = []
    for entry in root.glob("cpu[0-9]*"):
        topo = entry / "topology"
        if not topo.is_dir():
            continue
        try:
            core = int((topo / "core_id").read_text())
            socket = int((topo / "physical_package_id").read_text())
        except (OSError, ValueError):
            return None
        node = next((int(m.group(1)) for p in entry.iterdir() if (m := re.fullmatch(r"node(\d+)", p.name))), 0)
        cpus.append(Cpu(int(entry.name[3:]), core, max(socket, 0), node))
    return Topology(sorted(cpus, key=lambda c: c.cpu), "sysfs") if cpus else None


def from_lscpu() -> Topology | None:
    """Run ``lscpu -p=CPU,CORE,SOCKET,NODE``; None if lscpu is missing or fails."""
    exe = shutil.which("lscpu")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "-p=CPU,CORE,SOCKET,NODE"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        return parse_lscpu(out, "lscpu")
    except (subprocess.SubprocessError, OSError, TopologyError):
        return None


def discover() -> Topology:
    """This machine's topology: sysfs, else lscpu, else one core per CPU on node 0 (with a note)."""
    topo = from_sysfs() or from_lscpu()
    if topo is not None:
        return topo
    n = os.cpu_count() or 1
    return Topology(
        [Cpu(i, i, 0, 0) for i in range(n)],
        "fallback",
        ["topology unknown (no sysfs or lscpu): treating each CPU as a core on NUMA node 0"],
    )
