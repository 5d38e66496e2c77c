"""Pinning plans: which cores, NUMA node, memory node(s) and oneCCL worker cores each instance/rank gets.

Guarantees (tested): never a CPU outside the allowed set, never one core for two ranks,
never a rank across NUMA nodes when its cores fit in one; every deviation from the
ideal layout is explained by one line in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from affinity.cpuset import format_cpulist
from affinity.errors import UsageError
from affinity.topology import Core, Topology

if TYPE_CHECKING:  # only for hints: `python -m affinity.machine` must not find it imported already
    from affinity.machine import Machine


class PlacementError(UsageError):
    """The request cannot be satisfied on this topology; the message says how to fix it."""


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for (mirrors the ipexrun flags).

    ``ncores_per_instance`` counts OpenMP (compute) cores; dedicated oneCCL worker cores
    come on top. None means "as many as fit evenly".
    """

    ninstances: int | None = None
    ncores_per_instance: int | None = None
    nodes_list: tuple[int, ...] | None = None
    use_logical_cores: bool = False
    ccl_worker_count: int = 0
    logical_cores_for_ccl: bool = False
    mode: str | None = None  # None, "throughput" or "latency"


@dataclass(frozen=True)
class RankPlan:
    """One instance/rank on one machine.

    ``memory_nodes`` and ``memory_policy`` say where its memory goes: ``membind`` (only those
    nodes; :func:`make_plan` binds to the rank's own CPU nodes) or ``preferred`` (that node first,
    others when it is full; see :func:`place_memory`).
    """

    local_rank: int
    numa_nodes: tuple[int, ...]
    cores: tuple[int, ...]
    ccl_worker_cores: tuple[int, ...] = ()
    memory_nodes: tuple[int, ...] = ()
    memory_policy: str = "membind"

    @property
    def numa_node(self) -> int:
        """The node holding most of the rank's cores (memory is bound to all of ``numa_nodes``)."""
        return self.numa_nodes[0]

    @property
    def cpus(self) -> tuple[int, ...]:
        """Every CPU the process must be allowed on: compute cores plus oneCCL worker cores."""
        return tuple(sorted(set(self.cores) | set(self.ccl_worker_cores)))


@dataclass
class NodePlan:
    """The plan for one machine; multi-node launches repeat it on every (identical) host."""

    ranks: list[RankPlan]
    topology: dict
    allowed: str
    notes: list[str] = field(default_factory=list)
    ccl_worker_count: int = 0  # oneCCL workers per rank (they may share ``ccl_worker_cores``)


LATENCY_CORES = 4


def _units(cores: list[Core], logical: bool) -> list[int]:
    """Schedulable CPUs of a node: primary threads, or every thread core by core."""
    return [t for k in cores for t in k.threads] if logical else [k.primary for k in cores]


def _select_nodes(topo: Topology, full: Topology, nodes_list: tuple[int, ...] | None) -> list[int]:
    if nodes_list is None:
        return topo.nodes
    for n in nodes_list:
        if n not in full.nodes:
            raise PlacementError(
                f"NUMA node {n} in --nodes-list does not exist (nodes: {format_cpulist(full.nodes)}); fix --nodes-list"
            )
        if n not in topo.nodes:
            raise PlacementError(
                f"NUMA node {n} in --nodes-list has no CPU this process may use "
                f"(allowed: {format_cpulist(topo.cpu_ids)}); pick another node"
            )
    return sorted(set(nodes_list))


