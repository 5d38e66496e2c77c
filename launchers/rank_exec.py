"""Per-rank shim for launchers that start one identical command for every rank (mpiexec, srun).

``python -m launchers.rank_exec -- PROGRAM [ARGS]`` finds its local rank (``MPI_LOCALRANKID``,
``SLURM_LOCALID`` or ``LOCAL_RANK``), gives the process what differs per rank, and execs the
program, so each rank has its own affinity variables before any OpenMP runtime starts:

- ``LARS_RANK_PLAN`` (mpi): a :class:`launchers.rank_spec.RankSpec`. The shim plans this node's
  ranks from its own CPUs and cpuset, exports its rank's variables, pins itself to the rank's
  CPUs, and with ``--memory-node`` runs the program under ``numactl`` placing its memory.
- ``LARS_RANK_ENVS`` (slurm): a JSON list of variables per local rank, planned by lars-run;
  ``LARS_RANK_PREFIXES`` (optional) a JSON list of argv prefixes per local rank (e.g. numactl).

Either way the shim tells oneCCL the local rank and count (``CCL_LOCAL_RANK``/``CCL_LOCAL_SIZE``,
unless set), which it otherwise guesses from host names. A rank that cannot be planned here exits 2
with one line naming its node and the problem.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from affinity.errors import UsageError
from launchers.rank_spec import SPEC_VAR, RankSpec, plan_here

ENV_VAR = "LARS_RANK_ENVS"
PREFIX_VAR = "LARS_RANK_PREFIXES"
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


def _fail(message: str) -> int:
    print(f"rank_exec: {message}", file=sys.stderr, flush=True)
    return 2


def from_spec(local: int, argv: list[str]) -> tuple[dict[str, str], list[str]] | str:
    """(variables, argv) for local rank ``local`` planned on this node, or why it cannot be."""
    from affinity.rank_env import merge_preload, rank_env
    from launchers.local import memory_options

    spec = RankSpec.from_json(os.environ.pop(SPEC_VAR))
    try:
        plan, choice = plan_here(spec)
    except UsageError as exc:
        return f"cannot plan the ranks of node {socket.gethostname()}: {exc}"
    if local >= len(plan.ranks):
        return (
            f"node {socket.gethostname()} holds {len(plan.ranks)} rank(s) but local rank {local} was started "
            "here; ranks per node must match the plan"
        )
    rank = plan.ranks[local]
    os.sched_setaffinity(0, rank.cpus)  # inherited by the program and all its threads
    env = merge_preload(rank_env(rank, plan, choice, ccl=True), os.environ.get("LD_PRELOAD"))
    prefix = ["numactl", *memory_options(rank)] if spec.memory_node is not None else []
    return env, prefix + argv


def from_env_list(local: int, argv: list[str]) -> tuple[dict[str, str], list[str]] | str:
    """(variables, argv) for local rank ``local`` from the lists lars-run planned."""
    envs = json.loads(os.environ.pop(ENV_VAR))
    if local >= len(envs):
        return (
            f"local rank {local} has no entry in {ENV_VAR} ({len(envs)} planned); ranks per node must match "
            "--nprocs-per-node"
        )
    prefixes = json.loads(os.environ.pop(PREFIX_VAR, "[]"))
    return envs[local], (prefixes[local] if prefixes else []) + argv


def main(argv: list[str] | None = None) -> int:
    """Exec ``argv`` with this local rank's variables; exit 2 if the launcher context is missing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    local = next((os.environ[v] for v in LOCAL_RANK_VARS if v in os.environ), None)
    if not argv or local is None or not (SPEC_VAR in os.environ or ENV_VAR in os.environ):
        return _fail(
            f"needs a program, {SPEC_VAR} or {ENV_VAR}, and one of {', '.join(LOCAL_RANK_VARS)}; "
            "it is started by lars-run, not by hand"
        )
    if not local.isdigit():
        return _fail(f"local rank {local!r} is not a number")
    made = from_spec(int(local), argv) if SPEC_VAR in os.environ else from_env_list(int(local), argv)
    if isinstance(made, str):
        return _fail(made)
    env, argv = made
    os.environ.update(env)
    # oneCCL's slice of CCL_WORKER_AFFINITY: told, not guessed from host names (equal in some containers)
    os.environ.setdefault("CCL_LOCAL_RANK", local)
    if "CCL_LOCAL_SIZE" not in os.environ and os.environ.get(
        "MPI_LOCALNRANKS", os.environ.get("SLURM_NTASKS_PER_NODE")
    ):
        os.environ["CCL_LOCAL_SIZE"] = os.environ.get("MPI_LOCALNRANKS") or os.environ["SLURM_NTASKS_PER_NODE"]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        return _fail(f"cannot run {argv[0]!r}: {exc.strerror}")


if __name__ == "__main__":
    sys.exit(main())
