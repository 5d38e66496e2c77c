"""Build an ``srun`` command: Slurm starts the ranks, ``--cpu-bind=mask_cpu`` pins them, and
:mod:`launchers.rank_exec` gives each local rank its own affinity variables (and, to place
memory, its own ``numactl`` prefix: srun's ``--mem-bind`` only acts where Slurm's task/affinity
plugin is configured, while numactl either acts or fails the rank loudly). Each task runs under
:mod:`launchers.guard`, which enforces the grace period and names a failed rank; srun relays
SIGTERM to the tasks and ``--kill-on-bad-exit`` ends the job when one fails."""

from __future__ import annotations

import json
import os
import shlex
import sys

from affinity.cpuset import hex_mask
from affinity.plan import NodePlan
from affinity.rank_env import EnvChoice, merge_preload, rank_env
from launchers import guard
from launchers.job import Job, job_ranks
from launchers.local import memory_options
from launchers.mpi import split_env
from launchers.rank_exec import ENV_VAR, PREFIX_VAR


def build(
    node_plan: NodePlan,
    hosts: list[str],
    program: list[str],
    choice: EnvChoice,
    *,
    master_addr: str | None,
    master_port: int | None,
    nodefile: str | None,
    log_dir: str | None = None,
    bind_memory: bool = False,
    grace: float,
) -> Job:
    """``master_addr``/``master_port``: passed to the ranks only when given (None: each rank derives
    them from Slurm, the step's first node and the job id, see ipex_lars.distributed.env);
    ``nodefile``: pass the hosts to srun in this file (written at launch; they came from a hostfile)
    instead of letting Slurm pick; ``log_dir``: one ``rank_<rank>.log`` per rank; ``bind_memory``:
    each rank runs under numactl placing its memory as its plan says; ``grace``: seconds between stop
    and SIGKILL (guard). The command's size depends on ranks per node, not on the node count."""
    per_node = len(node_plan.ranks)
    prefixes = [["numactl", *memory_options(r)] if bind_memory else [] for r in node_plan.ranks]
    given = {k: str(v) for k, v in (("MASTER_ADDR", master_addr), ("MASTER_PORT", master_port)) if v is not None}
    ranks = job_ranks(
        hosts,
        node_plan,
        program,
        lambda n, r: {**merge_preload(rank_env(r, node_plan, choice, ccl=True), os.environ.get("LD_PRELOAD")), **given},
        lambda r: prefixes[r.local_rank],
    )
    common, own = split_env([r.env for r in ranks])
    masks = ",".join(hex_mask(r.cpus) for r in node_plan.ranks)
    command = [
        "srun",
        f"--nodes={len(hosts)}",
        f"--ntasks-per-node={per_node}",
        f"--ntasks={len(ranks)}",
        f"--cpus-per-task={max(len(r.cpus) for r in node_plan.ranks)}",
        f"--cpu-bind=mask_cpu:{masks}",
        "--kill-on-bad-exit=1",
    ]
    if log_dir:
        command += [
            f"--output={os.path.join(log_dir, 'rank_%t.log')}",
            f"--error={os.path.join(log_dir, 'rank_%t.log')}",
        ]
    files = {}
    if nodefile:
        command.append(f"--nodefile={nodefile}")
        files[nodefile] = "".join(f"{h}\n" for h in hosts)
    command += [
        *guard.command(grace, pmi_abort=False, usr2_stops=True),
        sys.executable,
        "-m",
        "launchers.rank_exec",
        "--",
        *program,
    ]
    launch_env = dict(common, **{ENV_VAR: json.dumps(own[:per_node])})
    if bind_memory:
        launch_env[PREFIX_VAR] = json.dumps(prefixes)
    notes = list(node_plan.notes)
    if len(given) < 2:
        notes.append(
            "MASTER_ADDR/MASTER_PORT not set by lars-run: each rank derives them from Slurm (the step's "
            "first node; port 20000 + job id % 20000)"
            if not given
            else f"{', '.join(given)} as given; the rest derived by each rank from Slurm"
        )
    return Job(
        "slurm",
        "srun --cpu-bind",
        hosts,
        node_plan,
        ranks,
        command,
        launch_env,
        notes,
        binds_memory=bind_memory,
        files=files,
    )


def sbatch_script(job: Job, argv: list[str]) -> str:
    """A batch script that allocates what ``job`` needs and runs ``lars-run ARGV`` inside it, where
    lars-run takes the nodes, master address and port from the allocation."""
    per_node = len(job.node_plan.ranks)
    cpus = max(len(r.cpus) for r in job.node_plan.ranks)
    rerun = [a for a in argv if a != "--print-sbatch"]
    return "\n".join(
        [
            "#!/bin/bash",
            "# written by lars-run --print-sbatch; submit with: sbatch THIS_FILE",
            "#SBATCH --job-name=lars-run",
            f"#SBATCH --nodes={len(job.hosts)}",
            f"#SBATCH --ntasks-per-node={per_node}",
            f"#SBATCH --cpus-per-task={cpus}",
            "#SBATCH --output=lars-run-%j.out",
            "# ranks per node and CPUs per task as planned from "
            f"{job.node_plan.topology.get('source', 'this machine')}; "
            "every compute node must hold them",
            "set -euo pipefail",
            "exec " + shlex.join([sys.executable, "-m", "launchers", *rerun]),
            "",
        ]
    )
