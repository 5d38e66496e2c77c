"""What a node needs to plan its own ranks: the request, not the answer.

The mpi launcher sends every node the same small :class:`RankSpec` (``LARS_RANK_PLAN``) instead
of one argument set per rank, so the mpiexec command has the same size for 2 or 4,096 ranks.
Each rank's shim (:mod:`launchers.rank_exec`) then plans on its own node, from that node's CPUs,
cgroup cpuset and NUMA nodes: a node with fewer cores, another numbering or another cpuset gets
a plan of its own, as long as it can hold the ranks per node every node runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from affinity.cpuset import allowed_cpus, format_cpulist, parse_cpulist
from affinity.machine import this_machine
from affinity.plan import NodePlan, PlacementError, PlanRequest, make_plan, place_memory
from affinity.rank_env import EnvChoice, resolve

SPEC_VAR = "LARS_RANK_PLAN"


@dataclass(frozen=True)
class RankSpec:
    """The flags that decide a node's plan. ``allowed``: ``--allowed-cpus`` (None: the node's own
    scheduler mask and cgroup cpuset); ``memory_node``: ``--memory-node`` (None: first touch)."""

    request: PlanRequest
    allowed: str | None
    memory_allocator: str
    omp_runtime: str
    memory_node: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        raw = json.loads(text)
        req = dict(raw["request"])
        if req.get("nodes_list") is not None:
            req["nodes_list"] = tuple(req["nodes_list"])
        return cls(PlanRequest(**req), raw["allowed"], raw["memory_allocator"], raw["omp_runtime"], raw["memory_node"])


def plan_here(spec: RankSpec) -> tuple[NodePlan, EnvChoice]:
    """This node's plan and runtime libraries for ``spec``; raises PlacementError/EnvError/... naming the problem."""
    machine = this_machine()
    allowed = allowed_cpus()
    if spec.allowed is not None:
        wanted = parse_cpulist(spec.allowed)
        if not wanted <= allowed:
            raise PlacementError(
                f"--allowed-cpus {spec.allowed} includes CPUs this node may not use (allowed here: "
                f"{format_cpulist(allowed)})"
            )
        allowed = wanted
    plan = make_plan(machine.topology, allowed, spec.request)
    if spec.memory_node is not None:
        place_memory(plan, spec.memory_node, machine)
    return plan, resolve(spec.memory_allocator, spec.omp_runtime)
