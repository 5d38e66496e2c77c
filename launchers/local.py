"""Spawn pinned processes on this machine and wait for them.

Pinning tool, detected by trying it (containers often lack numactl or forbid
``set_mempolicy``): numactl (cores + memory), else taskset (cores), else
``os.sched_setaffinity`` in the child before exec (always available on Linux).
Only numactl binds memory, so ``--memory-node`` needs it (the other launchers use it too).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from affinity.cpuset import format_cpulist
from affinity.env import EnvChoice, merge_preload, rank_env
from affinity.plan import NodePlan, RankPlan
from launchers.job import Job, LaunchError, RankLaunch, make_log_dir

BINDERS = ("auto", "numactl", "taskset", "sched", "none")


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0
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
            raise LaunchError(f"--multi-task-manager numactl: numactl {why}; install numactl or use "
                              "--multi-task-manager auto")
        notes.append(f"numactl {why}: pinning cores without memory binding (first touch keeps "
                     "memory local to the pinned threads)")
    exe = shutil.which("taskset", path=path)
    if exe and _works([exe, "-c", format_cpulist(rank.cpus), "true"]):
        return "taskset", notes
    if choice == "taskset":
        raise LaunchError("--multi-task-manager taskset: taskset is missing or fails here; install "
                          "util-linux or use --multi-task-manager auto")
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


def _exit_code(rc: int) -> int:
    """Shell convention: a child killed by signal N counts as 128+N."""
    return 128 - rc if rc < 0 else rc


def spawn(rank: RankLaunch, binder: str, log_dir: Path | None) -> subprocess.Popen:
    """Start one rank with its env; stdout+stderr go to ``log_dir/rank_<rank>.log`` if given."""
    env = dict(os.environ)
    env.update(merge_preload(rank.env, os.environ.get("LD_PRELOAD")))
    cpus = rank.plan.cpus
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if binder == "sched" else None
    out = None
    if log_dir is not None:
        out = open(log_dir / f"rank_{rank.rank}.log", "wb")
    try:
        return subprocess.Popen(rank.command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=preexec)
    except OSError as exc:
        raise LaunchError(f"cannot start {rank.command[0]!r}: {exc.strerror}; check the program path") from None
    finally:
        if out is not None:
            out.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build(node_plan: NodePlan, choice: EnvChoice, program: list[str], binder: str, *,
          latency: bool = False) -> Job:
    """Independent instances on this machine (no ranks talking to each other, so no oneCCL env)."""
    ranks = [RankLaunch(r.local_rank, r.local_rank, "localhost", r,
                        rank_env(r, node_plan, choice, ccl=False, latency=latency),
                        bind_prefix(binder, r) + program)
             for r in node_plan.ranks]
    return Job("local", binder, ["localhost"], node_plan, ranks, notes=list(node_plan.notes),
               binds_memory=binder == "numactl")


def run(job: Job, log_dir: str | None) -> int:
    """Start every rank of ``job`` here, wait for all, return the worst exit code.

    Ctrl-C / SIGTERM are forwarded to the children so no pinned process is left behind.
    """
    logs = make_log_dir(log_dir)
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for rank in job.ranks:
            procs.append(spawn(rank, job.binder, logs))
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        codes = [p.wait() for p in procs] + [-signal.SIGINT]
    except LaunchError:
        for p in procs:
            p.kill()
            p.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    worst = max(_exit_code(c) for c in codes)
    if logs is not None:
        print(f"lars-run: {len(procs)} process(es) done, logs in {logs}/rank_*.log, worst exit code {worst}",
              file=sys.stderr)
    return worst
