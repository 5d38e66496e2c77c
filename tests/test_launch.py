"""lars-run end to end with real subprocesses: local pinned instances, Intel MPI ranks,
torchrun-style env, the Slurm rank shim, dry-run plans and bad-input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.local import detect_binder

TOPOS = Path(__file__).parent / "data" / "topologies"
ALLOWED = sorted(os.sched_getaffinity(0))
MPIEXEC = Path(sys.executable).parent / "mpiexec.hydra"
two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 allowed CPUs")

PROBE = """\
import json, os, sys
keys = ["OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "CCL_WORKER_COUNT", "CCL_WORKER_AFFINITY",
        "I_MPI_PIN_DOMAIN", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
        "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CCL_LOCAL_RANK", "FROM_PLAN"]
line = json.dumps({"affinity": sorted(os.sched_getaffinity(0)), **{k: os.environ.get(k) for k in keys}})
sys.stdout.write("PROBE " + line + "\\n")  # one write: ranks share the pipe
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and max(os.sched_getaffinity(0)) == max(%s) else 0)
""" % (ALLOWED,)


def lars_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers", *args], capture_output=True, text=True,
                          timeout=60)


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
    if manager == "numactl" and detect_binder("auto", ALLOWED[0], 0)[0] != "numactl":
        pytest.skip("numactl missing or not permitted here")
    res = lars_run("--ninstances", "2", "--multi-task-manager", manager, "--log-dir", str(tmp_path / "logs"),
                   str(probe))
    assert res.returncode == 0, res.stderr
    seen = [probes((tmp_path / "logs" / f"rank_{i}.log").read_text())[0] for i in range(2)]
    a, b = (set(s["affinity"]) for s in seen)
    assert a and b and not a & b and a | b <= set(ALLOWED)
    for s in seen:
        assert s["OMP_NUM_THREADS"] == str(len(s["affinity"]))
        assert s["GOMP_CPU_AFFINITY"] is not None or s["KMP_AFFINITY"] is not None
        assert s["CCL_WORKER_COUNT"] is None  # independent instances do not talk


@two_cpus
def test_worst_exit_code_is_returned(probe):
    res = lars_run("--ninstances", "2", str(probe), "3")  # the instance on the last CPU exits 3
    assert res.returncode == 3
    assert len(probes(res.stdout)) == 2


@two_cpus
def test_sigterm_to_lars_run_stops_every_instance(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time\nopen(os.path.join({str(tmp_path)!r}, f'pid_{{os.getpid()}}'), 'w').close()\n"
                       "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-m", "launchers", "--ninstances", "2", str(sleeper)],
                                stderr=subprocess.DEVNULL)
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
    binder, notes = detect_binder("auto", ALLOWED[0], 0, path=path)
    assert binder in ("taskset", "sched") and "set_mempolicy" in notes[0]
    from launchers.job import LaunchError
    with pytest.raises(LaunchError, match="--multi-task-manager auto"):
        detect_binder("numactl", ALLOWED[0], 0, path=path)


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
    script.write_text("import sys, torch, torch.distributed as dist, ipex_lars.distributed as d\n"
                      "info = d.init(backend='oneccl')\nt = torch.ones(1) * (dist.get_rank() + 1)\n"
                      "dist.all_reduce(t)\nsys.stdout.write(f'SUM {t.item()} {info.backend}\\n')\n"
                      "dist.destroy_process_group()\n")
    res = lars_run("--nprocs-per-node", "2", str(script))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("SUM 3.0 oneccl") == 2


@two_cpus
def test_torchrun_env_sets_rank_variables_for_each_local_process(probe):
    res = lars_run("--launcher", "torchrun-env", "--nprocs-per-node", "2", "--master-port", "29555", str(probe))
    assert res.returncode == 0, res.stderr
    seen = sorted(probes(res.stdout), key=lambda s: int(s["RANK"]))
    assert [(s["RANK"], s["LOCAL_RANK"], s["WORLD_SIZE"], s["CCL_LOCAL_RANK"]) for s in seen] == \
        [("0", "0", "2", "0"), ("1", "1", "2", "1")]
    assert all(s["MASTER_ADDR"] == "127.0.0.1" and s["MASTER_PORT"] == "29555" for s in seen)
    assert seen[0]["affinity"] != seen[1]["affinity"]


def test_slurm_rank_shim_exports_its_local_rank_entry(probe):
    envs = json.dumps([{"FROM_PLAN": "zero"}, {"FROM_PLAN": "one"}])
    env = dict(os.environ, LARS_RANK_ENVS=envs, SLURM_LOCALID="1")
    res = subprocess.run([sys.executable, "-m", "launchers.rank_exec", "--", sys.executable, str(probe)],
                         capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    assert probes(res.stdout)[0]["FROM_PLAN"] == "one"
    env["SLURM_LOCALID"] = "2"
    res = subprocess.run([sys.executable, "-m", "launchers.rank_exec", "true"], capture_output=True,
                         text=True, env=env, timeout=30)
    assert res.returncode == 2 and "--nprocs-per-node" in res.stderr


def _plan(*args: str) -> dict:
    res = lars_run("--dry-run", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_dry_run_json_plans_a_described_two_node_cluster(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# cluster\nxeon-a:2\n10.0.0.2  slots=2\n")
    plan = _plan("--topology", str(TOPOS / "2s4c_ht_physfirst.lscpu"), "--hostfile", str(hosts),
                 "--nprocs-per-node", "2", "--logical-cores-for-ccl", "-m", "ipex_lars.train")
    assert [n["host"] for n in plan["nodes"]] == ["xeon-a", "10.0.0.2"]
    ranks = plan["ranks"]
    assert [(r["rank"], r["local_rank"], r["host"], r["numa_node"]) for r in ranks] == [
        (0, 0, "xeon-a", 0), (1, 1, "xeon-a", 1), (2, 0, "10.0.0.2", 0), (3, 1, "10.0.0.2", 1)]
    assert ranks[1]["cores"] == [4, 5, 6, 7] and ranks[1]["ccl_worker_cores"] == [15]
    assert set(ranks[0]) >= {"rank", "local_rank", "host", "numa_node", "cores", "ccl_worker_cores", "env", "command"}
    assert ranks[0]["env"]["I_MPI_PIN_DOMAIN"] == "[0x80f,0x80f0]"
    assert ranks[0]["env"]["MASTER_ADDR"] == "xeon-a"
    cmd = plan["command"]
    assert cmd[0].endswith("mpiexec.hydra") and cmd.count(":") == 3 and cmd.count("-host") == 4
    assert ranks[0]["command"][-2:] == ["-m", "ipex_lars.train"]


def test_dry_run_plans_slurm_with_cpu_masks():
    plan = _plan("--launcher", "slurm", "--topology", str(TOPOS / "2s8c_snc2_ht.lscpu"), "--nnodes", "2",
                 "--master-addr", "head", "train.py")
    assert len(plan["ranks"]) == 8 and plan["command"][0] == "srun"
    assert "--cpu-bind=mask_cpu:0xf,0xf0,0xf00,0xf000" in plan["command"]
    assert json.loads(plan["launch_env"]["LARS_RANK_ENVS"])[3]["GOMP_CPU_AFFINITY"] == "12-14"


def test_dry_run_local_plan_binds_memory_with_numactl_on_the_described_machine():
    plan = _plan("--topology", str(TOPOS / "2s4c_ht_pernode.lscpu"), "--ninstances", "4", "x.py")
    assert [(r["cores"], r["membind"]) for r in plan["ranks"]] == [
        ([0, 1], [0]), ([2, 3], [0]), ([8, 9], [1]), ([10, 11], [1])]
    assert plan["ranks"][2]["command"][:3] == ["numactl", "--physcpubind=8-9", "--membind=1"]
    assert plan["ranks"][2]["env"]["OMP_NUM_THREADS"] == "2"


def test_dry_run_text_lists_ranks():
    res = lars_run("--dry-run", "--topology", str(TOPOS / "4s4c_ht_physfirst.lscpu"), "--latency-mode", "x.py")
    assert res.returncode == 0 and res.stdout.count("numactl --physcpubind=") == 4  # 16 cores / 4
    assert "numactl --physcpubind=12-15 --membind=3" in res.stdout


@pytest.mark.parametrize("args,message", [
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
    (["--launcher", "mpi", "--nnodes", "0", "x.py"], "--nnodes must be >= 1"),
    (["--bogus-flag", "x.py"], "unrecognized arguments"),
    (["--memory-allocator", "jemalloc", "--dry-run", "x.py"], None),
])
def test_bad_input_gives_one_line_error_and_exit_2(args, message):
    res = lars_run(*args)
    if message is None:  # only an error when jemalloc is really missing here
        if res.returncode == 0:
            return
        message = "libjemalloc2"
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lars-run: error:") and message in lines[0]
    assert "Traceback" not in res.stderr


def test_bad_hostfile_entry_names_the_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1\nnot_a host!\n")
    res = lars_run("--hostfile", str(hosts), "--dry-run", "x.py")
    assert res.returncode == 2 and "line 2" in res.stderr and "'not_a'" in res.stderr


def test_help_documents_every_ipexrun_flag():
    res = lars_run("--help")
    assert res.returncode == 0
    for flag in ["--ninstances", "--ncores-per-instance", "--nodes-list", "--use-logical-cores",
                 "--throughput-mode", "--latency-mode", "--memory-allocator", "--omp-runtime",
                 "--multi-task-manager", "--nnodes", "--nprocs-per-node", "--ccl-worker-count",
                 "--logical-cores-for-ccl", "--hostfile", "--master-addr", "--master-port", "--log-dir",
                 "--launcher", "--dry-run", "--json", "--topology"]:
        assert flag in res.stdout
