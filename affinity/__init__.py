"""CPU topology discovery and NUMA-aware pinning plans for multi-instance / multi-rank runs.

Pure Python (+ the standard library); it never imports torch, so a launcher can plan and
pin before any OpenMP runtime starts.
"""

from affinity.cpuset import allowed_cpus, format_cpulist, hex_mask, parse_cpulist
from affinity.plan import NodePlan, PlacementError, PlanRequest, RankPlan, make_plan, place_memory
from affinity.topology import Topology, TopologyError, discover, load_topology, parse_lscpu

__all__ = [
    "allowed_cpus",
    "format_cpulist",
    "hex_mask",
    "parse_cpulist",
    "NodePlan",
    "PlacementError",
    "PlanRequest",
    "RankPlan",
    "make_plan",
    "place_memory",
    "Topology",
    "TopologyError",
    "discover",
    "load_topology",
    "parse_lscpu",
]
