"""Multi-node jobs for real, on a simulated cluster (tests/simcluster.py): two network namespaces
on a bridge, each with a decoy interface listed before the cluster one, as root.

Every launcher runs a 2-node job: hydra (its proxies started in the nodes through the bootstrap
script), srun (Slurm daemons in the namespaces), and torchrun-env (one lars-run per node). Each
trains DDP over oneccl and gloo, and must end with the weights of one process that took the
whole batch. Then stops and failures across nodes: SIGKILL of the rank on the other node, and
SIGTERM to lars-run; every process of the job, on every node, must be gone within seconds.
Each of those prints ``CLUSTER-TIMING <launcher> <event> <seconds>`` (see with ``pytest -s``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import simcluster
import simslurm
import torch
from dist_workers import harness
from dist_workers.harness import oneccl_built  # noqa: F401  (session fixture)

from ipex_lars.bench.local_job import finish

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "dist_workers"
STEPS = "4"
LAUNCHERS = ["mpi", "torchrun-env", "slurm"]
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = simcluster.unavailable_reason()
    if why:
        pytest.skip(why)
    simcluster.clean_stale()
    built = simcluster.build(2, tmp_path_factory.mktemp("ilc"))
    try:
        yield built
    finally:
        built.teardown()


@pytest.fixture(scope="module")
def slurm(cluster):
    why = simslurm.unavailable_reason()
    if why:
        pytest.skip(why)
    daemons = simslurm.start(cluster, timeout=90)
    try:
        yield daemons
    finally:
        daemons.stop()


def job_env(cluster, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = harness.base_env(PYTHONPATH=f"{ROOT}{os.pathsep}{WORKERS.parent}", **cluster.hydra_env())
    env.update(extra or {})
    return env


def launch(request, cluster, launcher: str, program: list[str]) -> list[subprocess.Popen]:
    """Start ``program`` as a 2-node, 1-rank-per-node job; lars-run runs on the nodes themselves."""
    extra = request.getfixturevalue("slurm").env() if launcher == "slurm" else {}
    env = job_env(cluster, extra)
    lars_run = [
        sys.executable,
        "-m",
        "launchers",
        "--launcher",
        launcher,
        "--nprocs-per-node",
        "1",
        "--grace-period",
        "5",
    ]
    if launcher == "slurm":  # srun allocates; nodes, master address and port come from Slurm
        argvs = [cluster.nodes[0].command([*lars_run, "--nnodes", "2", *program])]
    elif launcher == "mpi":
        argvs = [cluster.nodes[0].command([*lars_run, "--hostfile", str(cluster.hostfile), *program])]
    else:
        argvs = [
            n.command([*lars_run, "--hostfile", str(cluster.hostfile), "--node-rank", str(n.index), *program])
            for n in cluster.nodes
        ]
    return [subprocess.Popen(a, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    run = harness.single("ddp_train.py", ["gloo", STEPS, str(out)])
    assert run.rc == 0, harness.describe([run])
    return torch.load(out / "rank0.pt")


def test_each_node_picks_its_cluster_interface_not_the_decoy(cluster):
    probe = (
        "from ipex_lars.distributed import interface; from ipex_lars.distributed.env import Launch; "
        "print(interface.choose(Launch('torchrun', 1, 2, 0, 1, 'ilcnode0', 1))[0])"
    )
    for node in cluster.nodes:
        res = subprocess.run(
            node.command([sys.executable, "-c", probe]),
            env=job_env(cluster),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "ilcv"  # the decoy "ilcd" is listed first


@pytest.mark.parametrize("backend", ["oneccl", "gloo"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_node_ddp_ends_with_the_weights_of_one_process(request, cluster, one_process, launcher, backend, tmp_path):
    if backend == "oneccl":
        request.getfixturevalue("oneccl_built")
    start = time.monotonic()
    runs = finish(
        launch(request, cluster, launcher, [str(WORKERS / "ddp_train.py"), backend, STEPS, str(tmp_path)]), timeout=150
    )
    took = time.monotonic() - start
    assert [r.rc for r in runs] == [0] * len(runs), harness.describe(runs)
    assert "".join(r.out for r in runs).count("TRAINED") == 2
    # with the decoy interface first, oneCCL without the interface choice fails only after 120 s
    assert took < 90, f"{launcher}/{backend} took {took:.0f} s"
    print(f"CLUSTER-TIMING {launcher} train-{backend} {took:.1f}")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name} differs between the nodes"
        torch.testing.assert_close(
            value, one_process[name], rtol=1e-5, atol=1e-6, msg=f"{name}: 2 nodes vs one process on the whole batch"
        )


def namespace_pids(cluster) -> set[int]:
    pids = set()
    for node in cluster.nodes:
        out = subprocess.run(["ip", "netns", "pids", node.ns], capture_output=True, text=True).stdout
        pids |= {int(p) for p in out.split()}
    return pids


def wait_up(out: Path, procs: list[subprocess.Popen], timeout: float = 90) -> dict[int, int]:
    """{rank: pid} once both ranks have joined; fails with the launchers' output if they do not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        up = {int(p.name.split("_")[1]): int(p.name.split("_")[2]) for p in out.glob("up_*")}
        if len(up) == 2:
            return up
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        p.kill()
    pytest.fail("ranks did not come up:\n" + harness.describe(finish(procs, 10)))


