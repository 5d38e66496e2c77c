"""Spawn pinned processes on this machine and wait for them.

Pinning tool, detected by trying it (containers often lack numactl or forbid
``set_mempolicy``): numactl (cores + memory), else taskset (cores), else
``os.sched_setaffinity`` in the child before exec (always available on Linux).
Only numactl binds memory, so ``--memory-node`` needs it (the other launchers use it too).
Each rank leads a session of its own and is supervised by :mod:`launchers.supervise`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from affinity.cpuset import format_cpulist
from affinity.plan import NodePlan, RankPlan
from affinity.rank_env import EnvChoice, merge_preload, rank_env
from launchers.job import Job, LaunchError, RankLaunch, make_log_dir
from launchers.supervise import Child, JobRun, catching, child_setup

BINDERS = ("auto", "numactl", "taskset", "sched", "none")


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def numactl_problem(rank: RankPlan, path: str | None = None) -> str | None:
    """Why numactl cannot pin ``rank`` here (``not installed`` / ``fails here ...``), or None when
    ``numactl <the rank's options> true`` runs. ``path`` replaces $PATH for the lookup (tests use
    it to offer a numactl that fails the way it does in unprivileged containers)."""
    exe = shutil.which("numactl", path=path)
    if exe is None:
        return "not installed"
    if not _works([exe, *bind_prefix("numactl", rank)[1:], "true"]):
        return "fails here (no permission for set_mempolicy, or a node outside this cpuset?)"
    return None


def detect_binder(choice: str, rank: RankPlan, path: str | None = None) -> tuple[str, list[str]]:
    """Resolve ``--multi-task-manager`` by running the tool once with ``rank``'s binding.

    Returns (binder, notes); ``path`` as for :func:`numactl_problem`.
    """
    notes: list[str] = []
    if choice in ("sched", "none"):
        return choice, notes
    if choice in ("auto", "numactl"):
        why = numactl_problem(rank, path)
        if why is None:
            return "numactl", notes
        if choice == "numactl":
            raise LaunchError(
                f"--multi-task-manager numactl: numactl {why}; install numactl or use --multi-task-manager auto"
            )
        notes.append(
            f"numactl {why}: pinning cores without memory binding (first touch keeps "
            "memory local to the pinned threads)"
        )
    exe = shutil.which("taskset", path=path)
    if exe and _works([exe, "-c", format_cpulist(rank.cpus), "true"]):
        return "taskset", notes
    if choice == "taskset":
        raise LaunchError(
            "--multi-task-manager taskset: taskset is missing or fails here; install "
            "util-linux or use --multi-task-manager auto"
        )
    return "sched", notes


def memory_options(rank: RankPlan) -> list[str]:
    """numactl options placing the rank's memory: ``--membind=NODES`` or ``--preferred=NODE``."""
    return [f"--{rank.memory_policy}={format_cpulist(rank.memory_nodes)}"]


def bind_prefix(binder: str, rank: RankPlan) -> list[str]:
    """Command prefix that pins to the rank's CPUs (and, with numactl, places its memory)."""
    if binder == "numactl":
        return ["numactl", f"--physcpubind={format_cpulist(rank.cpus)}", *memory_options(rank)]
    if binder == "taskset":
        return ["taskset", "-c", format_cpulist(rank.cpus)]
    return []


def spawn(rank: RankLaunch, binder: str, log_dir: Path | None) -> subprocess.Popen:
    """Start one rank with its env, leading a session of its own and SIGKILLed should lars-run die;
    stdout+stderr go to ``log_dir/rank_<rank>.log`` if given."""
    env = dict(os.environ)
    env.update(merge_preload(rank.env, os.environ.get("LD_PRELOAD")))
    cpus = rank.plan.cpus
    pin = (lambda: os.sched_setaffinity(0, cpus)) if binder == "sched" else None
    out = None
    if log_dir is not None:
        out = open(log_dir / f"rank_{rank.rank}.log", "wb")
    try:
        return subprocess.Popen(
            rank.command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=child_setup(signal.SIGKILL, then=pin),
        )
    except OSError as exc:
        raise LaunchError(f"cannot start {rank.command[0]!r}: {exc.strerror}; check the program path") from None
    finally:
        if out is not None:
            out.close()


def build(node_plan: NodePlan, choice: EnvChoice, program: list[str], binder: str, *, latency: bool = False) -> Job:
    """Independent instances on this machine (no ranks talking to each other, so no oneCCL env)."""
    ranks = [
        RankLaunch(
            r.local_rank,
            r.local_rank,
            "localhost",
            r,
            rank_env(r, node_plan, choice, ccl=False, latency=latency),
            bind_prefix(binder, r) + program,
        )
        for r in node_plan.ranks
    ]
    return Job(
        "local", binder, ["localhost"], node_plan, ranks, notes=list(node_plan.notes), binds_memory=binder == "numactl"
    )


def run(job: Job, log_dir: str | None, grace: float) -> int:
    """Start every rank of ``job`` here and supervise them to the end (signals forwarded, a failed
    rank ends the job, SIGKILL after ``grace`` seconds); returns lars-run's exit code."""
    logs = make_log_dir(log_dir)
    with catching() as pending:
        children: list[Child] = []
        try:
            for rank in job.ranks:
                children.append(Child(f"rank {rank.rank} on {rank.host}", spawn(rank, job.binder, logs)))
        except LaunchError:
            for c in children:
                c.kill()
                c.proc.wait()
            raise
        code = JobRun(children, grace, pending).run()
    if logs is not None:
        print(
            f"lars-run: {len(children)} process(es) done, logs in {logs}/rank_*.log, exit code {code}", file=sys.stderr
        )
    return code
