"""What a launch will do, as data: hosts, ranks with their cores, env and command.

Every launcher builds a :class:`Job`; ``--dry-run --json`` prints it, otherwise the
launcher runs it. Keeping the plan as data is what makes the dry run exact.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from affinity.cpuset import format_cpulist
from affinity.errors import UsageError
from affinity.plan import NodePlan, RankPlan


class LaunchError(UsageError):
    """Bad input or an unusable environment; the message names the problem and the fix."""


def job_ranks(
    hosts: list[str],
    node_plan: NodePlan,
    program: list[str],
    env_of: Callable[[int, RankPlan], dict[str, str]],
    prefix_of: Callable[[RankPlan], list[str]] = lambda r: [],
) -> list[RankLaunch]:
    """Every rank of a job over ``hosts`` in host order, ``node_plan``'s ranks on each: rank =
    node index x ranks per node + local rank. ``env_of(node, rank_plan)`` gives a rank's
    variables and ``prefix_of(rank_plan)`` what its program runs under (e.g. numactl)."""
    per_node = len(node_plan.ranks)
    return [
        RankLaunch(n * per_node + r.local_rank, r.local_rank, host, r, env_of(n, r), prefix_of(r) + program)
        for n, host in enumerate(hosts)
        for r in node_plan.ranks
    ]


def make_log_dir(log_dir: str | None) -> Path | None:
    """Create ``--log-dir`` (None when not given); a clear LaunchError if that is impossible."""
    if not log_dir:
        return None
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"cannot create --log-dir {log_dir}: {exc.strerror}; pick a writable directory") from None
    return Path(log_dir)


@dataclass
class RankLaunch:
    """One process of the job."""

    rank: int
    local_rank: int
    host: str
    plan: RankPlan
    env: dict[str, str]
    command: list[str]

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "host": self.host,
            "numa_node": self.plan.numa_node,
            "numa_nodes": list(self.plan.numa_nodes),
            "cores": list(self.plan.cores),
            "ccl_worker_cores": list(self.plan.ccl_worker_cores),
            "env": self.env,
            "command": self.command,
        }


@dataclass
class Job:
    """The whole launch. ``command`` is the single outer command (mpiexec/srun) or None when
    the launcher spawns each rank itself; ``launch_env`` is added to that outer command's env.
    ``binds_memory``: ranks' memory is placed as their plans say (numactl), else first touch."""

    launcher: str
    binder: str
    hosts: list[str]
    node_plan: NodePlan
    ranks: list[RankLaunch]
    command: list[str] | None = None
    launch_env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    binds_memory: bool = False
    files: dict[str, str] = field(default_factory=dict)  # written before the command runs, removed after

    def memory(self, rank: RankLaunch) -> tuple[str, tuple[int, ...]]:
        """(policy, nodes) of the rank's memory: ``membind``/``preferred``, or ``first-touch`` and ()."""
        if not self.binds_memory:
            return "first-touch", ()
        return rank.plan.memory_policy, rank.plan.memory_nodes

    def to_dict(self) -> dict:
        nodes = [
            {"node_rank": i, "host": h, "topology": self.node_plan.topology, "allowed_cpus": self.node_plan.allowed}
            for i, h in enumerate(self.hosts)
        ]
        ranks = []
        for r in self.ranks:
            policy, mem = self.memory(r)
            ranks.append(dict(r.to_dict(), memory_policy=policy, memory_nodes=list(mem) if mem else None))
        return {
            "launcher": self.launcher,
            "binder": self.binder,
            "command": self.command,
            "launch_env": self.launch_env,
            "files": self.files,
            "nodes": nodes,
            "ranks": ranks,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """Human-readable plan for ``--dry-run`` without ``--json``."""
        lines = [
            f"launcher: {self.launcher}   binder: {self.binder}   hosts: {', '.join(self.hosts)}",
            f"{'rank':>4} {'local':>5}  {'host':<16} {'node':>4}  {'cores':<16} {'ccl':<8} {'memory':<14} command",
        ]
        for r in self.ranks:
            policy, mem = self.memory(r)
            memory = f"{policy} {format_cpulist(mem)}".strip()
            lines.append(
                f"{r.rank:>4} {r.local_rank:>5}  {r.host:<16} "
                f"{format_cpulist(r.plan.numa_nodes):>4}  {format_cpulist(r.plan.cores):<16} "
                f"{format_cpulist(r.plan.ccl_worker_cores) or '-':<8} {memory:<14} {' '.join(r.command)}"
            )
        if self.command:
            lines.append("command: " + shlex.join(self.command))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
