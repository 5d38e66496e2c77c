"""Build and run an Intel MPI (``mpiexec.hydra`` from impi-rt) command for a multi-rank job.

Ranks are pinned by ``I_MPI_PIN_DOMAIN`` (one hex mask per local rank, identical on every
node). The command uses MPMD argument sets, one per rank with ``-host`` and ``-n 1``, so
variables that differ between ranks (explicit OpenMP affinity lists) travel with ``-env``
and the rest once with ``-genv``. Intel MPI places no memory; with ``bind_memory`` each
rank's argument set starts its program under ``numactl --membind/--preferred``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from affinity.env import EnvChoice, merge_preload, mpi_pin_domain, rank_env
from affinity.plan import NodePlan
from launchers.job import Job, LaunchError, RankLaunch, make_log_dir
from launchers.local import memory_options

MPIEXEC = "mpiexec.hydra"


def find_mpiexec(explicit: str | None = None) -> str | None:
    """``--mpiexec``, else mpiexec.hydra next to this Python (the venv's impi-rt), else on $PATH."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = os.path.join(os.path.dirname(sys.executable), MPIEXEC)
    return beside if os.access(beside, os.X_OK) else shutil.which(MPIEXEC)


def split_env(envs: list[dict[str, str]]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(variables equal for all ranks, per-rank remainder), so the command states each once."""
    common = {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs)}
    return common, [{k: v for k, v in e.items() if k not in common} for e in envs]


def build(node_plan: NodePlan, hosts: list[str], program: list[str], choice: EnvChoice, *,
          master_addr: str, master_port: int, mpiexec: str, log_dir: str | None = None,
          bind_memory: bool = False) -> Job:
    """One rank per plan entry on every host, in host order (rank = node * nprocs + local);
    with ``log_dir`` each rank's stdout+stderr go to ``log_dir/rank_<rank>.log``; with
    ``bind_memory`` each rank runs under numactl placing its memory as its plan says."""
    domain = mpi_pin_domain(node_plan)
    ranks: list[RankLaunch] = []
    for n, host in enumerate(hosts):
        for r in node_plan.ranks:
            env = merge_preload(rank_env(r, node_plan, choice, ccl=True), os.environ.get("LD_PRELOAD"))
            env.update(I_MPI_PIN_DOMAIN=domain, MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            prefix = ["numactl", *memory_options(r)] if bind_memory else []
            ranks.append(RankLaunch(n * len(node_plan.ranks) + r.local_rank, r.local_rank, host, r,
                                    env, prefix + program))
    common, own = split_env([r.env for r in ranks])
    command = [mpiexec]
    if log_dir:
        pattern = os.path.join(log_dir, "rank_%r.log")
        command += ["-outfile-pattern", pattern, "-errfile-pattern", pattern]
    for k, v in common.items():
        command += ["-genv", k, v]
    for i, (rank, extra) in enumerate(zip(ranks, own)):
        if i:
            command.append(":")
        command += ["-host", rank.host, "-n", "1"]
        for k, v in extra.items():
            command += ["-env", k, v]
        command += rank.command
    # hydra starts its proxies by name: its own bin directory must be on PATH
    bindir, path = os.path.dirname(mpiexec), os.environ.get("PATH", "")
    launch_env = {"PATH": bindir + os.pathsep + path} if bindir and bindir not in path.split(os.pathsep) else {}
    return Job("mpi", "I_MPI_PIN_DOMAIN", hosts, node_plan, ranks, command, launch_env,
               list(node_plan.notes), binds_memory=bind_memory)


def run_outer(job: Job, log_dir: str | None = None) -> int:
    """Run the job's single outer command (mpiexec or srun) and return its exit code."""
    assert job.command is not None
    make_log_dir(log_dir)
    env = dict(os.environ)
    env.update(job.launch_env)
    try:
        rc = subprocess.run(job.command, env=env).returncode
    except FileNotFoundError:
        raise LaunchError(f"{job.command[0]} not found; install it or put it on PATH") from None
    except KeyboardInterrupt:
        return 130
    return 128 - rc if rc < 0 else rc
