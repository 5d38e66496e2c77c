"""CPU-list text (``0-3,8``), hex masks, and the CPUs this process may use.

The allowed set is the intersection of the scheduler mask and the cgroup cpuset:
``lscpu`` describes the host, so pinning to a CPU outside the container's cpuset
fails with EINVAL. Everything here works on plain ints so plans can be computed
for a machine described by data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from affinity.errors import UsageError


class CpuListError(UsageError):
    """A CPU-list string could not be parsed."""


def parse_cpulist(text: str) -> set[int]:
    """Parse the kernel's list format (``0-3,8,10-11``) into a set of CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise CpuListError(f"bad CPU list {text!r}: {part!r} is not a number or a range like 0-3") from None
        if first < 0 or last < first:
            raise CpuListError(f"bad CPU list {text!r}: {part!r} is not an ascending range")
        cpus.update(range(first, last + 1))
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format CPU ids compactly (``0-3,8``); the inverse of :func:`parse_cpulist`."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def hex_mask(cpus: Iterable[int]) -> str:
    """Bit mask of the CPUs as ``0x...`` (Intel MPI pin domains, Slurm ``mask_cpu``)."""
    mask = 0
    for cpu in cpus:
        mask |= 1 << cpu
    return hex(mask)


def cgroup_cpuset(
    proc_cgroup: str | Path = "/proc/self/cgroup", cgroup_root: str | Path = "/sys/fs/cgroup"
) -> set[int] | None:
    """CPUs granted by this process's cgroup cpuset, or None when no cpuset limit is visible.

    Reads cgroup v2 (``cpuset.cpus.effective``) and v1 (``cpuset/.../cpuset.effective_cpus``
    or ``cpuset.cpus``). The paths are parameters so a restricted container can be simulated.
    """
    root = Path(cgroup_root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        _, controllers, rel = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            candidates.append(root / rel / "cpuset.cpus.effective")
        elif "cpuset" in controllers.split(","):
            candidates += [root / "cpuset" / rel / "cpuset.effective_cpus", root / "cpuset" / rel / "cpuset.cpus"]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            return parse_cpulist(text)
    return None


def allowed_cpus(proc_cgroup: str | Path = "/proc/self/cgroup", cgroup_root: str | Path = "/sys/fs/cgroup") -> set[int]:
    """CPUs this process may run on: the scheduler mask intersected with the cgroup cpuset."""
    cpus = set(os.sched_getaffinity(0))
    limit = cgroup_cpuset(proc_cgroup, cgroup_root)
    if limit is not None and cpus & limit:
        cpus &= limit
    return cpus
