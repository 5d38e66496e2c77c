"""lars-run end to end with real subprocesses: local pinned instances, Intel MPI ranks,
torchrun-style env, the Slurm rank shim, dry-run plans (memory nodes of described machines
included) and bad-input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from affinity.machine import this_machine
from affinity.plan import RankPlan
from launchers import cli as launchers_cli
from launchers.local import detect_binder, numactl_problem

TOPOS = Path(__file__).parent / "data" / "topologies"
MACHINES = Path(__file__).parent / "data" / "machines"
ALLOWED = sorted(os.sched_getaffinity(0))
FIRST = RankPlan(0, (0,), (ALLOWED[0],), memory_nodes=(0,))  # a rank on the first allowed CPU
MPIEXEC = Path(sys.executable).parent / "mpiexec.hydra"
two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 allowed CPUs")
GUARD = [sys.executable, "-m", "launchers.guard", "--grace-period", "30"]  # in front of mpi and slurm ranks

PROBE = """\
import json, os, sys
keys = ["OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "CCL_WORKER_COUNT", "CCL_WORKER_AFFINITY",
        "I_MPI_PIN_DOMAIN", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
        "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CCL_LOCAL_RANK", "FROM_PLAN", "FROM_PREFIX"]
line = json.dumps({"affinity": sorted(os.sched_getaffinity(0)), **{k: os.environ.get(k) for k in keys}})
sys.stdout.write("PROBE " + line + "\\n")  # one write: ranks share the pipe
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and max(os.sched_getaffinity(0)) == max(%s) else 0)
""" % (ALLOWED,)


def lars_run(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    """``lars-run ARGS`` in a subprocess; ``path`` replaces $PATH (to hide or fake numactl)."""
    env = dict(os.environ) if path is None else dict(os.environ, PATH=path)
    return subprocess.run(
        [sys.executable, "-m", "launchers", *args], capture_output=True, text=True, timeout=60, env=env
    )


def probes(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("PROBE ")]


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


@two_cpus
@pytest.mark.parametrize("manager", ["auto", "numactl", "taskset", "sched"])
def test_two_local_instances_each_see_their_own_cores(tmp_path, probe, manager):
    if manager == "numactl" and detect_binder("auto", FIRST)[0] != "numactl":
        pytest.skip("numactl missing or not permitted here")
    res = lars_run(
        "--ninstances", "2", "--multi-task-manager", manager, "--log-dir", str(tmp_path / "logs"), str(probe)
    )
    assert res.returncode == 0, res.stderr
    seen = [probes((tmp_path / "logs" / f"rank_{i}.log").read_text())[0] for i in range(2)]
    a, b = (set(s["affinity"]) for s in seen)
    assert a and b and not a & b and a | b <= set(ALLOWED)
    for s in seen:
        assert s["OMP_NUM_THREADS"] == str(len(s["affinity"]))
        assert s["GOMP_CPU_AFFINITY"] is not None or s["KMP_AFFINITY"] is not None
        assert s["CCL_WORKER_COUNT"] is None  # independent instances do not talk


@two_cpus
def test_failed_instance_ends_the_job_and_its_exit_code_is_returned(probe):
    res = lars_run("--ninstances", "2", str(probe), "3")  # the instance on the last CPU exits 3
    assert res.returncode == 3
    assert "lars-run: rank 1 on localhost (pid " in res.stderr and "exited with code 3" in res.stderr


@two_cpus
def test_sigterm_to_lars_run_stops_every_instance(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(
        f"import os, time\nopen(os.path.join({str(tmp_path)!r}, f'pid_{{os.getpid()}}'), 'w').close()\ntime.sleep(60)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launchers", "--ninstances", "2", str(sleeper)], stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 30
    while len(list(tmp_path.glob("pid_*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    pids = [int(p.name[4:]) for p in tmp_path.glob("pid_*")]
    assert len(pids) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) in (130, 143)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_numactl_that_fails_here_falls_back_to_taskset(tmp_path):
    fake = tmp_path / "numactl"
    fake.write_text("#!/bin/sh\necho 'set_mempolicy: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    binder, notes = detect_binder("auto", FIRST, path=path)
    assert binder in ("taskset", "sched") and "set_mempolicy" in notes[0]
    from launchers.job import LaunchError

    with pytest.raises(LaunchError, match="--multi-task-manager auto"):
        detect_binder("numactl", FIRST, path=path)


@two_cpus
@pytest.mark.skipif(not MPIEXEC.exists(), reason="impi-rt (mpiexec.hydra) not in this venv")
def test_mpiexec_two_ranks_get_pmi_ids_pin_domains_and_env(tmp_path, probe):
    res = lars_run("--nprocs-per-node", "2", "--log-dir", str(tmp_path / "logs"), str(probe))
    assert res.returncode == 0, res.stderr
    seen = [probes((tmp_path / "logs" / f"rank_{i}.log").read_text())[0] for i in range(2)]
    assert [(s["PMI_RANK"], s["PMI_SIZE"], s["MPI_LOCALRANKID"]) for s in seen] == [("0", "2", "0"), ("1", "2", "1")]
    assert seen[0]["affinity"] == ALLOWED[:1] and seen[1]["affinity"] == ALLOWED[1:2]
    for s in seen:
        assert s["OMP_NUM_THREADS"] == "1" and s["MASTER_ADDR"] == "127.0.0.1"
        assert s["CCL_WORKER_COUNT"] == "1" and s["CCL_WORKER_AFFINITY"] == f"{ALLOWED[0]},{ALLOWED[1]}"


@pytest.mark.slow
@two_cpus
@pytest.mark.skipif(not MPIEXEC.exists(), reason="impi-rt (mpiexec.hydra) not in this venv")
def test_mpiexec_ranks_allreduce_over_oneccl(tmp_path):
    """lars-run's mpiexec ranks join a oneCCL process group through ipex_lars.distributed.init."""
    script = tmp_path / "allreduce.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist, ipex_lars.distributed as d\n"
        "info = d.init(backend='oneccl')\nt = torch.ones(1) * (dist.get_rank() + 1)\n"
        "dist.all_reduce(t)\nsys.stdout.write(f'SUM {t.item()} {info.backend}\\n')\n"
        "dist.destroy_process_group()\n"
    )
    res = lars_run("--nprocs-per-node", "2", str(script))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("SUM 3.0 oneccl") == 2


