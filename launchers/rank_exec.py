"""Per-rank environment shim for launchers that start identical commands (``srun``).

``python -m launchers.rank_exec PROGRAM [ARGS]`` reads ``LARS_RANK_ENVS`` (a JSON list of
dicts, one per local rank), picks entry ``SLURM_LOCALID`` (or ``MPI_LOCALRANKID`` /
``LOCAL_RANK``), exports it and execs the program, so each rank gets its own affinity
variables before any OpenMP runtime starts. ``LARS_RANK_PREFIXES`` (optional, a JSON list
of argv lists, one per local rank) puts a command in front of the program, e.g.
``numactl --preferred=8`` to place that rank's memory.
"""

from __future__ import annotations

import json
import os
import sys

ENV_VAR = "LARS_RANK_ENVS"
PREFIX_VAR = "LARS_RANK_PREFIXES"
LOCAL_RANK_VARS = ("SLURM_LOCALID", "MPI_LOCALRANKID", "LOCAL_RANK")


def main(argv: list[str] | None = None) -> int:
    """Exec ``argv`` with this local rank's variables; exit 2 if the launcher context is missing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    local = next((os.environ[v] for v in LOCAL_RANK_VARS if v in os.environ), None)
    if not argv or local is None or ENV_VAR not in os.environ:
        print(f"rank_exec: needs a program, {ENV_VAR} and one of {', '.join(LOCAL_RANK_VARS)}; "
              "it is started by lars-run, not by hand", file=sys.stderr)
        return 2
    envs = json.loads(os.environ[ENV_VAR])
    if not local.isdigit() or int(local) >= len(envs):
        print(f"rank_exec: local rank {local} has no entry in {ENV_VAR} ({len(envs)} planned); "
              "ranks per node must match --nprocs-per-node", file=sys.stderr)
        return 2
    prefixes = json.loads(os.environ.pop(PREFIX_VAR, "[]"))
    if prefixes:
        argv = prefixes[int(local)] + argv
    os.environ.update(envs[int(local)])
    del os.environ[ENV_VAR]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"rank_exec: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
