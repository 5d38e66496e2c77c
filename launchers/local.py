"""Spawn pinned processes on this machine and wait for them.

Pinning tool, detected by trying it (containers often lack numactl or forbid
``set_mempolicy``): numactl (cores + memory), else taskset (cores), else
``os.sched_setaffinity`` in the child before exec (always available on Linux).
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
from affinity.plan import NodePlan
from launchers.job import Job, LaunchError, RankLaunch, make_log_dir

BINDERS = ("auto", "numactl", "taskset", "sched", "none")


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def detect_binder(choice: str, cpu: int, node: int, path: str | None = None) -> tuple[str, list[str]]:
    """Resolve ``--multi-task-manager`` by running the tool once on (cpu, node).

    Returns (binder, notes). ``path`` replaces $PATH for the lookup (tests use it to offer
    a numactl that fails the way it does in unprivileged containers).
    """
    notes: list[str] = []
    if choice in ("sched", "none"):
        return choice, notes
    if choice in ("auto", "numactl"):
        exe = shutil.which("numactl", path=path)
        if exe and _works([exe, f"--physcpubind={cpu}", f"--membind={node}", "true"]):
            return "numactl", notes
        why = "not installed" if exe is None else "fails here (no permission for set_mempolicy?)"
        if choice == "numactl":
            raise LaunchError(f"--multi-task-manager numactl: numactl {why}; install numactl or use "
                              "--multi-task-manager auto")
        notes.append(f"numactl {why}: pinning cores without memory binding (first touch keeps "
                     "memory local to the pinned threads)")
    exe = shutil.which("taskset", path=path)
    if exe and _works([exe, "-c", str(cpu), "true"]):
        return "taskset", notes
    if choice == "taskset":
        raise LaunchError("--multi-task-manager taskset: taskset is missing or fails here; install "
                          "util-linux or use --multi-task-manager auto")
    return "sched", notes


def bind_prefix(binder: str, cpus: tuple[int, ...], nodes: tuple[int, ...]) -> list[str]:
    """Command prefix that pins to ``cpus`` (and binds memory to ``nodes`` with numactl)."""
    if binder == "numactl":
        return ["numactl", f"--physcpubind={format_cpulist(cpus)}", f"--membind={format_cpulist(nodes)}"]
    if binder == "taskset":
        return ["taskset", "-c", format_cpulist(cpus)]
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
                        bind_prefix(binder, r.cpus, r.numa_nodes) + program)
             for r in node_plan.ranks]
    return Job("local", binder, ["localhost"], node_plan, ranks, notes=list(node_plan.notes))


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