@pytest.mark.parametrize("event", ["sigkill-rank-on-other-node", "sigterm-lars-run"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_process_on_every_node_ends_after_a_stop_or_a_death(request, cluster, launcher, event, tmp_path):
    if launcher == "slurm":
        request.getfixturevalue("slurm")
    before = namespace_pids(cluster)  # the Slurm daemons
    procs = launch(request, cluster, launcher, [str(WORKERS / "cluster_rank.py"), "gloo", str(tmp_path)])
    up = wait_up(tmp_path, procs)
    remote = subprocess.run(["ip", "netns", "pids", cluster.nodes[1].ns], capture_output=True, text=True).stdout
    assert str(up[1]) in remote.split()  # rank 1 really runs on the other node
    start = time.monotonic()
    if event == "sigkill-rank-on-other-node":
        os.kill(up[1], signal.SIGKILL)
    else:
        procs[0].send_signal(signal.SIGTERM)
    deadline = start + 60
    left: set[int] = set()
    while time.monotonic() < deadline:
        left = namespace_pids(cluster) - before
        if not left and all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    took = time.monotonic() - start
    runs = finish(procs, 10)
    print(f"CLUSTER-TIMING {launcher} {event} {took:.2f}")
    assert not left, f"still running after 60 s: {sorted(left)}\n" + harness.describe(runs)
    assert took < 30, harness.describe(runs)
    if event == "sigterm-lars-run":
        # the ranks got SIGTERM, not SIGKILL (a rank blocked in a collective may be ended by its peer's exit first)
        assert [p.read_text() for p in tmp_path.glob("saved_*")][:1] == ["SIGTERM"], harness.describe(runs)
        assert runs[0].rc == 128 + signal.SIGTERM
    else:
        assert runs[0].rc not in (0, None), harness.describe(runs)
        said = "".join(r.err for r in runs)
        assert "rank 1" in said and "ilcnode1" in said, harness.describe(runs)  # the dead rank and its node, named


def test_print_sbatch_script_runs_inside_its_allocation(cluster, slurm, one_process, tmp_path):
    """The generated batch script, submitted: lars-run takes nodes, master address and port from the
    allocation (SLURM_JOB_NODELIST, job id) with no hostfile."""
    env = job_env(cluster, slurm.env())
    program = [str(WORKERS / "ddp_train.py"), "gloo", STEPS, str(tmp_path)]
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers",
            "--launcher",
            "slurm",
            "--print-sbatch",
            "--nnodes",
            "2",
            "--nprocs-per-node",
            "1",
            "--grace-period",
            "5",
            *program,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(made.stdout)
    run = subprocess.run(
        cluster.nodes[0].command(["sbatch", "--wait", f"--chdir={tmp_path}", str(script)]),
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    outputs = "".join(p.read_text() for p in tmp_path.glob("lars-run-*.out"))
    assert run.returncode == 0, run.stderr + outputs
    assert outputs.count("TRAINED") == 2 and "derived by the ranks from Slurm" in outputs
    rank0 = torch.load(tmp_path / "rank0.pt")
    for name, value in rank0.items():
        torch.testing.assert_close(value, one_process[name], rtol=1e-5, atol=1e-6, msg=name)


PROBE = (
    "import json, os, socket; print('PROBE ' + json.dumps([os.environ['PMI_RANK'], socket.gethostname(), "
    "sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS']]), flush=True)"
)


def test_mpi_ranks_are_planned_on_their_own_node(cluster, tmp_path):
    """Node 1 may use only the last CPU (as a smaller node, or one under a cpuset): its rank's shim
    plans from that, while node 0's rank gets its own, larger plan, in the same job."""
    cpus = sorted(os.sched_getaffinity(0))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = job_env(cluster, {"ILC_CPUS_ilcnode1": str(cpus[-1])})
    run = subprocess.run(
        cluster.nodes[0].command(
            [
                sys.executable,
                "-m",
                "launchers",
                "--launcher",
                "mpi",
                "--hostfile",
                str(cluster.hostfile),
                "--nprocs-per-node",
                "1",
                str(probe),
            ]
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = sorted(json.loads(line[6:]) for line in run.stdout.splitlines() if line.startswith("PROBE "))
    assert seen == [["0", "ilcnode0", cpus, "1"], ["1", "ilcnode1", [cpus[-1]], "1"]]