def _auto_chunk(capacity: list[int], n: int) -> int:
    """Largest per-rank unit count that still lets n ranks fit inside single nodes."""
    best = 1
    for c in range(1, max(capacity) + 1):
        if sum(u // c for u in capacity) >= n:
            best = c
    return best


def _spread(capacity: list[int], n: int) -> list[int]:
    """Ranks per node: round-robin over nodes with room left, so nodes fill evenly."""
    counts = [0] * len(capacity)
    placed = 0
    while placed < n:
        for i, cap in enumerate(capacity):
            if placed < n and counts[i] < cap:
                counts[i] += 1
                placed += 1
    return counts


def make_plan(full: Topology, allowed: set[int], req: PlanRequest) -> NodePlan:
    """Plan ``req`` on ``full`` restricted to ``allowed``. Raises PlacementError with the fix."""
    topo = full.restricted(allowed)
    if not topo.cpus:
        raise PlacementError(
            f"none of the allowed CPUs ({format_cpulist(allowed) or 'none'}) is in the "
            f"topology (CPUs {format_cpulist(full.cpu_ids)}); check --allowed-cpus/--topology"
        )
    notes = list(topo.notes)
    nodes = _select_nodes(topo, full, req.nodes_list)
    node_cores = {n: topo.cores(n) for n in nodes}
    units = {n: _units(node_cores[n], req.use_logical_cores) for n in nodes}
    total = sum(len(u) for u in units.values())
    sibling_of = {k.primary: k.siblings for n in nodes for k in node_cores[n]}

    k = req.ccl_worker_count
    if k < 0:
        raise PlacementError("--ccl-worker-count must be >= 0")
    on_siblings = k > 0 and req.logical_cores_for_ccl and not req.use_logical_cores
    if on_siblings and not all(sibling_of.values()):
        on_siblings = False
        notes.append(
            "no hyper-thread sibling on every core for oneCCL workers; workers get dedicated physical cores instead"
        )
    dedicated = k if (k > 0 and not on_siblings) else 0

    capacity = [len(units[x]) for x in nodes]
    ncores = req.ncores_per_instance
    n = req.ninstances
    if req.mode == "latency" and ncores is None:
        ncores = max(1, min(LATENCY_CORES, max(capacity) - dedicated))
        if ncores < LATENCY_CORES:
            notes.append(
                f"latency mode: {ncores} core(s) per instance, the most one NUMA node allows "
                f"(the usual is {LATENCY_CORES})"
            )
    if n is None:
        n = max(1, total // (ncores + dedicated)) if req.mode == "latency" and ncores else len(nodes)
    if n < 1 or (ncores is not None and ncores < 1):
        raise PlacementError("--ninstances and --ncores-per-instance must be >= 1")
    if n > total:
        raise PlacementError(
            f"{n} instances need at least {n} cores but only {total} allowed "
            f"{'CPUs' if req.use_logical_cores else 'physical cores'} are on NUMA node(s) "
            f"{format_cpulist(nodes)} ({format_cpulist(u for v in units.values() for u in v)}); "
            "lower --ninstances"
        )

    if ncores is None:
        chunk = _auto_chunk(capacity, n)
        if chunk <= dedicated:
            notes.append(
                f"oneCCL workers share the last compute core of each rank: {chunk} core(s) per "
                f"rank leave none spare for {k} dedicated worker(s)"
            )
            dedicated = 0
    else:
        chunk = ncores + dedicated
    if n * chunk > total:
        raise PlacementError(
            f"{n} instances x {chunk} cores need {n * chunk} cores but only {total} are "
            f"allowed on NUMA node(s) {format_cpulist(nodes)}; lower --ninstances or "
            "--ncores-per-instance (or --ccl-worker-count)"
        )

    chunks: list[tuple[list[int], list[int]]] = []  # (units, their nodes)
    if sum(c // chunk for c in capacity) >= n:
        for node, count in zip(nodes, _spread([c // chunk for c in capacity], n)):
            for j in range(count):
                chunks.append((units[node][j * chunk : (j + 1) * chunk], [node]))
    else:
        flat = [(u, node) for node in nodes for u in units[node]]
        for j in range(n):
            part = flat[j * chunk : (j + 1) * chunk]
            chunks.append(([u for u, _ in part], [x for _, x in part]))
        notes.append(
            f"ranks span NUMA nodes: {chunk} cores per rank do not fit in one node "
            f"(at most {max(capacity)} allowed per node)"
        )

    ranks: list[RankPlan] = []
    for i, (cpus, where) in enumerate(chunks):
        cores, ccl = list(cpus), []
        if dedicated:
            cores, ccl = cpus[:-dedicated], cpus[-dedicated:]
        elif on_siblings:
            ccl = [s for c in reversed(cores) for s in sibling_of[c]][:k]
        elif k:
            ccl = cores[-1:]
        order = sorted(set(where), key=lambda x: (-where.count(x), x))
        ranks.append(RankPlan(i, tuple(order), tuple(cores), tuple(sorted(set(ccl))), memory_nodes=tuple(order)))
    tpc = max(len(c.threads) for cs in node_cores.values() for c in cs)
    if req.use_logical_cores and chunk % tpc:
        notes.append(
            f"ranks may share physical cores: {chunk} logical CPUs per rank is not a multiple of {tpc} threads per core"
        )
    used = {c for r in ranks for c in r.cpus}
    idle = [u for node in nodes for u in units[node] if u not in used]
    if idle:
        why = (
            f"{n} rank(s) x {chunk} core(s) were asked for"
            if req.ncores_per_instance or req.mode == "latency"
            else f"{n} rank(s) of {chunk} core(s) is the largest even split that keeps ranks inside NUMA nodes"
        )
        notes.append(f"{len(idle)} allowed core(s) left idle ({format_cpulist(idle)}): {why}")
    crowded = [r.local_rank for r in ranks if k and len(r.ccl_worker_cores) < k]
    if crowded and (dedicated or on_siblings):
        notes.append(
            f"rank(s) {format_cpulist(crowded)}: fewer free cores than the {k} oneCCL workers; workers share cores"
        )
    return NodePlan(ranks, full.summary(), format_cpulist(topo.cpu_ids), notes, k)


def place_memory(plan: NodePlan, request: str, machine: Machine | None) -> None:
    """Apply ``--memory-node REQUEST`` to every rank of ``plan`` (``machine`` None: only CPUs are known).

    ``ddr`` keeps the binding to the rank's own CPU nodes. ``hbm`` prefers the CPU-less node
    (HBM or MCDRAM in flat mode) nearest to the rank's main node; a node number prefers that
    node. Preferred memory spills to other nodes when full instead of failing. Raises PlacementError.
    """
    if request == "ddr":
        return
    if machine is None:
        raise PlacementError(
            f"--memory-node {request} needs the machine's memory nodes, which an lscpu file does "
            "not list; plan with --machine DIR (`python -m affinity.machine --save DIR` on the target)"
        )
    if request == "hbm":
        hbm = machine.memory_only_nodes()
        if not hbm:
            why = (
                "every NUMA node has CPUs (is the memory in cache mode?)"
                if machine.memory_nodes
                else "no NUMA memory nodes are visible"
            )
            raise PlacementError(
                f"--memory-node hbm: no HBM/MCDRAM node on {machine.source}: {why}; drop --memory-node or use ddr"
            )
        targets = [machine.nearest_memory_only(r.numa_node) for r in plan.ranks]
        lost = sorted({r.numa_node for r, t in zip(plan.ranks, targets) if t is None})
        if lost:
            raise PlacementError(
                f"--memory-node hbm: CPU node(s) {format_cpulist(lost)} missing from the NUMA node "
                f"list of {machine.source}; re-save the machine description"
            )
        for m in hbm:
            sharing = targets.count(m.node)
            if sharing > 1:
                plan.notes.append(
                    f"{sharing} ranks share HBM/MCDRAM node {m.node} ({m.mem_kb / 2**20:.1f} GiB); "
                    "what does not fit there spills to DDR"
                )
    else:
        node = int(request)
        usable = [m.node for m in machine.memory_nodes if m.mem_kb > 0]
        if node not in usable:
            raise PlacementError(
                f"--memory-node {node}: no NUMA node {node} with memory on {machine.source} (nodes: "
                f"{format_cpulist(usable) or 'none'}); pick one of them, hbm or ddr"
            )
        targets = [node] * len(plan.ranks)
    plan.ranks = [replace(r, memory_nodes=(t,), memory_policy="preferred") for r, t in zip(plan.ranks, targets)]
