"""Build, load and register the ``oneccl`` torch.distributed backend (csrc/oneccl_backend.cpp).

The backend's creator, which torch calls from ``init_process_group`` and ``new_group``,
first makes every rank claim its number in the c10d store and waits for all of them
(``rendezvous.wait_for_ranks``), so a rank that never starts fails the others after the
timeout with an error naming it, instead of hanging inside oneCCL. Then rank 0 creates
oneCCL's key-value store and publishes its address through the c10d store, and every rank
builds the communicator.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from ipex_lars import ext
from ipex_lars.distributed import env
from ipex_lars.distributed.rendezvous import wait_for_ranks

NAME = "oneccl"
_PREFIX = Path(sys.prefix)

SPEC = ext.ExtensionSpec(
    name="_ipex_lars_oneccl",
    sources=("oneccl_backend.cpp",),
    extra_include_paths=(str(_PREFIX / "include"),),
    extra_ldflags=(f"-L{_PREFIX / 'lib'}", "-lccl", f"-Wl,-rpath,{_PREFIX / 'lib'}"),
    needs=("oneccl-cpu-devel==2021.16.2 (pip install 'ipex-lars[ccl]')",),
)


def unavailable_reason() -> str | None:
    """Why the oneccl backend cannot be used in this environment, or None if it can."""
    if not (_PREFIX / "include" / "oneapi" / "ccl.hpp").exists() or not (_PREFIX / "lib" / "libccl.so").exists():
        return (
            f"oneCCL is not installed in {_PREFIX} (no include/oneapi/ccl.hpp or lib/libccl.so); "
            "install it with pip install 'ipex-lars[ccl]'"
        )
    return None


# The extensions `ipex-lars build` should compile here: none when oneCCL is not installed
# (the oneccl extras are optional; `init(backend="auto")` then uses gloo).
EXTENSIONS: list[ext.ExtensionSpec] = [SPEC] if unavailable_reason() is None else []


def is_built() -> bool:
    """True when the extension is compiled for this torch and CPU, so loading it needs no compiler."""
    return ext.library_path(SPEC).exists()


def load() -> ModuleType:
    """The compiled backend module, building it if needed; raises ExtensionBuildError with the fix."""
    reason = unavailable_reason()
    if reason:
        raise ext.ExtensionBuildError(f"cannot build the oneccl backend: {reason}")
    return ext.load(SPEC)


def _apply_ccl_defaults() -> None:
    # For users who call init_process_group("oneccl") without init(): oneCCL reads these once.
    try:
        launch = env.detect()
    except env.LaunchEnvError:
        return
    defaults = env.ccl_defaults(launch, len(os.sched_getaffinity(0)))
    env.apply_defaults({k: v for k, v in defaults.items() if k.startswith("CCL_")})


def create(store: Any, rank: int, size: int, timeout: timedelta) -> Any:
    """The creator torch calls for backend ``oneccl``: a c10d Backend over a oneCCL communicator."""
    _apply_ccl_defaults()
    module = load()
    wait_for_ranks(store, rank, size, timeout)
    if rank == 0:
        kvs = module.Kvs.create_main()
        store.set("kvs_address", kvs.address())
    else:
        store.wait(["kvs_address"], timeout)
        kvs = module.Kvs.connect(store.get("kvs_address"))
    return module.Backend(kvs, rank, size, int(timeout.total_seconds() * 1000))


def register() -> None:
    """Make ``oneccl`` a torch.distributed backend name (idempotent; loads nothing yet)."""
    import torch.distributed as dist

    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, create, devices=["cpu"])
