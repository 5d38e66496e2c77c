"""Which launcher started this process, and the oneCCL environment that is fastest for it.

Pure functions over an environment mapping, so they are testable without launching
anything. Detection order: torchrun (``RANK``/``WORLD_SIZE``), Intel MPI hydra
(``PMI_RANK``/``PMI_SIZE``), SLURM (``SLURM_PROCID``/``SLURM_NTASKS``), else a single
process. torchrun's variables win because torchrun may itself run under SLURM or MPI.

Rendezvous address when the launcher gives none (documented in ``init``'s docstring):

- ``MASTER_ADDR``: SLURM takes the first host of ``SLURM_NODELIST``; a one-node MPI
  job (``MPI_LOCALNRANKS == PMI_SIZE``) uses ``127.0.0.1``; a multi-node MPI job must
  set it (error otherwise).
- ``MASTER_PORT``: SLURM derives ``20000 + SLURM_JOB_ID % 20000``; a one-node MPI job
  derives ``20000 + (parent pid % 20000)``, the hydra proxy every local rank shares; a
  multi-node MPI job must set it.

Job identity (``job_id``), checked when a rank reaches the rendezvous store so that it
never joins another job's store: ``IPEX_LARS_JOB_ID`` when set, else the launcher's own
job id: torchrun's ``TORCHELASTIC_RUN_ID`` (unless ``none``), Intel MPI hydra's
``I_MPI_HYDRA_UUID``, SLURM's ``SLURM_JOB_ID.SLURM_STEP_ID``; else none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

JOB_ID_ENV = "IPEX_LARS_JOB_ID"


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent; the message says what to set."""


@dataclass(frozen=True)
class Launch:
    """Rank layout and rendezvous address of this process."""

    launcher: str  # "torchrun", "mpi", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None  # None when the launcher does not say
    master_addr: str
    master_port: int

    @property
    def single_node(self) -> bool:
        """True when every rank runs on this node, as far as the launcher says."""
        return self.local_world_size == self.world_size


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchEnvError(f"{name}={env[name]!r} is not an integer; fix the launcher's environment") from None


def _int_or_none(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name) if env.get(name, "") != "" else None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist such as ``gpu[07-09,12],cpu01`` (here ``gpu07``)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchEnvError(f"cannot read SLURM_NODELIST={nodelist!r}; set MASTER_ADDR to rank 0's host")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_local_world(env: Mapping[str, str]) -> int | None:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3"; this node's count is only certain when all agree.
    tasks = env.get("SLURM_TASKS_PER_NODE", "")
    counts = {int(m) for m in re.findall(r"(\d+)(?:\(x\d+\))?", tasks)}
    if len(counts) == 1:
        return counts.pop()
    return None


def detect(env: Mapping[str, str] | None = None) -> Launch:
    """Read rank, world size, local layout and rendezvous address from the launcher's variables."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), _int_or_none(env, "MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        if addr is None or port is None:
            raise LaunchEnvError(
                "RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is not; set both "
                "(torchrun sets them) to rank 0's host and a free port"
            )
        return Launch(
            "torchrun",
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int_or_none(env, "LOCAL_RANK") or 0,
            _int_or_none(env, "LOCAL_WORLD_SIZE"),
            addr,
            port,
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        size, local_size = _int(env, "PMI_SIZE"), _int_or_none(env, "MPI_LOCALNRANKS")
        one_node = local_size == size
        if addr is None:
            if not one_node:
                raise LaunchEnvError(
                    "a multi-node MPI launch needs MASTER_ADDR (rank 0's host); pass "
                    "-genv MASTER_ADDR <host> to mpiexec"
                )
            addr = "127.0.0.1"
        if port is None:
            if not one_node:
                raise LaunchEnvError(
                    "a multi-node MPI launch needs MASTER_PORT (a free port on rank 0's host); "
                    "pass -genv MASTER_PORT <port> to mpiexec"
                )
            port = 20000 + os.getppid() % 20000
        return Launch(
            "mpi", _int(env, "PMI_RANK"), size, _int_or_none(env, "MPI_LOCALRANKID") or 0, local_size, addr, port
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if addr is None:
            addr = first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or "")
        if port is None:
            if "SLURM_JOB_ID" not in env:
                raise LaunchEnvError("SLURM_JOB_ID is missing, so no port can be derived; set MASTER_PORT")
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
        return Launch(
            "slurm",
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_NTASKS"),
            _int_or_none(env, "SLURM_LOCALID") or 0,
            _slurm_local_world(env),
            addr,
            port,
        )
    return Launch("single", 0, 1, 0, 1, addr or "127.0.0.1", port or 0)


def job_id(env: Mapping[str, str] | None = None) -> str:
    """What every rank of this job shares and other jobs do not, or "" when nothing says.

    ``IPEX_LARS_JOB_ID`` wins; then the id of the launcher ``detect`` finds: torchrun's run id
    (its default ``none`` is no id), hydra's per-``mpiexec`` UUID, SLURM's job and step ids.
    """
    env = os.environ if env is None else env
    if env.get(JOB_ID_ENV):
        return env[JOB_ID_ENV]
    if "RANK" in env and "WORLD_SIZE" in env:
        run_id = env.get("TORCHELASTIC_RUN_ID", "")
        return "" if run_id in ("", "none") else f"torchrun:{run_id}"
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return f"mpi:{env['I_MPI_HYDRA_UUID']}" if env.get("I_MPI_HYDRA_UUID") else ""
    if "SLURM_PROCID" in env and env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    return ""


def agent_store_prefix(env: Mapping[str, str] | None = None) -> str | None:
    """The key prefix of this restart attempt when torchrun's agent serves the store at
    MASTER_ADDR:MASTER_PORT (``TORCHELASTIC_USE_AGENT_STORE``), as torch's own ``env://`` uses;
    None when rank 0 serves it."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return f"/worker/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def ccl_defaults(launch: Launch, cpus: int, sharers: int | None = None, one_host: bool | None = None) -> dict[str, str]:
    """The oneCCL and threading settings measured fastest for this layout.

    Within one node: the shared-memory transport (``CCL_ATL_SHM=1``, much faster than the
    default at large sizes) and no worker thread (``CCL_WORKER_OFFLOAD=0``: the default
    worker spin-waits, which puts a floor under every collective on a busy node). Always: the
    KVS wired by the c10d store instead of a PMI launcher (``CCL_PROCESS_LAUNCHER=none``),
    and OpenMP threads capped to this rank's share of its ``cpus`` allowed CPUs, since
    oversubscribed ranks run many times slower: split among the ``sharers`` ranks allowed on
    them (default: the launcher's local rank count). The measurements are in
    docs/BENCHMARKS.md. ``one_host`` (default: as the
    launcher says) tells whether every rank runs on this node.
    """
    share = sharers if sharers is not None else launch.local_world_size or 1
    settings = {
        "CCL_PROCESS_LAUNCHER": "none",
        "OMP_NUM_THREADS": str(max(1, cpus // share)),
    }
    if launch.single_node if one_host is None else one_host:
        settings |= {"CCL_ATL_SHM": "1", "CCL_WORKER_OFFLOAD": "0"}
    else:
        settings |= {"CCL_WORKER_COUNT": "1"}
    return settings


def apply_defaults(settings: Mapping[str, str], env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each variable the user has not set; return the ones actually set."""
    env = os.environ if env is None else env
    applied = {k: v for k, v in settings.items() if k not in env}
    env.update(applied)
    return applied
