"""The ``ipex-lars`` command as users run it: a real subprocess of the installed script."""

from __future__ import annotations

import json
import os

import pytest
from cli_runner import run_cli as _run

from ipex_lars import cli


def test_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("train", "doctor", "build", "plan", "bench", "experiment"):
        assert command in out.stdout


def test_doctor_json_reports_stack_cpu_topology_and_extensions():
    out = _run("doctor", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    try:
        import intel_extension_for_pytorch  # noqa: F401

        expected_stack = "ipex"
    except ImportError:
        expected_stack = "native"
    assert report["stack"] == expected_stack
    assert report["versions"]["torch"]
    assert {"AVX2", "AVX512F", "AVX512_BF16", "AMX_BF16", "AVX_NE_CONVERT"} <= set(report["cpu"]["features"])
    assert report["cpu"]["kernel_isa"] == report["cpu"]["buildable_isas"][0]
    assert report["cpu"]["memory_nodes"], "no NUMA memory node reported"
    assert report["topology"]["logical_cpus"] >= len(os.sched_getaffinity(0))
    assert report["extensions"]["_ipex_lars_fused_lars"]["loads"] is True
    assert report["verdict"].startswith("OK")


def test_build_without_a_compiler_fails_with_the_fix(tmp_path):
    out = _run("build", env={"IPEX_LARS_BUILD_DIR": str(tmp_path), "CXX": "no-such-compiler-xyz"})
    assert out.returncode == 1
    assert "no C++ compiler 'no-such-compiler-xyz'" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.slow
def test_bench_optimizer_prints_ratios_as_json(tmp_path):
    path = tmp_path / "bench.json"
    out = _run("bench", "optimizer", "--sets", "many-small", "--repeats", "3", "--warmup", "1", "--json", str(path))
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())["results"][0]
    assert result["tensors"] == 2000 and result["elements"] == 2000 * 512
    assert set(result["median_ms"]) >= {"fused", "foreach", "reference"}
    assert all(v > 0 for v in result["x_floor"].values())
    assert "x floor" in out.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["bench", "optimizer", "--sets", "vgg"],
            "argument --sets: expected comma-separated parameter sets out of resnet50, many-small, got 'vgg'",
        ),
        (
            ["bench", "optimizer", "--repeats", "0"],
            "argument --repeats: expected a whole number from 1 to 10000, got '0'",
        ),
        (
            ["bench", "comm", "--ddp-steps", "0"],
            "argument --ddp-steps: expected a whole number from 1 to 10000, got '0'",
        ),
        (
            ["bench", "comm", "--sizes", "4Q"],
            "argument --sizes: expected comma-separated sizes from 1 byte to 1G, e.g. 1K,4M,256M, got '4Q'",
        ),
        (
            ["bench", "comm", "--sizes", "1K,"],
            "argument --sizes: expected comma-separated sizes from 1 byte to 1G, e.g. 1K,4M,256M, got '1K,'",
        ),
        (
            ["bench", "comm", "--worlds", "1"],
            "argument --worlds: expected comma-separated rank counts from 2 to 256, got '1'",
        ),
        (
            ["bench", "comm", "--backends", "nccl"],
            "argument --backends: expected comma-separated backends out of oneccl, gloo, got 'nccl'",
        ),
        (["train", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_flag(argv, message, capsys):
    command = " ".join(["ipex-lars", *argv[: 2 if argv[0] == "bench" else 1]])
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"{command}: error: {message} (see {command} --help)\n"


def test_output_cut_short_by_a_closed_pipe_is_not_a_traceback():
    import subprocess

    from cli_runner import SCRIPT

    nodes = ",".join(map(str, range(1, 3001)))  # a table far larger than a pipe's buffer
    proc = subprocess.run(
        f"'{SCRIPT}' plan --scenario paper-resnet50 --nodes {nodes} | head -1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
