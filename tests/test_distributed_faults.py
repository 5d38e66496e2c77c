"""No hang, no silent loss: missing and dying ranks fail the job within the timeout, with real processes."""

from __future__ import annotations

import time

import pytest

from dist_workers import harness
from dist_workers.harness import oneccl_built  # noqa: F401  (session fixture)

pytestmark = pytest.mark.usefixtures("oneccl_built")
TIMEOUT_S = 4


def test_rank_that_never_starts_fails_the_others_naming_it():
    start = time.monotonic()
    ranks = harness.torchrun_style("faults.py", ["arrive", str(TIMEOUT_S)], world=3, ranks=[0, 1], timeout=60)
    elapsed = time.monotonic() - start
    for r in ranks:
        assert r.rc not in (0, None), harness.describe(ranks)
        assert "rank(s) 2 of 3 never joined the process group" in r.err, harness.describe(ranks)
    assert elapsed < TIMEOUT_S + 30


def test_missing_rank_zero_is_named_by_the_others():
    ranks = harness.torchrun_style("faults.py", ["arrive", str(TIMEOUT_S)], world=2, ranks=[1], timeout=60)
    assert ranks[0].rc not in (0, None), harness.describe(ranks)
    assert "could not reach rank 0's rendezvous store" in ranks[0].err


@pytest.mark.slow
def test_rank_killed_mid_collective_ends_the_survivor_with_a_message():
    start = time.monotonic()
    survivor, killed = harness.torchrun_style("faults.py", ["die", str(TIMEOUT_S)], world=2, timeout=90)
    elapsed = time.monotonic() - start
    assert killed.rc == -9
    assert "RANK 0 JOINED" in survivor.out and "SURVIVED" not in survivor.out
    assert survivor.rc not in (0, None), harness.describe([survivor, killed])
    assert "A peer rank died or is stuck" in survivor.err or "A peer rank probably exited" in survivor.err
    assert elapsed < TIMEOUT_S + 45


@pytest.mark.slow
def test_rank_killed_under_mpiexec_ends_the_job():
    job = harness.mpiexec("faults.py", ["die", str(TIMEOUT_S)], world=2, timeout=90)
    assert job.rc not in (0, None), harness.describe([job])
    assert "SURVIVED" not in job.out
