"""torch.distributed ``env://`` launch without torchrun: spawn this node's ranks, pinned, each
with RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.

Run ``lars-run --launcher torchrun-env --node-rank I ...`` once on every node. oneCCL,
which has no PMI here, learns its local index from CCL_LOCAL_RANK / CCL_LOCAL_SIZE.
"""

from __future__ import annotations

from dataclasses import replace

from affinity.plan import NodePlan, RankPlan
from affinity.rank_env import EnvChoice, rank_env
from launchers.job import Job, job_ranks
from launchers.local import bind_prefix


def build(
    node_plan: NodePlan,
    hosts: list[str],
    program: list[str],
    choice: EnvChoice,
    binder: str,
    *,
    master_addr: str,
    master_port: int,
) -> Job:
    """Ranks of every node (the dry run shows them all); :func:`this_node` selects what to spawn."""
    per_node = len(node_plan.ranks)
    world = per_node * len(hosts)

    def env_of(n: int, r: RankPlan) -> dict[str, str]:
        return {
            **rank_env(r, node_plan, choice, ccl=True),
            "RANK": str(n * per_node + r.local_rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r.local_rank),
            "LOCAL_WORLD_SIZE": str(per_node),
            "GROUP_RANK": str(n),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "CCL_LOCAL_RANK": str(r.local_rank),
            "CCL_LOCAL_SIZE": str(per_node),
        }

    ranks = job_ranks(hosts, node_plan, program, env_of, lambda r: bind_prefix(binder, r))
    return Job(
        "torchrun-env", binder, hosts, node_plan, ranks, notes=list(node_plan.notes), binds_memory=binder == "numactl"
    )


def this_node(job: Job, node_rank: int) -> Job:
    """The same job restricted to the ranks of node ``node_rank`` (what this machine spawns)."""
    host = job.hosts[node_rank]
    return replace(job, ranks=[r for r in job.ranks if r.host == host])