@two_cpus
def test_torchrun_env_sets_rank_variables_for_each_local_process(probe):
    res = lars_run("--launcher", "torchrun-env", "--nprocs-per-node", "2", "--master-port", "29555", str(probe))
    assert res.returncode == 0, res.stderr
    seen = sorted(probes(res.stdout), key=lambda s: int(s["RANK"]))
    assert [(s["RANK"], s["LOCAL_RANK"], s["WORLD_SIZE"], s["CCL_LOCAL_RANK"]) for s in seen] == [
        ("0", "0", "2", "0"),
        ("1", "1", "2", "1"),
    ]
    assert all(s["MASTER_ADDR"] == "127.0.0.1" and s["MASTER_PORT"] == "29555" for s in seen)
    assert seen[0]["affinity"] != seen[1]["affinity"]


def test_slurm_rank_shim_exports_its_local_rank_entry(probe):
    envs = json.dumps([{"FROM_PLAN": "zero"}, {"FROM_PLAN": "one"}])
    prefixes = json.dumps([["env", "FROM_PREFIX=zero"], ["env", "FROM_PREFIX=one"]])
    env = dict(os.environ, LARS_RANK_ENVS=envs, SLURM_LOCALID="1")
    res = subprocess.run(
        [sys.executable, "-m", "launchers.rank_exec", "--", sys.executable, str(probe)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert probes(res.stdout)[0]["FROM_PLAN"] == "one" and probes(res.stdout)[0]["FROM_PREFIX"] is None
    res = subprocess.run(
        [sys.executable, "-m", "launchers.rank_exec", "--", sys.executable, str(probe)],
        capture_output=True,
        text=True,
        env=dict(env, LARS_RANK_PREFIXES=prefixes),
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert probes(res.stdout)[0]["FROM_PREFIX"] == "one"  # this local rank's command ran in front
    env["SLURM_LOCALID"] = "2"
    res = subprocess.run(
        [sys.executable, "-m", "launchers.rank_exec", "true"], capture_output=True, text=True, env=env, timeout=30
    )
    assert res.returncode == 2 and "--nprocs-per-node" in res.stderr


def _plan(*args: str) -> dict:
    res = lars_run("--dry-run", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_dry_run_json_plans_a_described_two_node_cluster(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# cluster\nxeon-a:2\n10.0.0.2  slots=2\n")
    plan = _plan(
        "--topology",
        str(TOPOS / "2s4c_ht_physfirst.lscpu"),
        "--hostfile",
        str(hosts),
        "--nprocs-per-node",
        "2",
        "--logical-cores-for-ccl",
        "-m",
        "ipex_lars.train",
    )
    assert [n["host"] for n in plan["nodes"]] == ["xeon-a", "10.0.0.2"]
    ranks = plan["ranks"]
    assert [(r["rank"], r["local_rank"], r["host"], r["numa_node"]) for r in ranks] == [
        (0, 0, "xeon-a", 0),
        (1, 1, "xeon-a", 1),
        (2, 0, "10.0.0.2", 0),
        (3, 1, "10.0.0.2", 1),
    ]
    assert ranks[1]["cores"] == [4, 5, 6, 7] and ranks[1]["ccl_worker_cores"] == [15]
    assert set(ranks[0]) >= {"rank", "local_rank", "host", "numa_node", "cores", "ccl_worker_cores", "env", "command"}
    assert ranks[0]["env"]["MASTER_ADDR"] == "xeon-a"
    cmd = plan["command"]
    assert cmd[0].endswith("mpiexec.hydra") and cmd[1:6] == ["-np", "4", "-ppn", "2", "-hostfile"]
    assert plan["files"] == {cmd[6]: "xeon-a\n10.0.0.2\n"}  # written at launch, ipexrun's form
    genv = {cmd[i + 1]: cmd[i + 2] for i, a in enumerate(cmd) if a == "-genv"}
    assert genv["MASTER_ADDR"] == "xeon-a" and genv["I_MPI_PIN"] == "0"  # the shim pins, from its node's plan
    spec = json.loads(genv["LARS_RANK_PLAN"])
    assert spec["request"]["ninstances"] == 2 and spec["request"]["logical_cores_for_ccl"] is True
    assert cmd.count("launchers.guard") == 1 and cmd.count("--pmi-abort") == 1 and cmd.count("launchers.rank_exec") == 1
    assert plan["launch_env"]["I_MPI_JOB_ABORT_SIGNAL"] == "15"  # a failed rank's guard aborts: others get SIGTERM
    assert ranks[0]["command"][-2:] == ["-m", "ipex_lars.train"]


def test_dry_run_plans_slurm_with_cpu_masks():
    plan = _plan(
        "--launcher",
        "slurm",
        "--topology",
        str(TOPOS / "2s8c_snc2_ht.lscpu"),
        "--nnodes",
        "2",
        "--master-addr",
        "head",
        "--grace-period",
        "12.5",
        "train.py",
    )
    assert len(plan["ranks"]) == 8 and plan["command"][0] == "srun"
    assert "--cpu-bind=mask_cpu:0xf,0xf0,0xf00,0xf000" in plan["command"]
    guard = GUARD[:-1] + ["12.5", "--usr2-stops", "--"]
    start = plan["command"].index(sys.executable)
    assert plan["command"][start : start + len(guard) + 3] == guard + [sys.executable, "-m", "launchers.rank_exec"]
    assert json.loads(plan["launch_env"]["LARS_RANK_ENVS"])[3]["GOMP_CPU_AFFINITY"] == "12-14"


def test_dry_run_local_plan_binds_memory_with_numactl_on_the_described_machine():
    plan = _plan("--topology", str(TOPOS / "2s4c_ht_pernode.lscpu"), "--ninstances", "4", "x.py")
    assert [(r["cores"], r["memory_policy"], r["memory_nodes"]) for r in plan["ranks"]] == [
        ([0, 1], "membind", [0]),
        ([2, 3], "membind", [0]),
        ([8, 9], "membind", [1]),
        ([10, 11], "membind", [1]),
    ]
    assert plan["ranks"][2]["command"][:3] == ["numactl", "--physcpubind=8-9", "--membind=1"]
    assert plan["ranks"][2]["env"]["OMP_NUM_THREADS"] == "2"


def test_dry_run_text_lists_ranks():
    res = lars_run("--dry-run", "--topology", str(TOPOS / "4s4c_ht_physfirst.lscpu"), "--latency-mode", "x.py")
    assert res.returncode == 0 and res.stdout.count("numactl --physcpubind=") == 4  # 16 cores / 4
    assert "numactl --physcpubind=12-15 --membind=3" in res.stdout
    header, rank3 = res.stdout.splitlines()[1], res.stdout.splitlines()[5]
    assert rank3[header.index("memory") :].startswith("membind 3 ")


def _machine(name: str, *args: str) -> dict:
    return _plan("--machine", str(MACHINES / name), *args, "x.py")


def _memory(plan: dict) -> list[tuple]:
    return [(r["numa_node"], r["memory_policy"], r["memory_nodes"]) for r in plan["ranks"]]


def test_xeon_phi_flat_quadrant_ranks_all_prefer_the_mcdram_node():
    plan = _machine("xeon-phi-7250-flat-quadrant", "--ninstances", "4", "--memory-node", "hbm")
    assert _memory(plan) == [(0, "preferred", [1])] * 4
    assert plan["ranks"][3]["command"][:3] == ["numactl", "--physcpubind=51-67", "--preferred=1"]
    assert any("4 ranks share HBM/MCDRAM node 1 (16.0 GiB)" in n for n in plan["notes"])


@pytest.mark.parametrize("launcher", ["local", "torchrun-env", "mpi", "slurm"])
def test_xeon_max_snc4_rank_on_node_k_prefers_hbm_node_k_plus_8(launcher):
    plan = _machine("xeon-max-9480-flat-snc4", "--launcher", launcher, "--ninstances", "8", "--memory-node", "hbm")
    assert _memory(plan) == [(k, "preferred", [k + 8]) for k in range(8)]
    commands = [r["command"] for r in plan["ranks"]]
    if launcher in ("local", "torchrun-env"):
        assert commands[5][:3] == ["numactl", "--physcpubind=70-83", "--preferred=13"]
    else:  # pinned by I_MPI_PIN_DOMAIN / srun, memory placed by numactl in front of each rank
        assert [c[:2] for c in commands] == [["numactl", f"--preferred={k + 8}"] for k in range(8)]
    if launcher == "mpi":  # each node's shim plans its ranks' memory itself
        cmd = plan["command"]
        assert json.loads(cmd[cmd.index("LARS_RANK_PLAN") + 1])["memory_node"] == "hbm"
    if launcher == "slurm":
        assert json.loads(plan["launch_env"]["LARS_RANK_PREFIXES"])[5] == ["numactl", "--preferred=13"]


def test_ranks_spanning_nodes_prefer_the_hbm_node_nearest_their_main_node():
    plan = _machine(
        "xeon-max-9480-flat-snc4", "--ninstances", "2", "--ncores-per-instance", "56", "--memory-node", "hbm"
    )
    assert [(r["numa_nodes"], r["memory_nodes"]) for r in plan["ranks"]] == [([0, 1, 2, 3], [8]), ([4, 5, 6, 7], [12])]


def test_memory_node_number_is_preferred_by_every_rank():
    assert _memory(_machine("xeon-max-9480-flat-snc4", "--nodes-list", "0-1", "--memory-node", "12")) == [
        (0, "preferred", [12]),
        (1, "preferred", [12]),
    ]


@pytest.mark.parametrize("extra", [["--memory-node", "ddr"], []])
def test_ddr_and_the_default_bind_each_rank_to_its_own_nodes(extra):
    plan = _machine("xeon-8480-spr-2s", *extra)
    assert _memory(plan) == [(0, "membind", [0]), (1, "membind", [1])]
    assert plan["ranks"][1]["command"][:3] == ["numactl", "--physcpubind=56-111", "--membind=1"]


def test_without_memory_node_mpi_leaves_memory_to_first_touch():
    plan = _machine("xeon-max-9480-flat-snc4", "--nprocs-per-node", "2")
    assert _memory(plan) == [(0, "first-touch", None), (1, "first-touch", None)]
    assert "numactl" not in plan["command"]


def test_machine_plan_uses_all_its_cpus_and_shows_the_topology():
    plan = _machine("xeon-phi-7250-flat-quadrant")
    topo = plan["nodes"][0]["topology"]
    assert (topo["physical_cores"], topo["logical_cpus"], topo["threads_per_core"]) == (68, 272, 4)
    assert plan["nodes"][0]["allowed_cpus"] == "0-271" and plan["ranks"][0]["cores"] == list(range(68))


@pytest.mark.parametrize("name", ["xeon-8160-2s", "xeon-8480-spr-2s", "epyc-7763-zen3"])
def test_hbm_on_a_machine_without_cpu_less_nodes_is_refused(name):
    res = lars_run("--dry-run", "--json", "--machine", str(MACHINES / name), "--memory-node", "hbm", "x.py")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [
        f"lars-run: error: --memory-node hbm: no HBM/MCDRAM node on {MACHINES / name}: "
        "every NUMA node has CPUs (is the memory in cache mode?); drop --memory-node "
        "or use ddr"
    ]


@pytest.mark.parametrize("launcher", ["local", "torchrun-env", "mpi"])
@pytest.mark.parametrize("numactl,why", [("fails", "fails here"), ("missing", "not installed")])
def test_memory_node_without_a_working_numactl_is_refused_not_ignored(tmp_path, launcher, numactl, why):
    """Without --memory-node the plan falls back to pinning CPUs only; with it, lars-run exits 2."""
    if numactl == "fails":
        fake = tmp_path / "numactl"
        fake.write_text("#!/bin/sh\necho 'set_mempolicy: Operation not permitted' >&2\nexit 1\n")
        fake.chmod(0o755)
    path = str(tmp_path)  # nothing else on it: the fallback is sched_setaffinity
    assert lars_run("--dry-run", "--launcher", launcher, "x.py", path=path).returncode == 0
    res = lars_run("--dry-run", "--launcher", launcher, "--memory-node", "ddr", "x.py", path=path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"lars-run: error: --memory-node ddr needs numactl to place memory, but numactl {why}"
    )
    assert lines[0].endswith("install numactl (apt-get install numactl) or drop --memory-node")


HERE_NODE = next((m.node for m in this_machine().memory_nodes if ALLOWED[0] in m.cpus), None)


def _numactl_skip_reason() -> str | None:
    if HERE_NODE is None:
        return "no NUMA node visible in /sys/devices/system/node"
    why = numactl_problem(
        RankPlan(0, (HERE_NODE,), (ALLOWED[0],), memory_nodes=(HERE_NODE,), memory_policy="preferred")
    )
    return f"numactl {why} (apt-get install numactl; containers may forbid set_mempolicy)" if why else None


@pytest.mark.parametrize("choice,policy", [("N", "preferred node: {n}"), ("ddr", "membind: {n}")])
def test_memory_node_really_places_memory_here(choice, policy):
    """A real launch: the rank runs `numactl --show` under the binding lars-run chose."""
    reason = _numactl_skip_reason()
    if reason:
        pytest.skip(reason)
    res = lars_run(
        "--ninstances", "1", "--memory-node", str(HERE_NODE) if choice == "N" else choice, "numactl", "--show"
    )
    assert res.returncode == 0, res.stderr
    shown = res.stdout.splitlines()
    assert ("policy: preferred" if choice == "N" else "policy: bind") in shown
    assert policy.format(n=HERE_NODE) in [line.strip() for line in shown]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nodes-list", "7", "x.py"], "NUMA node 7 in --nodes-list does not exist"),
        (["--ninstances", "99", "x.py"], "lower --ninstances"),
        (["--hostfile", "/nonexistent/hosts", "x.py"], "cannot read hostfile /nonexistent/hosts"),
        (["--nnodes", "2", "x.py"], "needs --hostfile"),
        (["--topology", "/nonexistent.lscpu", "--dry-run", "x.py"], "cannot read topology file"),
        (["--nodes-list", "a-b", "x.py"], "bad CPU list"),
        (["--ninstances", "1"], "no PROGRAM given"),
        (["--multi-task-manager", "sched", "/nonexistent/prog"], "program /nonexistent/prog not found"),
        (["/nonexistent/train.py"], "script /nonexistent/train.py not found"),
        (["--topology", str(TOPOS / "1s4c_noht.lscpu"), "x.py"], "add --dry-run"),
        (["--allowed-cpus", "0-4095", "x.py"], "includes CPUs this process may not use"),
        (
            ["--launcher", "mpi", "--nnodes", "0", "x.py"],
            "argument --nnodes: expected a whole number from 1 to 65536, got '0'",
        ),
        (
            ["--nprocs-per-node", "0", "x.py"],
            "argument --nprocs-per-node: expected a whole number from 1 to 8192, got '0'",
        ),
        (["--ninstances", "-2", "x.py"], "argument --ninstances: expected a whole number from 1 to 8192, got '-2'"),
        (["--ncores-per-instance", "0", "x.py"], "argument --ncores-per-instance: expected a whole number from 1 to"),
        (
            ["--master-port", "99999", "x.py"],
            "argument --master-port: expected a whole number from 1 to 65535, got '99999'",
        ),
        (["--master-port", "-1", "x.py"], "argument --master-port: expected a whole number from 1 to 65535, got '-1'"),
        (["--master-port", "http", "x.py"], "argument --master-port: expected a whole number from 1 to 65535"),
        (["--node-rank", "-1", "x.py"], "argument --node-rank: expected a whole number from 0 to 65535, got '-1'"),
        (["--dry-run", "--launcher", "torchrun-env", "--node-rank", "1", "x.py"], "--node-rank 1 is outside 0..0"),
        (["--ccl-worker-count", "-1", "x.py"], "argument --ccl-worker-count: expected a whole number from 0 to 64"),
        (["--grace-period", "-1", "x.py"], "argument --grace-period: expected a number from 0 to 3600, got '-1'"),
        (["--grace-period", "nan", "x.py"], "argument --grace-period: expected a number from 0 to 3600, got 'nan'"),
        (
            ["--dry-run", "--machine", str(MACHINES / "xeon-8160-2s"), "--memory-node", "99", "x.py"],
            f"no NUMA node 99 with memory on {MACHINES / 'xeon-8160-2s'} (nodes: 0-1)",
        ),
        (
            ["--dry-run", "--machine", str(MACHINES / "xeon-phi-7250-flat-quadrant"), "--memory-node", "2", "x.py"],
            "(nodes: 0-1); pick one of them, hbm or ddr",
        ),
        (["--dry-run", "--memory-node", "4096", "x.py"], "no NUMA node 4096 with memory"),
        (["--dry-run", "--memory-node", "fast", "x.py"], "'fast' is not hbm, ddr or a NUMA node number"),
        (["--dry-run", "--memory-node", "-1", "x.py"], "is not hbm, ddr or a NUMA node number"),
        (
            ["--dry-run", "--topology", str(TOPOS / "1s4c_noht.lscpu"), "--memory-node", "hbm", "x.py"],
            "plan with --machine DIR",
        ),
        (["--machine", str(MACHINES / "xeon-8160-2s"), "x.py"], "add --dry-run"),
        (["--dry-run", "--machine", "/nonexistent", "x.py"], "python -m affinity.machine --save DIR"),
        (["--dry-run", "--machine", str(MACHINES), "x.py"], "cpuinfo"),
        (
            [
                "--dry-run",
                "--machine",
                str(MACHINES / "xeon-8160-2s"),
                "--topology",
                str(TOPOS / "1s4c_noht.lscpu"),
                "x.py",
            ],
            "not allowed with argument",
        ),
        (
            ["--dry-run", "--multi-task-manager", "taskset", "--memory-node", "ddr", "x.py"],
            "--memory-node ddr needs numactl, but --multi-task-manager taskset cannot place memory",
        ),
        (
            [
                "--dry-run",
                "--machine",
                str(MACHINES / "xeon-max-9480-flat-snc4"),
                "--multi-task-manager",
                "sched",
                "--memory-node",
                "hbm",
                "x.py",
            ],
            "--multi-task-manager sched cannot place memory",
        ),
        (["--bogus-flag", "x.py"], "unrecognized arguments"),
        (["--memory-allocator", "jemalloc", "--dry-run", "x.py"], None),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(args, message, capsys):
    try:
        code = launchers_cli.main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    if message is None:  # an error only where jemalloc is really missing
        if code == 0:
            pytest.skip("jemalloc is installed here, so --memory-allocator jemalloc is no error")
        message = "libjemalloc2"
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lars-run: error:") and message in lines[0]


def test_bad_hostfile_entry_names_the_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1\nnot_a host!\n")
    res = lars_run("--hostfile", str(hosts), "--dry-run", "x.py")
    assert res.returncode == 2 and "line 2" in res.stderr and "'not_a'" in res.stderr


def test_help_documents_every_ipexrun_flag():
    res = lars_run("--help")
    assert res.returncode == 0
    for flag in [
        "--grace-period",
        "--ninstances",
        "--ncores-per-instance",
        "--nodes-list",
        "--use-logical-cores",
        "--throughput-mode",
        "--latency-mode",
        "--memory-allocator",
        "--omp-runtime",
        "--multi-task-manager",
        "--nnodes",
        "--nprocs-per-node",
        "--ccl-worker-count",
        "--logical-cores-for-ccl",
        "--hostfile",
        "--master-addr",
        "--master-port",
        "--log-dir",
        "--launcher",
        "--dry-run",
        "--json",
        "--topology",
        "--machine",
        "--memory-node",
    ]:
        assert flag in res.stdout
    assert "MCDRAM" in res.stdout and "--preferred" in res.stdout


def _dry_env(*args: str) -> list[dict]:
    res = lars_run("--dry-run", "--json", *args)
    assert res.returncode == 0, res.stderr
    return [r["env"] for r in json.loads(res.stdout)["ranks"]]


def test_each_job_gets_its_own_id_and_a_free_port_unless_given(tmp_path):
    """Two jobs on one machine never share a rendezvous port or a job id (a fixed 29500 let them meet)."""
    first = _dry_env("--launcher", "torchrun-env", "--nprocs-per-node", "2", "x.py")
    second = _dry_env("--launcher", "torchrun-env", "--nprocs-per-node", "2", "x.py")
    assert first[0]["MASTER_PORT"] != "29500"
    assert len({e["MASTER_PORT"] for e in first}) == 1
    res = lars_run("--dry-run", "--json", "--launcher", "torchrun-env", "--nprocs-per-node", "2", "x.py")
    notes = " ".join(json.loads(res.stdout)["notes"])
    assert "job id job-" in notes and "free on 127.0.0.1" in notes
    given = _dry_env("--launcher", "torchrun-env", "--nprocs-per-node", "2", "--master-port", "29555", "x.py")
    assert given[0]["MASTER_PORT"] == "29555"
    assert (first[0]["MASTER_PORT"], second[0]["MASTER_PORT"]) != ("29555", "29555")


def test_nodes_that_each_run_lars_run_agree_on_port_and_job_id(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("10.9.0.1\n10.9.0.2\n")

    def job_id_note(*args: str) -> str:
        out = lars_run(
            "--dry-run",
            "--json",
            "--launcher",
            "torchrun-env",
            "--hostfile",
            str(hostfile),
            "--nprocs-per-node",
            "1",
            *args,
        )
        assert out.returncode == 0, out.stderr
        return next(n for n in json.loads(out.stdout)["notes"] if n.startswith("job id"))

    notes = [job_id_note("--node-rank", str(n), "x.py") for n in (0, 1)]
    assert notes[0] == notes[1] and "derived from job id" in notes[0]
    assert job_id_note("other.py") != notes[0]
