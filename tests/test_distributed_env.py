"""ipex_lars.distributed.env, rendezvous and liveness settings: which launcher and job started us,
the oneCCL settings chosen for it, and the rendezvous checks that keep jobs apart (in one process)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from ipex_lars.distributed import liveness, rendezvous
from ipex_lars.distributed.env import (
    Launch,
    LaunchEnvError,
    agent_store_prefix,
    apply_defaults,
    ccl_defaults,
    detect,
    first_slurm_host,
    job_id,
)
from ipex_lars.distributed.rendezvous import RendezvousError
from launchers.identity import free_port


def test_torchrun_variables_win_over_mpi_and_slurm():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500",
        "PMI_RANK": "0",
        "PMI_SIZE": "1",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    assert detect(env) == Launch("torchrun", 3, 8, 1, 2, "n0", 29500)


def test_torchrun_without_master_is_an_error_naming_the_variables():
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR or MASTER_PORT"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})


def test_single_node_mpi_derives_loopback_and_a_port_shared_by_local_ranks():
    launch = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("mpi", 1, 2, 1)
    assert launch.master_addr == "127.0.0.1"
    assert launch.master_port == 20000 + os.getppid() % 20000
    assert launch.single_node


def test_multi_node_mpi_requires_master_addr():
    with pytest.raises(LaunchEnvError, match="-genv MASTER_ADDR"):
        detect({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})


def test_slurm_uses_first_node_and_job_id_port():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "cpu[07-09,12]",
        "SLURM_JOB_ID": "123456",
        "SLURM_TASKS_PER_NODE": "2(x4)",
    }
    assert detect(env) == Launch("slurm", 5, 8, 1, 2, "cpu07", 20000 + 123456 % 20000)


@pytest.mark.parametrize(
    "nodelist, first", [("node1", "node1"), ("a[3-4],b1", "a3"), ("x[10,2]", "x10"), ("gpu-a[001-004]", "gpu-a001")]
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_no_launcher_is_a_single_process():
    assert detect({}) == Launch("single", 0, 1, 0, 1, "127.0.0.1", 0)


def test_one_node_gets_shm_transport_no_worker_and_a_thread_share():
    launch = Launch("torchrun", 0, 2, 0, 2, "h", 1)
    assert ccl_defaults(launch, cpus=8) == {
        "CCL_PROCESS_LAUNCHER": "none",
        "OMP_NUM_THREADS": "4",
        "CCL_ATL_SHM": "1",
        "CCL_WORKER_OFFLOAD": "0",
    }
    assert ccl_defaults(Launch("torchrun", 0, 4, 0, 4, "h", 1), cpus=2)["OMP_NUM_THREADS"] == "1"


def test_multi_node_keeps_a_worker_and_no_shm_only_transport():
    settings = ccl_defaults(Launch("slurm", 0, 8, 0, 2, "h", 1), cpus=8)
    assert "CCL_ATL_SHM" not in settings and settings["CCL_WORKER_COUNT"] == "1"


def test_user_settings_are_never_overridden():
    env = {"CCL_ATL_SHM": "0"}
    applied = apply_defaults({"CCL_ATL_SHM": "1", "CCL_WORKER_OFFLOAD": "0"}, env)
    assert env == {"CCL_ATL_SHM": "0", "CCL_WORKER_OFFLOAD": "0"} and applied == {"CCL_WORKER_OFFLOAD": "0"}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"IPEX_LARS_JOB_ID": "mine", "RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "r"}, "mine"),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "r7"}, "torchrun:r7"),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}, ""),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "I_MPI_HYDRA_UUID": "u-1"}, "mpi:u-1"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3"}, "slurm:42.3"),
        ({"IPEX_LARS_JOB_ID": "", "RANK": "0", "WORLD_SIZE": "2"}, ""),
    ],
)
def test_job_id_is_the_explicit_one_or_the_launchers(env, expected):
    assert job_id(env) == expected


def test_torchruns_agent_store_is_used_under_this_attempts_prefix():
    assert agent_store_prefix({}) is None
    assert agent_store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert agent_store_prefix(env) == "/worker/attempt_2"


def _launch(rank: int, addr: str, port: int, local_world: int | None = 2) -> Launch:
    return Launch("torchrun", rank, 2, rank, local_world, addr, port)


def test_store_listens_on_master_addr_only():
    with rendezvous.listen(rendezvous.bind_address(_launch(0, "127.0.0.1", 0)), 0) as server:
        assert server.getsockname()[0] == "127.0.0.1"


def test_a_host_name_on_loopback_listens_everywhere_only_when_the_job_may_span_nodes():
    assert rendezvous.bind_address(_launch(0, "localhost", 0)) in ("127.0.0.1", "::1")
    assert rendezvous.bind_address(_launch(0, "localhost", 0, local_world=None)) == ""
    assert rendezvous.bind_address(_launch(0, "127.0.0.1", 0, local_world=None)) == "127.0.0.1"


def test_busy_port_is_one_line_naming_the_port_and_the_fix():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"port {port} is already in use.*MASTER_PORT.*--master-port"):
            rendezvous.open_store(_launch(0, "127.0.0.1", port), timedelta(seconds=5), "job")


def test_master_addr_of_another_host_is_named():
    with pytest.raises(RendezvousError, match="MASTER_ADDR is not an address of this host"):
        rendezvous.listen("192.0.2.1", 0)  # TEST-NET-1: never an address of this machine


@pytest.mark.parametrize(
    "job, world, message",
    [
        ("other", 2, r"of another job \(mine, 2 ranks, rank 0 on host .*will not join it"),
        ("mine", 3, r"\(3 ranks\) reached the rendezvous store .* of another job \(mine, 2 ranks"),
    ],
)
def test_a_rank_refuses_the_store_of_another_job(job, world, message):
    port = free_port()
    store = rendezvous.open_store(_launch(0, "127.0.0.1", port), timedelta(seconds=5), "mine")
    stranger = Launch("torchrun", 1, world, 1, world, "127.0.0.1", port)
    with pytest.raises(RendezvousError, match=message):
        rendezvous.open_store(stranger, timedelta(seconds=5), job)
    del store


def test_a_rank_number_taken_by_another_process_is_refused():
    store = dist.HashStore()
    store.set("arrived/1", "host elsewhere, pid 7")
    with pytest.raises(RendezvousError, match=r"rank 1 taken .* by another process \(host elsewhere, pid 7\)"):
        rendezvous.wait_for_ranks(store, 1, 2, timedelta(seconds=1))


def test_rank_zero_missing_is_named_within_the_timeout():
    with pytest.raises(rendezvous.MissingRankError, match=r"rank\(s\) 0 of 2 never joined.*IPEX_LARS_DIST_TIMEOUT"):
        rendezvous.open_store(_launch(1, "127.0.0.1", free_port()), timedelta(seconds=0.5), "job")


@pytest.mark.parametrize("raw, seconds", [("", 30.0), ("2.5", 2.5), ("0", 0.0)])
def test_heartbeat_timeout_setting(raw, seconds):
    assert liveness.heartbeat_timeout({"IPEX_LARS_HEARTBEAT_TIMEOUT": raw}) == seconds


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan"])
def test_bad_heartbeat_timeout_is_named(raw):
    with pytest.raises(ValueError, match="IPEX_LARS_HEARTBEAT_TIMEOUT"):
        liveness.heartbeat_timeout({"IPEX_LARS_HEARTBEAT_TIMEOUT": raw})
