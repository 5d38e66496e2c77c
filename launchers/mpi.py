"""Build and run an Intel MPI (``mpiexec.hydra`` from impi-rt) command for a multi-rank job.

Ranks are pinned by ``I_MPI_PIN_DOMAIN`` (one hex mask per local rank, identical on every
node). The command uses MPMD argument sets, one per rank with ``-host`` and ``-n 1``, so
variables that differ between ranks (explicit OpenMP affinity lists) travel with ``-env``
and the rest once with ``-genv``. Intel MPI places no memory; with ``bind_memory`` each
rank's argument set starts its program under ``numactl --membind/--preferred``.

Each program runs under :mod:`launchers.guard`. What hydra (Intel MPI 2021.18) does, measured:
SIGTERM and SIGINT to mpiexec are relayed to every rank, and mpiexec then waits for them,
however long; a second SIGINT, a SIGHUP or mpiexec's death ends mpiexec at once, and its
proxies send the ranks ``I_MPI_JOB_ABORT_SIGNAL`` and exit without waiting; a rank that exits
non-zero without using MPI leaves the others running; ``cmd=abort`` over PMI sends every rank
``I_MPI_JOB_ABORT_SIGNAL``. That signal is SIGKILL unless set; lars-run sets SIGTERM so ranks
can save, sends mpiexec SIGTERM or SIGINT only once, and the guards enforce the grace period
(also for ranks the proxies left behind) and abort the job when their rank fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from affinity.env import EnvChoice, merge_preload, mpi_pin_domain, rank_env
from affinity.plan import NodePlan
from launchers import guard
from launchers.job import Job, LaunchError, RankLaunch, make_log_dir
from launchers.local import memory_options
from launchers.supervise import Child, JobRun, catching, child_setup, to_ranks, to_srun

MPIEXEC = "mpiexec.hydra"
ABORT_SIGNAL = "I_MPI_JOB_ABORT_SIGNAL"


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
          bind_memory: bool = False, grace: float) -> Job:
    """One rank per plan entry on every host, in host order (rank = node * nprocs + local);
    with ``log_dir`` each rank's stdout+stderr go to ``log_dir/rank_<rank>.log``; with
    ``bind_memory`` each rank runs under numactl placing its memory as its plan says; each
    program runs under :mod:`launchers.guard` with ``grace`` seconds between stop and SIGKILL."""
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
    guarded = guard.command(grace, pmi_abort=True)
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
        command += guarded + rank.command
    # hydra starts its proxies by name: its own bin directory must be on PATH
    bindir, path = os.path.dirname(mpiexec), os.environ.get("PATH", "")
    launch_env = {"PATH": bindir + os.pathsep + path} if bindir and bindir not in path.split(os.pathsep) else {}
    if ABORT_SIGNAL not in os.environ:  # a failed rank's guard aborts the job: others get SIGTERM, not SIGKILL
        launch_env[ABORT_SIGNAL] = str(int(signal.SIGTERM))
    return Job("mpi", "I_MPI_PIN_DOMAIN", hosts, node_plan, ranks, command, launch_env,
               list(node_plan.notes), binds_memory=bind_memory)


def run_outer(job: Job, log_dir: str | None, grace: float) -> int:
    """Run the job's single outer command (mpiexec or srun) in a session of its own and supervise
    it: stop signals go to it once (srun gets SIGTERM for each), a few seconds after ``grace`` (the
    guards' own limit) its whole session here is SIGKILLed, and so is mpiexec if lars-run dies (its
    proxies then send the ranks SIGTERM). Returns lars-run's exit code."""
    assert job.command is not None
    make_log_dir(log_dir)
    env = dict(os.environ)
    env.update(job.launch_env)
    with catching() as pending:
        try:
            proc = subprocess.Popen(job.command, env=env, start_new_session=True,
                                    preexec_fn=child_setup(signal.SIGKILL))
        except FileNotFoundError:
            raise LaunchError(f"{job.command[0]} not found; install it or put it on PATH") from None
        translate = to_srun if job.launcher == "slurm" else to_ranks
        child = Child(Path(job.command[0]).name, proc, relays=True)
        code = JobRun([child], grace, pending, translate=translate).run()
    if code and log_dir:
        for line in guard_reports(Path(log_dir)):
            print(line, file=sys.stderr)
    return code


def guard_reports(log_dir: Path) -> list[str]:
    """The guards' lines (a rank failed or was killed) from the ranks' logs, which hold their stderr."""
    return [line for log in sorted(log_dir.glob("rank_*.log"))
            for line in log.read_text(errors="replace").splitlines() if line.startswith("lars-run: rank ")]
