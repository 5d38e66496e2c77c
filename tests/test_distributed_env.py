"""ipex_lars.distributed.env: which launcher started us, and the oneCCL settings chosen for it."""

from __future__ import annotations

import os

import pytest

from ipex_lars.distributed.env import Launch, LaunchError, apply_defaults, ccl_defaults, detect, first_slurm_host


def test_torchrun_variables_win_over_mpi_and_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n0",
           "MASTER_PORT": "29500", "PMI_RANK": "0", "PMI_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect(env) == Launch("torchrun", 3, 8, 1, 2, "n0", 29500)


def test_torchrun_without_master_is_an_error_naming_the_variables():
    with pytest.raises(LaunchError, match="MASTER_ADDR or MASTER_PORT"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})


def test_single_node_mpi_derives_loopback_and_a_port_shared_by_local_ranks():
    launch = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("mpi", 1, 2, 1)
    assert launch.master_addr == "127.0.0.1"
    assert launch.master_port == 20000 + os.getppid() % 20000
    assert launch.single_node


def test_multi_node_mpi_requires_master_addr():
    with pytest.raises(LaunchError, match="-genv MASTER_ADDR"):
        detect({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})


def test_slurm_uses_first_node_and_job_id_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "cpu[07-09,12]",
           "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "2(x4)"}
    assert detect(env) == Launch("slurm", 5, 8, 1, 2, "cpu07", 20000 + 123456 % 20000)


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("a[3-4],b1", "a3"), ("x[10,2]", "x10"),
                                             ("gpu-a[001-004]", "gpu-a001")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_no_launcher_is_a_single_process():
    assert detect({}) == Launch("single", 0, 1, 0, 1, "127.0.0.1", 0)


def test_one_node_gets_shm_transport_no_worker_and_a_thread_share():
    launch = Launch("torchrun", 0, 2, 0, 2, "h", 1)
    assert ccl_defaults(launch, cpus=8) == {"CCL_PROCESS_LAUNCHER": "none", "OMP_NUM_THREADS": "4",
                                            "CCL_ATL_SHM": "1", "CCL_WORKER_OFFLOAD": "0"}
    assert ccl_defaults(Launch("torchrun", 0, 4, 0, 4, "h", 1), cpus=2)["OMP_NUM_THREADS"] == "1"


def test_multi_node_keeps_a_worker_and_no_shm_only_transport():
    settings = ccl_defaults(Launch("slurm", 0, 8, 0, 2, "h", 1), cpus=8)
    assert "CCL_ATL_SHM" not in settings and settings["CCL_WORKER_COUNT"] == "1"


def test_user_settings_are_never_overridden():
    env = {"CCL_ATL_SHM": "0"}
    applied = apply_defaults({"CCL_ATL_SHM": "1", "CCL_WORKER_OFFLOAD": "0"}, env)
    assert env == {"CCL_ATL_SHM": "0", "CCL_WORKER_OFFLOAD": "0"} and applied == {"CCL_WORKER_OFFLOAD": "0"}
