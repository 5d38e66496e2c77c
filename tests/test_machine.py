"""The one place that knows the CPU, tested on machines described as data (tests/data/machines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from affinity.machine import MachineError, load_machine, parse_cpuinfo, read_memory_nodes, this_machine
from ipex_lars import cli, ext
from ipex_lars.train.config import TrainConfig
from ipex_lars.train.precision import choose

MACHINES = Path(__file__).parent / "data" / "machines"

# name: (kernel ISA, native bf16, IPEX bf16 possible, memory-only nodes, sockets, physical cores)
EXPECTED = {
    "xeon-phi-7250-flat-quadrant": ("avx2", False, False, [1], 1, 68),
    "xeon-8160-2s": ("avx512", False, True, [], 2, 48),
    "xeon-8480-spr-2s": ("avx512", True, True, [], 2, 112),
    "xeon-max-9480-flat-snc4": ("avx512", True, True, list(range(8, 16)), 2, 112),
    "epyc-7763-zen3": ("avx2", False, False, [], 1, 64),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_machines_are_read_right(name):
    isa, bf16, ipex_bf16, memory_only, sockets, cores = EXPECTED[name]
    m = load_machine(MACHINES / name)
    assert m.cpu.vector_isa == isa
    assert m.cpu.native_bf16 is bf16
    assert (not m.cpu.ipex_bf16_missing()) is ipex_bf16
    assert [n.node for n in m.memory_only_nodes()] == memory_only
    assert len(m.topology.sockets) == sockets
    assert len(m.topology.cores()) == cores


def test_xeon_phi_is_avx512_f_without_bw_so_kernels_take_avx2():
    cpu = load_machine(MACHINES / "xeon-phi-7250-flat-quadrant").cpu
    assert cpu.has("avx512f", "avx512er", "avx512pf") and not cpu.has("avx512bw")
    assert cpu.isas() == ["avx2", "default"]
    assert len(load_machine(MACHINES / "xeon-phi-7250-flat-quadrant").topology.cpus) == 272  # 68 x 4 threads


def test_hbm_nodes_are_the_nearest_to_their_quadrant():
    m = load_machine(MACHINES / "xeon-max-9480-flat-snc4")
    assert [m.nearest_memory_only(n) for n in range(8)] == list(range(8, 16))
    assert all(n.mem_kb == 16 * 2**20 for n in m.memory_only_nodes())
    phi = load_machine(MACHINES / "xeon-phi-7250-flat-quadrant")
    assert phi.nearest_memory_only(0) == 1
    assert load_machine(MACHINES / "xeon-8160-2s").nearest_memory_only(0) is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_doctor_on_a_described_machine_prints_isa_bf16_and_memory_nodes(name, capsys):
    isa, bf16, ipex_bf16, memory_only, _, _ = EXPECTED[name]
    assert cli.main(["doctor", "--machine", str(MACHINES / name)]) == 0
    lines = capsys.readouterr().out.splitlines()
    kernels = next(line for line in lines if line.startswith("kernels"))
    assert f"built for {isa} " in kernels
    bf16_line = next(line for line in lines if line.startswith("bf16"))
    assert bf16_line.split(None, 1)[1].startswith("native bf16 (") is bf16
    assert bf16_line.endswith("precision auto -> " + ("bf16" if bf16 else "fp32"))
    assert any(line.startswith("ipex bf16   not possible") for line in lines) is (not ipex_bf16)
    memory = [line for line in lines if line.startswith("memory")]
    assert len(memory) == len(load_machine(MACHINES / name).memory_nodes)
    assert sum("no CPUs: HBM/MCDRAM" in line for line in memory) == len(memory_only)
    assert cli.main(["doctor", "--machine", str(MACHINES / name), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["kernel_isa"] == isa and report["cpu"]["native_bf16"] is bf16


def test_doctor_on_a_missing_description_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["doctor", "--machine", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m affinity.machine --save" in err


def test_a_saved_description_of_this_machine_reads_back_the_same(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "affinity.machine", "--save", str(tmp_path / "here")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
    saved, here = load_machine(tmp_path / "here"), this_machine()
    assert saved.cpu == here.cpu
    assert saved.memory_nodes == here.memory_nodes
    assert saved.topology.cpus == here.topology.cpus


def test_broken_node_trees_name_the_file(tmp_path):
    node = tmp_path / "node0"
    node.mkdir()
    (node / "cpulist").write_text("0-3\n")
    (node / "meminfo").write_text("Node 0 MemFree: 1 kB\n")
    (node / "distance").write_text("10\n")
    with pytest.raises(MachineError, match="MemTotal"):
        read_memory_nodes(tmp_path)
    assert read_memory_nodes(tmp_path / "absent") == []


def test_cpuinfo_takes_the_first_processor():
    cpu = parse_cpuinfo(
        "processor : 0\nmodel name : A\nflags : avx2 fma\n\nprocessor : 1\nmodel name : B\nflags : sse\n"
    )
    assert cpu.model == "A" and cpu.vector_isa == "avx2"
    assert parse_cpuinfo("").vector_isa == "default"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_precision_auto_picks_bf16_only_where_it_is_native(name):
    machine = load_machine(MACHINES / name)
    cfg, why = choose(TrainConfig(precision="auto"), machine)
    assert cfg.precision == ("bf16" if EXPECTED[name][1] else "fp32")
    assert why.startswith(f"precision auto -> {cfg.precision}: ")
    assert choose(TrainConfig(precision="fp32"), machine)[0].precision == "fp32"


@pytest.mark.parametrize("name", ["xeon-phi-7250-flat-quadrant", "epyc-7763-zen3"])
def test_ipex_bf16_on_a_cpu_ipex_cannot_serve_is_refused_with_the_alternatives(name):
    machine = load_machine(MACHINES / name)
    with pytest.raises(ValueError) as err:
        choose(TrainConfig(execution="ipex", precision="bf16"), machine)
    message = str(err.value)
    assert "AVX512BW" in message and "--execution native" in message and "--precision fp32" in message
    assert "\n" not in message
    assert choose(TrainConfig(execution="native", precision="bf16"), machine)[0].precision == "bf16"


def test_isa_override_picks_a_lower_isa_and_refuses_one_the_cpu_lacks(monkeypatch):
    isas = this_machine().cpu.isas()
    monkeypatch.setenv("IPEX_LARS_ISA", isas[-1])
    assert ext.kernel_isa() == "default"
    monkeypatch.setenv("IPEX_LARS_ISA", "sse9")
    with pytest.raises(ext.ExtensionBuildError, match="not one of avx512, avx2, default"):
        ext.kernel_isa()
    if "avx512" not in isas:
        monkeypatch.setenv("IPEX_LARS_ISA", "avx512")
        with pytest.raises(ext.ExtensionBuildError, match="cannot execute"):
            ext.kernel_isa()


def test_every_isa_this_cpu_runs_builds_and_loads_as_its_own_module():
    from ipex_lars.optim.fused import SPEC

    names = {isa: ext.load(SPEC, isa).__name__ for isa in this_machine().cpu.isas()}
    assert names == {isa: f"{SPEC.name}_{isa}" for isa in names}
