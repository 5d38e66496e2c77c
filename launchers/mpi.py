"""Build and run an Intel MPI (``mpiexec.hydra`` from impi-rt) command for a multi-rank job.

The command has ipexrun's shape, ``mpiexec.hydra -np N -ppn P -hostfile F -genv ... PROGRAM``,
and the same size for any number of ranks: the hosts go in a file lars-run writes, and what
differs per rank (cores, OpenMP affinity, oneCCL workers, numactl for memory) is worked out on
each node by the shim :mod:`launchers.rank_exec` from ``MPI_LOCALRANKID`` and the node's own
topology (``LARS_RANK_PLAN``), so nodes that differ get plans of their own. hydra's pinning is
off (``I_MPI_PIN=0``): the shim pins each rank to its planned CPUs.

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

from affinity.plan import NodePlan
from affinity.rank_env import EnvChoice, merge_preload, rank_env
from launchers import guard
from launchers.job import Job, LaunchError, job_ranks, make_log_dir
from launchers.local import memory_options
from launchers.rank_spec import SPEC_VAR, RankSpec
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


def build(
    node_plan: NodePlan,
    hosts: list[str],
    program: list[str],
    choice: EnvChoice,
    spec: RankSpec,
    *,
    master_addr: str,
    master_port: int,
    mpiexec: str,
    hostfile: str,
    log_dir: str | None = None,
    bind_memory: bool = False,
    grace: float,
    extra_mpi_params: list[str] = (),
) -> Job:
    """``len(hosts) * len(node_plan.ranks)`` ranks, rank = node * nprocs + local, in host order. The
    ranks listed are what ``node_plan`` (this machine's, or the one described) gives every node;
    each node's shim plans its own from ``spec``. ``hostfile``: where lars-run writes the hosts at
    launch; ``log_dir``: one ``rank_<rank>.log`` per rank; ``bind_memory``: ranks run under numactl
    placing their memory; ``grace``: seconds between stop and SIGKILL (guard);
    ``extra_mpi_params``: more mpiexec options, placed before the program."""
    per_node = len(node_plan.ranks)
    ranks = job_ranks(
        hosts,
        node_plan,
        program,
        lambda n, r: {
            **merge_preload(rank_env(r, node_plan, choice, ccl=True), os.environ.get("LD_PRELOAD")),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
        },
        lambda r: ["numactl", *memory_options(r)] if bind_memory else [],
    )
    common = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "I_MPI_PIN": "0", SPEC_VAR: spec.to_json()}
    command = [mpiexec, "-np", str(len(hosts) * per_node), "-ppn", str(per_node), "-hostfile", hostfile]
    if log_dir:
        pattern = os.path.join(log_dir, "rank_%r.log")
        command += ["-outfile-pattern", pattern, "-errfile-pattern", pattern]
    for k, v in common.items():
        command += ["-genv", k, v]
    command += [
        *extra_mpi_params,
        *guard.command(grace, pmi_abort=True),
        sys.executable,
        "-m",
        "launchers.rank_exec",
        "--",
        *program,
    ]
    # hydra starts its proxies by name: its own bin directory must be on PATH
    bindir, path = os.path.dirname(mpiexec), os.environ.get("PATH", "")
    launch_env = {"PATH": bindir + os.pathsep + path} if bindir and bindir not in path.split(os.pathsep) else {}
    if ABORT_SIGNAL not in os.environ:  # a failed rank's guard aborts the job: others get SIGTERM, not SIGKILL
        launch_env[ABORT_SIGNAL] = str(int(signal.SIGTERM))
    notes = [
        *node_plan.notes,
        f"each node plans its own {per_node} rank(s) at launch from its CPUs and cpuset "
        "(launchers.rank_exec); listed: the plan for this machine"
        if not spec.allowed
        else f"each node plans its own {per_node} rank(s) at launch within --allowed-cpus {spec.allowed}",
        f"hosts written to {hostfile} at launch",
    ]
    return Job(
        "mpi",
        "rank_exec (sched_setaffinity)",
        hosts,
        node_plan,
        ranks,
        command,
        launch_env,
        notes,
        binds_memory=bind_memory,
        files={hostfile: "".join(f"{h}\n" for h in hosts)},
    )


def run_outer(job: Job, log_dir: str | None, grace: float) -> int:
    """Run the job's single outer command (mpiexec or srun) in a session of its own and supervise
    it: stop signals go to it once (srun gets SIGTERM for each), a few seconds after ``grace`` (the
    guards' own limit) its whole session here is SIGKILLed, and so is mpiexec if lars-run dies (its
    proxies then send the ranks SIGTERM). Returns lars-run's exit code."""
    assert job.command is not None
    make_log_dir(log_dir)
    for path, text in job.files.items():
        try:
            Path(path).write_text(text)
        except OSError as exc:
            raise LaunchError(f"cannot write {path}: {exc.strerror}; pass a writable --log-dir") from None
    try:
        return _supervise(job, log_dir, grace)
    finally:
        for path in job.files:
            Path(path).unlink(missing_ok=True)


def _supervise(job: Job, log_dir: str | None, grace: float) -> int:
    env = dict(os.environ)
    env.update(job.launch_env)
    with catching() as pending:
        try:
            proc = subprocess.Popen(
                job.command, env=env, start_new_session=True, preexec_fn=child_setup(signal.SIGKILL)
            )
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
    return [
        line
        for log in sorted(log_dir.glob("rank_*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("lars-run: rank ")
    ]
