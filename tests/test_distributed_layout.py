"""What ``init`` decides from the job's layout: thread caps from each rank's own CPUs, the backend by transport."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from dist_workers import harness

from ipex_lars.distributed.auto_backend import choose
from ipex_lars.distributed.layout import Layout

ONECCL_MISSING = "oneCCL is not installed"


def _mask(*cpus: int) -> frozenset[int]:
    return frozenset(cpus)


@pytest.mark.parametrize(
    "mine, local, threads",
    [
        (_mask(0, 1, 2, 3), [_mask(0, 1, 2, 3)], 4),  # alone on the host
        (_mask(0, 1, 2, 3), [_mask(0, 1, 2, 3)] * 2, 2),  # unpinned: two ranks split the same CPUs
        (_mask(0, 1), [_mask(0, 1), _mask(2, 3)], 2),  # pinned to its half by the launcher: all of it
        (_mask(*range(28)), [_mask(*range(28 * i, 28 * i + 28)) for i in range(4)], 28),  # 4 ranks, 4 sockets
        (_mask(0), [_mask(0), _mask(1)], 1),
        (_mask(0, 1, 2, 3), [_mask(0, 1, 2, 3), _mask(3, 4)], 2),  # overlapping: shared, so split
    ],
)
def test_thread_cap_divides_only_among_ranks_allowed_on_the_same_cpus(mine, local, threads):
    assert Layout(hosts=1, cpus=mine, local_masks=tuple(local)).threads == threads


@pytest.mark.parametrize(
    "hosts, env, unusable, backend, because",
    [
        (1, {}, None, "oneccl", "all 4 rank(s) on one host"),
        (3, {}, None, "gloo", "4 ranks on 3 hosts over TCP"),
        (3, {"FI_PROVIDER": "tcp"}, None, "gloo", "over TCP"),
        (3, {"FI_PROVIDER": "psm3"}, None, "oneccl", "FI_PROVIDER=psm3 selects a fabric"),
        (3, {"FI_PROVIDER": "verbs;ofi_rxm"}, None, "oneccl", "FI_PROVIDER=verbs;ofi_rxm"),
        (3, {"FI_PROVIDER": "^psm3"}, None, "gloo", "over TCP"),  # an exclusion selects nothing
        (3, {"CCL_ATL_TRANSPORT": "mpi"}, None, "oneccl", "CCL_ATL_TRANSPORT=mpi"),
        (1, {}, ONECCL_MISSING, "gloo", f"oneccl unavailable: {ONECCL_MISSING}"),
        (3, {"FI_PROVIDER": "psm3"}, ONECCL_MISSING, "gloo", "oneccl unavailable"),
    ],
)
def test_auto_backend_decision_table(hosts, env, unusable, backend, because):
    chosen, reason = choose(hosts, 4, env, unusable)
    assert chosen == backend and because in reason
    assert reason.startswith("auto: ")


def _launch(masks: list[str] | None, backend: str = "gloo") -> list[dict]:
    """Two ranks of layout_report.py, rank r under `taskset -c masks[r]` (unpinned when None), with no
    OMP_NUM_THREADS set, so init's cap is what they run with."""
    prefix = 'exec taskset -c "$(eval echo \\"\\$MASK_$RANK\\")" ' if masks else "exec "
    command = [
        "sh",
        "-c",
        f'unset OMP_NUM_THREADS; {prefix}"$0" "$@"',
        sys.executable,
        str(harness.WORKERS / "layout_report.py"),
        backend,
    ]
    extra = {f"MASK_{r}": m for r, m in enumerate(masks or [])}
    ranks = harness.torchrun_command(command, world=2, **extra)
    assert [r.rc for r in ranks] == [0, 0], harness.describe(ranks)
    reports = [
        json.loads(line[len("LAYOUT ") :]) for r in ranks for line in r.out.splitlines() if line.startswith("LAYOUT ")
    ]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["sum"] == 2 for r in reports)
    return sorted(reports, key=lambda r: r["rank"])


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is not installed")
def test_ranks_pinned_by_taskset_keep_their_own_cpus_unpinned_ones_split_them():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to pin 2 ranks apart")
    half = len(cpus) // 2
    pinned = _launch([",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half : 2 * half]))])
    for report in pinned:
        assert report["cpu_sharers"] == 1 and len(report["cpus"]) == half
        assert report["threads"] == half and report["omp"] == str(half)
    shared = _launch(None)
    for report in shared:
        assert report["cpu_sharers"] == 2 and report["cpus"] == cpus
        assert report["threads"] == len(cpus) // 2 and report["omp"] == str(len(cpus) // 2)
