"""Build, load and register the ``oneccl`` torch.distributed backend (csrc/oneccl_backend.cpp).

The backend's creator, which torch calls from ``init_process_group`` and ``new_group``,
first makes every rank announce itself in the c10d store and waits for all of them,
so a rank that never starts fails the others after the timeout with an error naming
it, instead of hanging inside oneCCL. Then rank 0 creates oneCCL's key-value store and
publishes its address through the c10d store, and every rank builds the communicator.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from ipex_lars import ext
from ipex_lars.distributed import env

NAME = "oneccl"
_PREFIX = Path(sys.prefix)

SPEC = ext.ExtensionSpec(
    name="_ipex_lars_oneccl",
    sources=("oneccl_backend.cpp",),
    extra_include_paths=(str(_PREFIX / "include"),),
    extra_ldflags=(f"-L{_PREFIX / 'lib'}", "-lccl", f"-Wl,-rpath,{_PREFIX / 'lib'}"),
    needs=("oneccl-cpu-devel==2021.16.2 (pip install 'ipex-lars[ccl]')",),
)


class MissingRankError(RuntimeError):
    """Some ranks did not join the process group within its timeout."""


def unavailable_reason() -> str | None:
    """Why the oneccl backend cannot be used in this environment, or None if it can."""
    if not (_PREFIX / "include" / "oneapi" / "ccl.hpp").exists() or not (_PREFIX / "lib" / "libccl.so").exists():
        return (f"oneCCL is not installed in {_PREFIX} (no include/oneapi/ccl.hpp or lib/libccl.so); "
                "install it with pip install 'ipex-lars[ccl]'")
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


def _wait_for_ranks(store: Any, rank: int, size: int, timeout: timedelta) -> None:
    """Announce this rank and wait until all `size` ranks have; name the missing ones on timeout.

    The first rank to time out publishes the missing ranks, so every waiting rank reports
    the same list, and rank 0, which hosts the store, keeps it up until they have read it.
    """
    store.set(f"arrived/{rank}", "1")
    arrived = store.add("arrived", 1)
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 0.005
    try:
        while arrived < size:
            if store.check(["missing"]):
                break
            if time.monotonic() > deadline:
                late = [str(r) for r in range(size) if not store.check([f"arrived/{r}"])]
                store.compare_set("missing", "", ",".join(late) or "?")
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
            arrived = store.add("arrived", 0)
        else:
            return
        missing = store.get("missing").decode()
        told = store.add("told", 1)
        while rank == 0 and told < arrived and time.monotonic() < deadline + 10:
            time.sleep(0.05)
            told = store.add("told", 0)
    except RuntimeError as exc:  # the store went away: rank 0 failed while we waited
        raise MissingRankError(f"oneccl backend: rank {rank} lost rank 0's store while waiting for all {size} "
                               f"ranks to join ({exc}); see rank 0's error") from exc
    raise MissingRankError(
        f"oneccl backend: rank {rank} waited {timeout.total_seconds():.0f} s but rank(s) {missing} of {size} "
        "never joined the process group. Check that they started and reach init_process_group; raise the "
        "wait with init(timeout=...).")


def _apply_ccl_defaults() -> None:
    # For users who call init_process_group("oneccl") without init(): oneCCL reads these once.
    try:
        launch = env.detect()
    except env.LaunchError:
        return
    defaults = env.ccl_defaults(launch, len(os.sched_getaffinity(0)))
    env.apply_defaults({k: v for k, v in defaults.items() if k.startswith("CCL_")})


def create(store: Any, rank: int, size: int, timeout: timedelta) -> Any:
    """The creator torch calls for backend ``oneccl``: a c10d Backend over a oneCCL communicator."""
    _apply_ccl_defaults()
    module = load()
    _wait_for_ranks(store, rank, size, timeout)
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
