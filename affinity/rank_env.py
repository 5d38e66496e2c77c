"""Per-rank environment: OpenMP thread count and affinity, oneCCL workers, and allocator /
OpenMP-runtime preloading.

Libraries are searched under versioned names too (distros ship ``libjemalloc.so.2``,
not ``libjemalloc.so``). Affinity variables are explicit CPU lists, so a rank's threads
land on exactly the cores its plan gives it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from affinity.cpuset import format_cpulist
from affinity.errors import UsageError
from affinity.plan import NodePlan, RankPlan

ALLOCATORS = {  # name -> library stems, preferred first
    "tcmalloc": ("libtcmalloc", "libtcmalloc_minimal"),
    "jemalloc": ("libjemalloc",),
}
IOMP_STEMS = ("libiomp5",)
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto"


class EnvError(UsageError):
    """A requested library is missing; the message says how to install or point to it."""


def library_dirs() -> list[Path]:
    """Where allocators and libiomp5 are looked for: LD_LIBRARY_PATH, the Python/conda/venv
    prefixes, then the usual system directories."""
    dirs = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    for prefix in (sys.prefix, os.environ.get("CONDA_PREFIX"), os.environ.get("VIRTUAL_ENV")):
        if prefix:
            dirs.append(os.path.join(prefix, "lib"))
    dirs += ["/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
    seen: list[Path] = []
    for d in map(Path, dirs):
        if d not in seen:
            seen.append(d)
    return seen


def find_library(stems: tuple[str, ...], dirs: list[Path] | None = None) -> Path | None:
    """First ``STEM.so`` or ``STEM.so.N...`` found; prefers earlier stems, then earlier dirs,
    then the unversioned name, then the highest version."""

    def version(p: Path) -> tuple[int, ...]:
        tail = p.name.split(".so", 1)[1].lstrip(".")
        return tuple(int(x) for x in tail.split(".") if x.isdigit())

    for stem in stems:
        for d in dirs if dirs is not None else library_dirs():
            hits = [p for p in d.glob(stem + ".so*") if p.name == stem + ".so" or p.name.startswith(stem + ".so.")]
            if hits:
                return sorted(hits, key=lambda p: (p.name != stem + ".so", [-v for v in version(p)]))[0]
    return None


@dataclass(frozen=True)
class EnvChoice:
    """Resolved runtime choices: preloaded libraries and which OpenMP runtime the affinity targets."""

    allocator: str
    allocator_lib: Path | None
    omp_runtime: str  # "intel" or "default" (GNU libgomp)
    iomp_lib: Path | None
    notes: tuple[str, ...] = ()


def resolve(memory_allocator: str = "auto", omp_runtime: str = "auto", dirs: list[Path] | None = None) -> EnvChoice:
    """Pick allocator and OpenMP runtime. ``auto`` uses what is installed (tcmalloc, then jemalloc;
    Intel OpenMP if libiomp5 is present); an explicit choice that is missing raises EnvError."""
    notes: list[str] = []
    alloc, alloc_lib = "default", None
    if memory_allocator in ALLOCATORS:
        alloc_lib = find_library(ALLOCATORS[memory_allocator], dirs)
        if alloc_lib is None:
            pkg = "libtcmalloc-minimal4" if memory_allocator == "tcmalloc" else "libjemalloc2"
            raise EnvError(
                f"--memory-allocator {memory_allocator}: no {ALLOCATORS[memory_allocator][0]}.so* "
                f"found in LD_LIBRARY_PATH or {sys.prefix}/lib or /usr/lib*; install it "
                f"(apt-get install {pkg}, or conda install {memory_allocator}) or use auto"
            )
        alloc = memory_allocator
    elif memory_allocator == "auto":
        for name, stems in ALLOCATORS.items():
            alloc_lib = find_library(stems, dirs)
            if alloc_lib is not None:
                alloc = name
                break
        else:
            notes.append(
                "no tcmalloc/jemalloc found: default allocator (apt-get install libjemalloc2 "
                "to enable --memory-allocator jemalloc)"
            )
    iomp = find_library(IOMP_STEMS, dirs) if omp_runtime in ("auto", "intel") else None
    if omp_runtime == "intel" and iomp is None:
        raise EnvError(
            "--omp-runtime intel: libiomp5.so not found in LD_LIBRARY_PATH or "
            f"{sys.prefix}/lib; pip install intel-openmp, or use --omp-runtime default"
        )
    runtime = "intel" if iomp is not None else "default"
    return EnvChoice(alloc, alloc_lib, runtime, iomp, tuple(notes))


def rank_env(rank: RankPlan, plan: NodePlan, choice: EnvChoice, *, ccl: bool, latency: bool = False) -> dict[str, str]:
    """Variables that pin one rank's OpenMP threads and (when ``ccl``) its oneCCL workers.

    ``CCL_WORKER_AFFINITY`` lists the workers of *all* local ranks in local-rank order, as
    oneCCL expects; each process takes its own slice.
    """
    env = {"OMP_NUM_THREADS": str(len(rank.cores))}
    cores = format_cpulist(rank.cores)
    if choice.omp_runtime == "intel":
        env["KMP_AFFINITY"] = f"granularity=fine,proclist=[{cores}],explicit"
        env["KMP_BLOCKTIME"] = "0" if latency else "1"
    else:
        env["GOMP_CPU_AFFINITY"] = cores
    preload = [str(p) for p in (choice.iomp_lib, choice.allocator_lib) if p is not None]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    if choice.allocator == "jemalloc":
        env["MALLOC_CONF"] = JEMALLOC_CONF
    k = plan.ccl_worker_count
    if ccl and k:
        env["CCL_WORKER_COUNT"] = str(k)
        env["CCL_WORKER_AFFINITY"] = ",".join(
            str(r.ccl_worker_cores[i % len(r.ccl_worker_cores)]) for r in plan.ranks for i in range(k)
        )
    return env


def merge_preload(env: dict[str, str], inherited: str | None) -> dict[str, str]:
    """Append an already-set ``LD_PRELOAD`` after ours instead of overwriting it."""
    if inherited and "LD_PRELOAD" in env:
        env = dict(env, LD_PRELOAD=env["LD_PRELOAD"] + ":" + inherited)
    return env
