"""One place that knows the CPU: its vector ISA features, its NUMA memory nodes, its cores.

Read once per process from ``/proc/cpuinfo`` and sysfs (``/sys/devices/system/node``,
``/sys/devices/system/cpu``), or from a directory that describes another machine as data:

    DIR/cpuinfo   a copy of /proc/cpuinfo (the first ``flags`` and ``model name`` lines are used)
    DIR/lscpu     ``lscpu -p=CPU,CORE,SOCKET,NODE`` output
    DIR/node/     a copy of /sys/devices/system/node: nodeN/{cpulist,meminfo,distance}

``python -m affinity.machine --save DIR`` writes such a directory for this machine, so a
plan or a ``doctor`` report can be made for a cluster's compute node from a login node.

The kernel build (which ISA to compile for), ``doctor``, the training engine (whether bf16
is native) and ``lars-run`` (which node is HBM) all ask this module. Pure Python: no torch.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from affinity.cpuset import CpuListError, format_cpulist, parse_cpulist
from affinity.errors import UsageError
from affinity.topology import Topology, TopologyError, discover, load_topology

# Human names of the features we care about, and the /proc/cpuinfo flag behind each.
FEATURES = {
    "AVX2": "avx2",
    "FMA": "fma",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512DQ": "avx512dq",
    "AVX512ER": "avx512er",
    "AVX512PF": "avx512pf",
    "AVX512_BF16": "avx512_bf16",
    "AVX_NE_CONVERT": "avx_ne_convert",
    "AMX_BF16": "amx_bf16",
}
AVX512_CORE = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what at::vec's AVX512 path needs
ISAS = ("avx512", "avx2", "default")  # kernel build targets, best first
NATIVE_BF16 = ("avx512_bf16", "avx_ne_convert", "amx_bf16")


class MachineError(UsageError):
    """A machine description is missing or malformed; the message says how to make one."""


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's model name and instruction-set flags, as /proc/cpuinfo lists them."""

    model: str
    flags: frozenset[str]

    def has(self, *flags: str) -> bool:
        return set(flags) <= self.flags

    def isas(self) -> list[str]:
        """Every kernel ISA this CPU can execute, best first (``default`` always)."""
        out = []
        if self.has(*AVX512_CORE, "avx2", "fma"):
            out.append("avx512")
        if self.has("avx2", "fma"):
            out.append("avx2")
        return out + ["default"]

    @property
    def vector_isa(self) -> str:
        """The best ISA our kernels can be built for. A Xeon Phi (AVX-512 F without BW/VL/DQ) gets avx2."""
        return self.isas()[0]

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matmuls/convolutions run in hardware (else oneDNN emulates them, slower than fp32)."""
        return any(f in self.flags for f in NATIVE_BF16)

    def bf16_verdict(self) -> str:
        """One line: does this CPU compute bf16 natively, and through which instructions."""
        have = [name for name, flag in FEATURES.items() if flag in NATIVE_BF16 and flag in self.flags]
        if have:
            return f"native bf16 ({', '.join(have)})"
        return "no native bf16 (no AVX512_BF16, AVX_NE_CONVERT or AMX_BF16): bf16 is emulated, fp32 is faster"

    def ipex_bf16_missing(self) -> list[str]:
        """Instructions IPEX's bf16 weight prepack needs and this CPU lacks (empty when it can)."""
        if "avx_ne_convert" in self.flags or self.has("avx512bw", "avx512vl", "avx512dq"):
            return []
        return ["AVX_NE_CONVERT or AVX512BW+AVX512VL+AVX512DQ"]

    def feature_table(self) -> dict[str, bool]:
        return {name: flag in self.flags for name, flag in FEATURES.items()}


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The model name and flags of the first processor in /proc/cpuinfo text."""
    model, flags = "unknown", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
        if flags is not None and model != "unknown":
            break
    return CpuFeatures(model, flags or frozenset())


@dataclass(frozen=True)
class MemoryNode:
    """One NUMA node: its CPUs (none for HBM/MCDRAM in flat mode), memory size and distances."""

    node: int
    cpus: frozenset[int]
    mem_kb: int
    distance: dict[int, int] = field(default_factory=dict, compare=False)

    @property
    def memory_only(self) -> bool:
        """A node with memory and no CPU: HBM (Xeon Max) or MCDRAM (Xeon Phi) in flat mode."""
        return not self.cpus and self.mem_kb > 0

    def describe(self) -> str:
        where = f"CPUs {format_cpulist(self.cpus)}" if self.cpus else "no CPUs (HBM/MCDRAM-like)"
        return f"node {self.node}: {self.mem_kb / 2**20:.1f} GiB, {where}"


def read_memory_nodes(root: str | Path = "/sys/devices/system/node") -> list[MemoryNode]:
    """NUMA nodes from a sysfs node tree; empty when there is none (no NUMA support)."""
    root = Path(root)
    dirs = sorted((int(m.group(1)), p) for p in root.glob("node*") if (m := re.fullmatch(r"node(\d+)", p.name)))
    ids = [n for n, _ in dirs]
    nodes = []
    for n, path in dirs:
        try:
            cpus = parse_cpulist((path / "cpulist").read_text())
            mem = re.search(r"MemTotal:\s+(\d+)\s*kB", (path / "meminfo").read_text())
            dist = [int(x) for x in (path / "distance").read_text().split()]
        except (OSError, ValueError, CpuListError) as exc:
            raise MachineError(f"{path}: cannot read cpulist/meminfo/distance ({exc})") from None
        if mem is None:
            raise MachineError(f"{path}/meminfo has no 'Node {n} MemTotal: ... kB' line")
        if len(dist) != len(ids):
            raise MachineError(f"{path}/distance lists {len(dist)} distances for {len(ids)} nodes")
        nodes.append(MemoryNode(n, frozenset(cpus), int(mem.group(1)), dict(zip(ids, dist))))
    return nodes


@dataclass(frozen=True)
class Machine:
    """Everything this project needs to know about one machine, and where it was read from."""

    cpu: CpuFeatures
    memory_nodes: tuple[MemoryNode, ...]
    topology: Topology
    source: str

    def memory_only_nodes(self) -> list[MemoryNode]:
        return [m for m in self.memory_nodes if m.memory_only]

    def nearest_memory_only(self, node: int) -> int | None:
        """The HBM/MCDRAM node closest to CPU node ``node`` (lowest id on ties), or None if there is none."""
        here = next((m for m in self.memory_nodes if m.node == node), None)
        far = self.memory_only_nodes()
        if here is None or not far:
            return None
        return min(far, key=lambda m: (here.distance.get(m.node, 255), m.node)).node

    def summary(self) -> dict:
        """A JSON-able report: ISA, bf16 verdict, memory nodes (doctor and --dry-run use it)."""
        return {
            "source": self.source,
            "model": self.cpu.model,
            "features": self.cpu.feature_table(),
            "kernel_isa": self.cpu.vector_isa,
            "buildable_isas": self.cpu.isas(),
            "native_bf16": self.cpu.native_bf16,
            "bf16": self.cpu.bf16_verdict(),
            "ipex_bf16_missing": self.cpu.ipex_bf16_missing(),
            "memory_nodes": [
                {
                    "node": m.node,
                    "cpus": format_cpulist(m.cpus),
                    "mem_gib": round(m.mem_kb / 2**20, 1),
                    "memory_only": m.memory_only,
                    "distance": m.distance,
                }
                for m in self.memory_nodes
            ],
        }


def load_machine(path: str | Path) -> Machine:
    """A machine described as data in directory ``path`` (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise MachineError(
            f"machine description {root} is not a directory; make one on the target with "
            "`python -m affinity.machine --save DIR`"
        )
    try:
        cpu = parse_cpuinfo((root / "cpuinfo").read_text())
    except OSError as exc:
        raise MachineError(f"{root}/cpuinfo: {exc.strerror}; copy /proc/cpuinfo of the target there") from None
    try:
        topo = load_topology(root / "lscpu")
    except TopologyError as exc:
        raise MachineError(str(exc)) from None
    return Machine(cpu, tuple(read_memory_nodes(root / "node")), topo, str(root))


@functools.cache
def this_machine() -> Machine:
    """This machine, read once per process."""
    try:
        cpu = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = CpuFeatures("unknown", frozenset())
    try:
        nodes = tuple(read_memory_nodes())
    except MachineError:
        nodes = ()
    return Machine(cpu, nodes, discover(), "this machine")


def save_machine(dest: str | Path) -> Path:
    """Write this machine's description (cpuinfo, lscpu table, node tree) into ``dest``."""
    dest = Path(dest)
    (dest / "node").mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/proc/cpuinfo", dest / "cpuinfo")
    topo = this_machine().topology
    (dest / "lscpu").write_text(
        "# CPU,CORE,SOCKET,NODE\n" + "".join(f"{c.cpu},{c.core},{c.socket},{c.node}\n" for c in topo.cpus)
    )
    for m in this_machine().memory_nodes:
        d = dest / "node" / f"node{m.node}"
        d.mkdir(exist_ok=True)
        (d / "cpulist").write_text(format_cpulist(m.cpus) + "\n")
        (d / "meminfo").write_text(f"Node {m.node} MemTotal:       {m.mem_kb} kB\n")
        (d / "distance").write_text(" ".join(str(m.distance[k]) for k in sorted(m.distance)) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m affinity.machine", description="Describe this machine as data, to plan for it elsewhere."
    )
    parser.add_argument(
        "--save",
        metavar="DIR",
        required=True,
        help="write cpuinfo, lscpu and node/ here (use with lars-run --machine, doctor --machine)",
    )
    args = parser.parse_args(argv)
    try:
        print(f"wrote {save_machine(args.save)}")
    except OSError as exc:
        print(f"python -m affinity.machine: error: cannot write {args.save}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
