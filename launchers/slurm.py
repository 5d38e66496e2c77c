"""Build an ``srun`` command: Slurm starts the ranks, ``--cpu-bind=mask_cpu`` pins them, and
:mod:`launchers.rank_exec` gives each local rank its own affinity variables (and, to place
memory, its own ``numactl`` prefix: srun's ``--mem-bind`` only acts where Slurm's task/affinity
plugin is configured, while numactl either acts or fails the rank loudly). Each task runs under
:mod:`launchers.guard`, which enforces the grace period and names a failed rank; srun relays
SIGTERM to the tasks and ``--kill-on-bad-exit`` ends the job when one fails."""

from __future__ import annotations

import json
import os
import sys

from affinity.cpuset import hex_mask
from affinity.env import EnvChoice, merge_preload, rank_env
from affinity.plan import NodePlan
from launchers import guard
from launchers.job import Job, RankLaunch
from launchers.local import memory_options
from launchers.mpi import split_env
from launchers.rank_exec import ENV_VAR, PREFIX_VAR


def build(node_plan: NodePlan, hosts: list[str], program: list[str], choice: EnvChoice, *,
          master_addr: str, master_port: int, nodelist: bool, log_dir: str | None = None,
          bind_memory: bool = False, grace: float) -> Job:
    """``nodelist``: pass ``--nodelist`` (hosts came from a hostfile) instead of letting Slurm pick;
    ``log_dir``: one ``rank_<rank>.log`` per rank; ``bind_memory``: each rank runs under numactl
    placing its memory as its plan says; ``grace``: seconds between stop and SIGKILL (guard)."""
    per_node = len(node_plan.ranks)
    prefixes = [["numactl", *memory_options(r)] if bind_memory else [] for r in node_plan.ranks]
    ranks: list[RankLaunch] = []
    for n, host in enumerate(hosts):
        for r in node_plan.ranks:
            env = merge_preload(rank_env(r, node_plan, choice, ccl=True), os.environ.get("LD_PRELOAD"))
            env.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            ranks.append(RankLaunch(n * per_node + r.local_rank, r.local_rank, host, r, env,
                                    prefixes[r.local_rank] + program))
    common, own = split_env([r.env for r in ranks])
    masks = ",".join(hex_mask(r.cpus) for r in node_plan.ranks)
    command = ["srun", f"--nodes={len(hosts)}", f"--ntasks-per-node={per_node}",
               f"--ntasks={len(ranks)}", f"--cpu-bind=mask_cpu:{masks}", "--kill-on-bad-exit=1"]
    if log_dir:
        command += [f"--output={os.path.join(log_dir, 'rank_%t.log')}", f"--error={os.path.join(log_dir, 'rank_%t.log')}"]
    if nodelist:
        command.append("--nodelist=" + ",".join(hosts))
    command += [*guard.command(grace, pmi_abort=False), sys.executable, "-m", "launchers.rank_exec", "--", *program]
    launch_env = dict(common, **{ENV_VAR: json.dumps(own[:per_node])})
    if bind_memory:
        launch_env[PREFIX_VAR] = json.dumps(prefixes)
    return Job("slurm", "srun --cpu-bind", hosts, node_plan, ranks, command, launch_env,
               list(node_plan.notes), binds_memory=bind_memory)
