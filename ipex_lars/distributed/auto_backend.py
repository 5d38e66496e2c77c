"""``init(backend="auto")``: the collective backend this project measured faster for the job's transport.

The decision table (the measurements behind it are in docs/BENCHMARKS.md, "Choosing the backend"):

1. oneCCL not installed, or its extension not built: ``gloo``.
2. A fabric provider asked for (``FI_PROVIDER`` naming one: psm3, psm2, verbs, cxi, efa, opx, ...), or
   ``CCL_ATL_TRANSPORT=mpi`` (oneCCL over Intel MPI, which picks the fabric): ``oneccl``; gloo
   cannot use a fabric at all, only TCP.
3. All ranks on one host: ``oneccl``, whose shared-memory transport beat gloo at every size measured.
4. Ranks on several hosts over TCP: ``gloo``. oneCCL's OFI ``tcp`` provider was slower than gloo
   there, and oneCCL notices a dead peer only at its timeout, gloo within seconds.

The user's explicit choice (``--dist-backend``, ``init(backend=...)``) is never overridden.
"""

from __future__ import annotations

from collections.abc import Mapping

# libfabric providers that drive a high-speed fabric (not plain TCP or UDP sockets)
FABRIC_PROVIDERS = frozenset({"psm3", "psm2", "verbs", "cxi", "efa", "opx", "ucx", "mlx", "gni", "usnic"})


def fabric(env: Mapping[str, str]) -> str | None:
    """The fabric setting in ``env`` that oneCCL would use, as ``NAME=value``, or None."""
    provider = env.get("FI_PROVIDER", "")
    names = {part.split(";")[0].strip().lower() for part in provider.split(",") if not part.startswith("^")}
    if names & FABRIC_PROVIDERS:
        return f"FI_PROVIDER={provider}"
    if env.get("CCL_ATL_TRANSPORT", "").lower() == "mpi":
        return "CCL_ATL_TRANSPORT=mpi"
    return None


def choose(hosts: int, world: int, env: Mapping[str, str], oneccl_unusable: str | None) -> tuple[str, str]:
    """(backend, reason) for ``backend="auto"``: ``world`` ranks on ``hosts`` hosts, with this environment;
    ``oneccl_unusable`` says why oneCCL cannot run here, or is None when it can."""
    if oneccl_unusable:
        return "gloo", f"auto: oneccl unavailable: {oneccl_unusable}"
    if setting := fabric(env):
        return "oneccl", f"auto: {setting} selects a fabric, which oneccl uses and gloo cannot"
    if hosts <= 1:
        return "oneccl", (
            f"auto: all {world} rank(s) on one host, where oneccl's shared-memory transport measured faster than gloo"
        )
    return "gloo", (
        f"auto: {world} ranks on {hosts} hosts over TCP, where gloo measured faster than oneccl and "
        "finds a dead peer in seconds; on a fabric set FI_PROVIDER (psm3, verbs, ...), or ask for "
        "backend oneccl"
    )
