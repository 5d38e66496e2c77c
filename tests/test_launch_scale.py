"""lars-run at cluster scale without a cluster: the mpiexec and srun commands have one size for 4 or
4,096 ranks (what the kernel's argument limits demand), the Slurm hostlist syntax, the sbatch
script, and each node's rank shim planning from that node's own CPUs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import cli as launchers_cli
from launchers.hostlist import HostlistError, expand

TOPO = Path(__file__).parent / "data" / "topologies" / "2s4c_ht_physfirst.lscpu"
ARG_LIMIT = 128 * 1024  # Linux: one argument at most (MAX_ARG_STRLEN)


def lars_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launchers", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


def command_bytes(argv: list[str]) -> int:
    return sum(len(a.encode()) + 1 for a in argv)


@pytest.mark.parametrize("launcher", ["mpi", "slurm"])
def test_the_command_for_2048_nodes_is_as_small_as_for_2(tmp_path, launcher):
    sizes = {}
    for nodes in (2, 2048):
        hosts = tmp_path / f"hosts{nodes}"
        hosts.write_text("".join(f"node{i:04d}\n" for i in range(nodes)))
        start = time.monotonic()
        res = lars_run(
            "--dry-run",
            "--json",
            "--launcher",
            launcher,
            "--topology",
            str(TOPO),
            "--hostfile",
            str(hosts),
            "--nprocs-per-node",
            "2",
            "--mpiexec",
            "/bin/true",
            "-m",
            "ipex_lars",
            "train",
        )
        took = time.monotonic() - start
        assert res.returncode == 0, res.stderr
        plan = json.loads(res.stdout)
        assert len(plan["ranks"]) == 2 * nodes
        sizes[nodes] = command_bytes(plan["command"])
        assert max(len(a) for a in plan["command"]) < ARG_LIMIT
        assert list(plan["files"].values()) == [hosts.read_text()]  # the hosts travel in a file
        print(f"SIZE {launcher} {nodes}x2 command {sizes[nodes]} bytes, dry run {took:.2f} s")
    assert sizes[2048] - sizes[2] < 16  # a few more digits in -np / the master's name, nothing per rank
    assert sizes[2048] < 4096


def test_mpi_command_is_ipexruns_form_with_extra_params(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a\nb\n")
    res = lars_run(
        "--dry-run",
        "--json",
        "--topology",
        str(TOPO),
        "--hostfile",
        str(hosts),
        "--nprocs-per-node",
        "2",
        "--mpiexec",
        "/bin/true",
        "--extra-mpi-params=-genv I_MPI_DEBUG 5 -l",
        "x.py",
    )
    assert res.returncode == 0, res.stderr
    cmd = json.loads(res.stdout)["command"]
    assert cmd[:6] == ["/bin/true", "-np", "4", "-ppn", "2", "-hostfile"]
    at = cmd.index("I_MPI_DEBUG")
    assert cmd[at - 1 : at + 3] == ["-genv", "I_MPI_DEBUG", "5", "-l"] and cmd[at + 3] == sys.executable


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bind-numa-node", "x.py"], "--bind-numa-node (ipexrun) is not a lars-run flag"),
        (
            ["--launcher", "slurm", "--nnodes", "2", "--extra-mpi-params=-l", "x.py"],
            "--extra-mpi-params only applies to --launcher mpi",
        ),
        (["--nprocs-per-node", "2", "--extra-mpi-params", "'unclosed", "x.py"], "No closing quotation"),
        (["--print-sbatch", "x.py"], "--print-sbatch writes a Slurm batch script; add --launcher slurm"),
        (["--ninstances", "2", "--iface", "eth0", "x.py"], "--iface applies to ranks that talk"),
    ],
)
def test_ipexrun_flags_that_do_not_apply_are_refused_in_one_line(args, message, capsys):
    assert launchers_cli.main(["--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err


def test_slurm_hostlists_expand_like_scontrol():
    assert expand("node[1-3,5],gpu[07-10]") == ["node1", "node2", "node3", "node5", "gpu07", "gpu08", "gpu09", "gpu10"]
    assert expand("r[1-2]n[01-02],login") == ["r1n01", "r1n02", "r2n01", "r2n02", "login"]
    for bad in ("n[1-", "n[a-b]", "", "n]1["):
        with pytest.raises(HostlistError):
            expand(bad)


def test_inside_an_allocation_slurm_needs_no_hostfile_and_leaves_master_to_the_ranks():
    res = lars_run(
        "--dry-run",
        "--json",
        "--launcher",
        "slurm",
        "--topology",
        str(TOPO),
        "--nprocs-per-node",
        "2",
        "x.py",
        env={"SLURM_JOB_NODELIST": "cn[07-09]", "SLURM_JOB_ID": "4242"},
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert [n["host"] for n in plan["nodes"]] == ["cn07", "cn08", "cn09"]
    assert "--nodes=3" in plan["command"] and "--cpus-per-task=4" in plan["command"]
    assert not any("MASTER_" in k for r in plan["ranks"] for k in r["env"])
    assert not any("MASTER_" in k for k in plan["launch_env"])


def test_print_sbatch_allocates_the_plan_and_reruns_the_same_command():
    plan = ["--topology", str(TOPO), "--nnodes", "4", "--nprocs-per-node", "2"]
    rest = [*plan, "-m", "ipex_lars", "train", "--recipe", "digits"]
    res = lars_run("--launcher", "slurm", "--print-sbatch", *rest)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert {"#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=4"} <= set(lines)
    assert shlex.split(lines[-1]) == ["exec", sys.executable, "-m", "launchers", "--launcher", "slurm", *rest]


PROBE = (
    "import json, os; print('PROBE ' + json.dumps({'affinity': sorted(os.sched_getaffinity(0)), "
    "'omp': os.environ.get('OMP_NUM_THREADS'), 'plan': os.environ.get('LARS_RANK_PLAN')}))"
)


def shim(spec: dict, local: int, cpus: str) -> subprocess.CompletedProcess:
    """The rank shim as hydra starts it, on a "node" whose CPUs are ``cpus`` (its affinity mask)."""
    env = dict(os.environ, LARS_RANK_PLAN=json.dumps(spec), MPI_LOCALRANKID=str(local))
    return subprocess.run(
        ["taskset", "-c", cpus, sys.executable, "-m", "launchers.rank_exec", "--", sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def spec(ninstances: int) -> dict:
    request = {
        "ninstances": ninstances,
        "ncores_per_instance": None,
        "nodes_list": None,
        "use_logical_cores": False,
        "ccl_worker_count": 0,
        "logical_cores_for_ccl": False,
        "mode": None,
    }
    return {
        "request": request,
        "allowed": None,
        "memory_allocator": "default",
        "omp_runtime": "default",
        "memory_node": None,
    }


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")
def test_each_node_plans_its_ranks_from_its_own_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    both = f"{cpus[0]},{cpus[1]}"
    seen = [json.loads(shim(spec(2), local, both).stdout.split("PROBE ")[1]) for local in (0, 1)]
    assert [s["affinity"] for s in seen] == [[cpus[0]], [cpus[1]]] and seen[0]["omp"] == "1"
    assert seen[0]["plan"] is None  # consumed by the shim, not passed on
    one = json.loads(shim(spec(1), 0, str(cpus[1])).stdout.split("PROBE ")[1])  # a smaller node: its own plan
    assert one["affinity"] == [cpus[1]]
    res = shim(spec(2), 1, str(cpus[1]))  # too small for 2 ranks per node: named, exit 2
    assert res.returncode == 2 and res.stderr.startswith("rank_exec: cannot plan the ranks of node ")
