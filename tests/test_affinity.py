"""Topology parsing/discovery, pinning plans and memory placement on fake machines (data files),
env and library lookup."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from affinity.cpuset import CpuListError, allowed_cpus, cgroup_cpuset, format_cpulist, hex_mask, parse_cpulist
from affinity.machine import load_machine
from affinity.plan import PlacementError, PlanRequest, make_plan, place_memory
from affinity.rank_env import EnvError, find_library, merge_preload, rank_env, resolve
from affinity.topology import TopologyError, from_lscpu, from_sysfs, load_topology, parse_lscpu

TOPOS = Path(__file__).parent / "data" / "topologies"
MACHINES = Path(__file__).parent / "data" / "machines"
NO_LIBS: list[Path] = []


def topo(name: str):
    return load_topology(TOPOS / f"{name}.lscpu")


def plan(name: str, allowed: set[int] | None = None, **kw):
    t = topo(name)
    return make_plan(t, t.cpu_ids if allowed is None else allowed, PlanRequest(**kw))


def test_importing_affinity_and_launcher_does_not_import_torch():
    code = (
        "import sys, affinity, affinity.rank_env, affinity.plan, affinity.topology, launchers.cli; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    "text,cpus", [("0-3,8", {0, 1, 2, 3, 8}), ("5", {5}), ("0-1,4-5\n", {0, 1, 4, 5}), ("", set())]
)
def test_cpulist_round_trip(text, cpus):
    assert parse_cpulist(text) == cpus
    assert parse_cpulist(format_cpulist(cpus)) == cpus


@pytest.mark.parametrize("bad", ["a", "3-1", "1-x", "-2"])
def test_bad_cpulist_is_rejected(bad):
    with pytest.raises(CpuListError):
        parse_cpulist(bad)


def test_hex_mask_sets_one_bit_per_cpu():
    assert hex_mask([0, 1]) == "0x3"
    assert hex_mask([4, 5, 6, 7, 11]) == "0x8f0"


@pytest.mark.parametrize(
    "name,sockets,nodes,cores,cpus,tpc",
    [
        ("1s4c_noht", 1, 1, 4, 4, 1),
        ("1s4c_nonuma", 1, 1, 4, 4, 1),
        ("2s4c_noht", 2, 2, 8, 8, 1),
        ("2s4c_ht_physfirst", 2, 2, 8, 16, 2),
        ("2s4c_ht_pernode", 2, 2, 8, 16, 2),
        ("2s4c_ht_adjacent", 2, 2, 8, 16, 2),
        ("4s4c_ht_physfirst", 4, 4, 16, 32, 2),
        ("2s8c_snc2_ht", 2, 4, 16, 32, 2),
    ],
)
def test_fixture_topologies_parse(name, sockets, nodes, cores, cpus, tpc):
    s = topo(name).summary()
    assert (s["sockets"], s["numa_nodes"], s["physical_cores"], s["logical_cpus"], s["threads_per_core"]) == (
        sockets,
        nodes,
        cores,
        cpus,
        tpc,
    )


@pytest.mark.parametrize("name", ["2s4c_ht_physfirst", "2s4c_ht_pernode", "2s4c_ht_adjacent"])
def test_siblings_found_in_every_ht_numbering(name):
    # same machine, three numberings: every core has two threads on the same socket and node
    for core in topo(name).cores():
        assert len(core.threads) == 2
    first_core = {"2s4c_ht_physfirst": (0, 8), "2s4c_ht_pernode": (0, 4), "2s4c_ht_adjacent": (0, 1)}[name]
    assert topo(name).cores()[0].threads == first_core


@pytest.mark.parametrize("text", ["0,0,0,0\n0,1,0,0\n", "0,x,0,0\n", "0,0\n", "# only a comment\n"])
def test_malformed_topology_data_is_rejected(text):
    with pytest.raises(TopologyError):
        parse_lscpu(text)


def test_missing_topology_file_names_the_fix(tmp_path):
    with pytest.raises(TopologyError, match="lscpu -p=CPU,CORE,SOCKET,NODE"):
        load_topology(tmp_path / "nope.lscpu")


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu not installed")
def test_sysfs_discovery_agrees_with_lscpu_here():
    a, b = from_sysfs(), from_lscpu()
    assert a is not None and b is not None
    assert [(c.cpu, c.socket, c.node) for c in a.cpus] == [(c.cpu, c.socket, c.node) for c in b.cpus]
    assert [k.threads for k in a.cores()] == [k.threads for k in b.cores()]


def _fake_cgroup(tmp_path: Path, v2: bool, cpus: str) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    if v2:
        (root / "job").mkdir(parents=True)
        (root / "job" / "cpuset.cpus.effective").write_text(cpus + "\n")
        line = "0::/job\n"
    else:
        (root / "cpuset" / "job").mkdir(parents=True)
        (root / "cpuset" / "job" / "cpuset.effective_cpus").write_text(cpus + "\n")
        line = "3:cpuset:/job\n0::/\n"
    (tmp_path / "cgroup").write_text(line)
    return tmp_path / "cgroup", root


@pytest.mark.parametrize("v2", [True, False])
def test_cgroup_cpuset_is_read_for_v1_and_v2(tmp_path, v2):
    proc, root = _fake_cgroup(tmp_path, v2, "2-5,9")
    assert cgroup_cpuset(proc, root) == {2, 3, 4, 5, 9}


def test_allowed_cpus_intersects_the_cgroup_cpuset(tmp_path):
    mine = os.sched_getaffinity(0)
    last = max(mine)
    proc, root = _fake_cgroup(tmp_path, True, str(last))
    assert allowed_cpus(proc, root) == {last}
    assert allowed_cpus(tmp_path / "absent", root) == mine


REQUESTS = [
    {},
    {"ninstances": 1},
    {"ninstances": 3},
    {"ninstances": 2, "ccl_worker_count": 1},
    {"ccl_worker_count": 2, "logical_cores_for_ccl": True},
    {"mode": "latency"},
    {"mode": "throughput"},
    {"use_logical_cores": True, "ninstances": 4},
    {"ninstances": 1, "ncores_per_instance": 6},
]
FIXTURES = [
    "1s4c_noht",
    "1s4c_nonuma",
    "2s4c_noht",
    "2s4c_ht_physfirst",
    "2s4c_ht_pernode",
    "2s4c_ht_adjacent",
    "4s4c_ht_physfirst",
    "2s8c_snc2_ht",
]


@pytest.mark.parametrize("name,req", list(itertools.product(FIXTURES, REQUESTS)))
@pytest.mark.parametrize("restricted", [False, True])
def test_plan_invariants(name, req, restricted):
    """Inside the allowed set, no core shared, one NUMA node per rank when it fits, reasons given."""
    t = topo(name)
    allowed = {c for c in t.cpu_ids if c % 3 != 1} if restricted else t.cpu_ids  # a ragged cpuset
    try:
        p = make_plan(t, allowed, PlanRequest(**req))
    except PlacementError as exc:
        assert "lower --ninstances" in str(exc)
        return
    node_of = {c.cpu: c.node for c in t.cpus}
    compute = [c for r in p.ranks for c in r.cores]
    assert set(compute) <= allowed and len(compute) == len(set(compute))
    assert all(set(r.ccl_worker_cores) <= allowed for r in p.ranks)
    dedicated = [c for r in p.ranks for c in r.ccl_worker_cores if c not in r.cores]
    assert len(dedicated) == len(set(dedicated)) and not set(dedicated) & set(compute)
    assert len({len(r.cores) for r in p.ranks}) == 1, "ranks get equal core counts"
    for r in p.ranks:
        nodes = {node_of[c] for c in r.cpus}
        assert set(r.numa_nodes) == {node_of[c] for c in r.cores}
        assert (r.memory_nodes, r.memory_policy) == (r.numa_nodes, "membind")
        if len(nodes) > 1:
            assert any("span NUMA nodes" in n for n in p.notes)
    if req.get("ninstances"):
        assert len(p.ranks) == req["ninstances"]


def test_one_rank_per_socket_on_physical_cores_by_default():
    p = plan("2s4c_ht_physfirst")
    assert [(r.numa_nodes, r.cores) for r in p.ranks] == [((0,), (0, 1, 2, 3)), ((1,), (4, 5, 6, 7))]
    assert not p.notes


@pytest.mark.parametrize(
    "name,cores,ccl",
    [
        ("2s4c_ht_physfirst", [(0, 1, 2, 3), (4, 5, 6, 7)], [(11,), (15,)]),
        ("2s4c_ht_pernode", [(0, 1, 2, 3), (8, 9, 10, 11)], [(7,), (15,)]),
        ("2s4c_ht_adjacent", [(0, 2, 4, 6), (8, 10, 12, 14)], [(7,), (15,)]),
    ],
)
def test_ccl_workers_on_hyperthread_siblings_in_each_numbering(name, cores, ccl):
    p = plan(name, ccl_worker_count=1, logical_cores_for_ccl=True)
    assert [r.cores for r in p.ranks] == cores
    assert [r.ccl_worker_cores for r in p.ranks] == ccl


def test_ccl_workers_take_dedicated_cores_without_hyperthreads():
    p = plan("2s4c_noht", ccl_worker_count=1, logical_cores_for_ccl=True)
    assert [(r.cores, r.ccl_worker_cores) for r in p.ranks] == [((0, 1, 2), (3,)), ((4, 5, 6), (7,))]
    assert any("dedicated physical cores" in n for n in p.notes)


def test_ccl_worker_shares_a_core_when_none_is_spare_and_says_so():
    p = plan("1s4c_noht", ninstances=4, ccl_worker_count=1)
    assert all(r.ccl_worker_cores == r.cores for r in p.ranks)
    assert any("share the last compute core" in n for n in p.notes)


def test_sub_numa_clusters_get_one_rank_each_and_nodes_list_selects():
    assert [r.numa_nodes for r in plan("2s8c_snc2_ht").ranks] == [(0,), (1,), (2,), (3,)]
    p = plan("2s8c_snc2_ht", nodes_list=(2, 3))
    assert [(r.numa_nodes, r.cores) for r in p.ranks] == [((2,), (8, 9, 10, 11)), ((3,), (12, 13, 14, 15))]


def test_four_sockets_and_latency_mode():
    assert len(plan("4s4c_ht_physfirst").ranks) == 4
    p = plan("4s4c_ht_physfirst", mode="latency")
    assert len(p.ranks) == 4 and all(len(r.cores) == 4 for r in p.ranks)


def test_latency_mode_on_small_nodes_says_why_it_uses_fewer_cores():
    p = make_plan(topo("2s4c_noht"), {0, 1, 4, 5}, PlanRequest(mode="latency"))
    assert [r.cores for r in p.ranks] == [(0, 1), (4, 5)]
    assert any("latency mode: 2 core(s) per instance" in n for n in p.notes)


def test_instances_stay_inside_nodes_when_they_fit():
    p = plan("2s4c_noht", ninstances=4)
    assert [(r.numa_nodes, r.cores) for r in p.ranks] == [
        ((0,), (0, 1)),
        ((0,), (2, 3)),
        ((1,), (4, 5)),
        ((1,), (6, 7)),
    ]


def test_cgroup_restricted_cpuset_is_respected_and_idle_cores_explained():
    allowed = parse_cpulist("2-7,10-15")  # node 0 keeps cores 2,3 only
    p = plan("2s4c_ht_physfirst", allowed)
    assert [r.cores for r in p.ranks] == [(2, 3), (4, 5)]
    assert any("left idle (6-7)" in n for n in p.notes)


def test_rank_spanning_nodes_is_explained():
    p = plan("2s4c_noht", ninstances=1, ncores_per_instance=6)
    assert p.ranks[0].numa_nodes == (0, 1) and p.ranks[0].cores == (0, 1, 2, 3, 4, 5)
    assert [n for n in p.notes if "span NUMA nodes" in n]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"nodes_list": (5,)}, "NUMA node 5 in --nodes-list does not exist"),
        ({"ninstances": 9}, "lower --ninstances"),
        ({"ninstances": 2, "ncores_per_instance": 5}, "lower --ninstances or --ncores-per-instance"),
        ({"ninstances": 0}, ">= 1"),
    ],
)
def test_impossible_requests_name_the_fix(kw, match):
    with pytest.raises(PlacementError, match=match):
        plan("2s4c_noht", **kw)


def test_node_without_allowed_cpus_is_rejected():
    with pytest.raises(PlacementError, match="no CPU this process may use"):
        plan("2s4c_noht", allowed={0, 1, 2, 3}, nodes_list=(1,))


def test_rank_env_pins_openmp_and_lists_all_local_ccl_workers():
    p = plan("2s4c_ht_physfirst", ccl_worker_count=2, logical_cores_for_ccl=True)
    gnu = resolve("default", "default", dirs=NO_LIBS)
    env = [rank_env(r, p, gnu, ccl=True) for r in p.ranks]
    assert env[1]["OMP_NUM_THREADS"] == "4" and env[1]["GOMP_CPU_AFFINITY"] == "4-7"
    assert "KMP_AFFINITY" not in env[1] and "LD_PRELOAD" not in env[1]
    assert env[0]["CCL_WORKER_COUNT"] == "2"
    assert env[0]["CCL_WORKER_AFFINITY"] == env[1]["CCL_WORKER_AFFINITY"] == "10,11,14,15"
    assert "CCL_WORKER_COUNT" not in rank_env(p.ranks[0], p, gnu, ccl=False)


def _libs(tmp_path: Path, *names: str) -> list[Path]:
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return [tmp_path]


def test_allocator_found_under_versioned_name_only(tmp_path):
    dirs = _libs(tmp_path, "libjemalloc.so.2")
    assert find_library(("libjemalloc",), dirs) == tmp_path / "libjemalloc.so.2"
    choice = resolve("jemalloc", "default", dirs=dirs)
    p = plan("1s4c_noht")
    env = rank_env(p.ranks[0], p, choice, ccl=False)
    assert env["LD_PRELOAD"] == str(tmp_path / "libjemalloc.so.2") and "MALLOC_CONF" in env


def test_library_lookup_prefers_unversioned_then_newest(tmp_path):
    dirs = _libs(tmp_path, "libtcmalloc.so.4.5.9", "libtcmalloc.so.4.10.0", "libtcmalloc_minimal.so.4")
    assert find_library(("libtcmalloc",), dirs).name == "libtcmalloc.so.4.10.0"
    _libs(tmp_path, "libtcmalloc.so")
    assert find_library(("libtcmalloc",), dirs).name == "libtcmalloc.so"


def test_auto_picks_installed_allocator_and_intel_openmp(tmp_path):
    choice = resolve("auto", "auto", dirs=_libs(tmp_path, "libtcmalloc_minimal.so.4", "libiomp5.so"))
    assert (choice.allocator, choice.omp_runtime) == ("tcmalloc", "intel")
    p = plan("1s4c_noht", ninstances=2)
    env = rank_env(p.ranks[1], p, choice, ccl=False)
    assert env["KMP_AFFINITY"] == "granularity=fine,proclist=[2-3],explicit" and env["KMP_BLOCKTIME"] == "1"
    assert env["LD_PRELOAD"].split(":") == [str(tmp_path / "libiomp5.so"), str(tmp_path / "libtcmalloc_minimal.so.4")]
    assert "GOMP_CPU_AFFINITY" not in env


def test_missing_requested_libraries_raise_with_install_hint():
    with pytest.raises(EnvError, match="libjemalloc2"):
        resolve("jemalloc", "default", dirs=NO_LIBS)
    with pytest.raises(EnvError, match="intel-openmp"):
        resolve("default", "intel", dirs=NO_LIBS)
    assert resolve("auto", "auto", dirs=NO_LIBS).allocator == "default"


def test_user_ld_preload_is_kept_after_ours():
    assert merge_preload({"LD_PRELOAD": "/a.so"}, "/user.so")["LD_PRELOAD"] == "/a.so:/user.so"
    assert merge_preload({"OMP_NUM_THREADS": "2"}, "/user.so") == {"OMP_NUM_THREADS": "2"}


def test_logical_cores_keep_hyperthread_pairs_together():
    p = plan("2s4c_ht_adjacent", use_logical_cores=True, ninstances=4)
    assert [r.cores for r in p.ranks] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)]
    p = plan("2s4c_ht_physfirst", use_logical_cores=True, ninstances=2, ncores_per_instance=3)
    assert p.ranks[0].cores == (0, 8, 1) and any("share physical cores" in n for n in p.notes)


def machine_plan(name: str, request: str | None, **kw):
    m = load_machine(MACHINES / name)
    p = make_plan(m.topology, m.topology.cpu_ids, PlanRequest(**kw))
    if request is not None:
        place_memory(p, request, m)
    return p


@pytest.mark.parametrize(
    "name,ranks,memory",
    [
        ("xeon-phi-7250-flat-quadrant", 4, [(1,)] * 4),
        ("xeon-max-9480-flat-snc4", 8, [(k + 8,) for k in range(8)]),
        ("xeon-max-9480-flat-snc4", 2, [(8,), (9,)]),  # SNC4: the first two clusters of socket 0
    ],
)
def test_hbm_is_the_cpu_less_node_nearest_each_rank(name, ranks, memory):
    p = machine_plan(name, "hbm", ninstances=ranks)
    assert [r.memory_nodes for r in p.ranks] == memory
    assert {r.memory_policy for r in p.ranks} == {"preferred"}


def test_hbm_shared_by_several_ranks_is_noted():
    assert not machine_plan("xeon-max-9480-flat-snc4", "hbm").notes
    notes = machine_plan("xeon-phi-7250-flat-quadrant", "hbm", ninstances=2).notes
    assert notes == ["2 ranks share HBM/MCDRAM node 1 (16.0 GiB); what does not fit there spills to DDR"]


@pytest.mark.parametrize("name", ["xeon-8160-2s", "xeon-8480-spr-2s", "xeon-max-9480-flat-snc4"])
def test_ddr_keeps_memory_bound_to_the_ranks_own_nodes(name):
    p = machine_plan(name, "ddr")
    assert p.ranks == machine_plan(name, None).ranks
    assert all((r.memory_nodes, r.memory_policy) == (r.numa_nodes, "membind") for r in p.ranks)


def test_a_node_number_is_preferred_by_every_rank():
    p = machine_plan("xeon-8160-2s", "1")
    assert [(r.numa_nodes, r.memory_nodes, r.memory_policy) for r in p.ranks] == [
        ((0,), (1,), "preferred"),
        ((1,), (1,), "preferred"),
    ]


@pytest.mark.parametrize(
    "name,request_,match",
    [
        (
            "xeon-8160-2s",
            "hbm",
            r"no HBM/MCDRAM node on .*xeon-8160-2s: every NUMA node has CPUs \(is the memory in "
            r"cache mode\?\); drop --memory-node or use ddr",
        ),
        ("epyc-7763-zen3", "hbm", "every NUMA node has CPUs"),
        ("xeon-8160-2s", "99", r"no NUMA node 99 with memory on .* \(nodes: 0-1\); pick one of them, hbm or ddr"),
        ("xeon-max-9480-flat-snc4", "16", r"\(nodes: 0-15\)"),
    ],
)
def test_impossible_memory_requests_name_the_fix(name, request_, match):
    with pytest.raises(PlacementError, match=match):
        machine_plan(name, request_)


def test_hbm_without_any_visible_numa_node_says_so():
    m = dataclasses.replace(load_machine(MACHINES / "xeon-8160-2s"), memory_nodes=(), source="this machine")
    p = make_plan(m.topology, m.topology.cpu_ids, PlanRequest())
    with pytest.raises(PlacementError, match="no HBM/MCDRAM node on this machine: no NUMA memory nodes are visible"):
        place_memory(p, "hbm", m)


def test_hbm_for_a_cpu_node_missing_from_the_node_list_asks_for_a_new_description():
    m = load_machine(MACHINES / "xeon-max-9480-flat-snc4")
    m = dataclasses.replace(m, memory_nodes=tuple(n for n in m.memory_nodes if n.node != 0))
    p = make_plan(m.topology, m.topology.cpu_ids, PlanRequest())
    with pytest.raises(PlacementError, match=r"CPU node\(s\) 0 missing from the NUMA node list .*re-save"):
        place_memory(p, "hbm", m)


def test_memory_nodes_need_a_machine_description_not_an_lscpu_file():
    p = plan("2s4c_noht")
    place_memory(p, "ddr", None)
    for request in ("hbm", "0"):
        with pytest.raises(PlacementError, match="plan with --machine DIR"):
            place_memory(p, request, None)
