"""The oneccl backend with real rank processes: every collective, every launcher, DDP equivalence."""

from __future__ import annotations

import re

import pytest
import torch
from dist_workers import harness
from dist_workers.harness import oneccl_built  # noqa: F401  (session fixture)

pytestmark = pytest.mark.usefixtures("oneccl_built")


def ok_ranks(text: str) -> list[tuple[int, str, str]]:
    return sorted(
        (int(r), launcher, backend) for r, launcher, backend in re.findall(r"RANK (\d+) OK (\w+) (\w+)", text)
    )


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_collectives_torchrun_style(world):
    ranks = harness.torchrun_style("collectives.py", ["oneccl"], world)
    assert [r.rc for r in ranks] == [0] * world, harness.describe(ranks)
    assert ok_ranks("".join(r.out for r in ranks)) == [(r, "torchrun", "oneccl") for r in range(world)]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_collectives_under_intel_mpi(world):
    job = harness.mpiexec("collectives.py", ["oneccl"], world)
    assert job.rc == 0, harness.describe([job])
    assert ok_ranks(job.out) == [(r, "mpi", "oneccl") for r in range(world)]


def test_auto_picks_oneccl_for_ranks_on_one_host_and_says_why():
    ranks = harness.torchrun_style("collectives.py", ["auto"], 2)
    assert [r.rc for r in ranks] == [0, 0], harness.describe(ranks)
    assert ok_ranks("".join(r.out for r in ranks)) == [(0, "torchrun", "oneccl"), (1, "torchrun", "oneccl")]
    assert (
        "backend oneccl (auto: all 2 rank(s) on one host, where oneccl's shared-memory transport measured "
        "faster than gloo)" in ranks[0].err
    )
    assert "backend oneccl" not in ranks[1].err  # rank 0 says it, once
    assert "CCL_ATL_SHM=1" in ranks[0].err


def test_single_process_without_launcher():
    run = harness.single("collectives.py", ["oneccl"])
    assert run.rc == 0, harness.describe([run])
    assert ok_ranks(run.out) == [(0, "single", "oneccl")]


def test_official_ccl_backend_missing_is_a_clear_error():
    run = harness.single("collectives.py", ["ccl"])
    assert run.rc != 0
    assert "oneccl_bindings_for_pytorch, which is not installed" in run.err
    assert "use backend='oneccl'" in run.err


@pytest.mark.slow
def test_ddp_on_oneccl_matches_gloo_and_one_process(tmp_path):
    from dist_workers.ddp_train import model

    steps = "4"
    for backend in ("oneccl", "gloo"):
        ranks = harness.torchrun_style("ddp_train.py", [backend, steps, str(tmp_path / backend)], 2)
        assert [r.rc for r in ranks] == [0, 0], harness.describe(ranks)
    one = harness.single("ddp_train.py", ["gloo", steps, str(tmp_path / "single")])
    assert one.rc == 0, harness.describe([one])

    rank0, rank1 = (torch.load(tmp_path / "oneccl" / f"rank{r}.pt") for r in (0, 1))
    gloo = torch.load(tmp_path / "gloo" / "rank0.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    initial = model().state_dict()
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name} differs between oneccl ranks"
        assert not torch.allclose(value, initial[name]), f"{name} did not train"
        torch.testing.assert_close(value, gloo[name], rtol=1e-5, atol=1e-6, msg=f"{name}: oneccl vs gloo")
        torch.testing.assert_close(
            value, single[name], rtol=1e-5, atol=1e-6, msg=f"{name}: oneccl vs one process on the whole batch"
        )


def test_a_job_that_never_destroys_its_group_exits_cleanly():
    # oneCCL's threads used to abort the process at exit ("terminate called"), 8 times in 10
    for _ in range(3):
        job = harness.mpiexec("exit_without_destroy.py", ["oneccl"], 2)
        assert job.rc == 0, harness.describe([job])
        assert job.out.count("SUM 3.0") == 2
