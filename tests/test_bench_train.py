"""``ipex-lars bench train`` as users run it: real worker processes, a tiny model, few steps."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli

from ipex_lars import cli
from ipex_lars.bench.train import outcome
from ipex_lars.bench.train_worker import RESULT_TAG

TINY = [
    "--models",
    "digits_cnn",
    "--batches",
    "16",
    "--precisions",
    "fp32",
    "--executions",
    "native",
    "--optimizers",
    "lars",
    "--steps",
    "2",
    "--warmup",
    "1",
]


def _bench(tmp_path, *args: str):
    out = run_cli("bench", "train", *TINY, *args, "--out", str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout, json.loads((tmp_path / "results.json").read_text())


def test_every_configuration_is_reported_against_the_plain_baseline(tmp_path):
    stdout, doc = _bench(tmp_path, "--layouts", "nchw,channels_last")
    rows = doc["results"]
    labels = [r["label"] for r in rows]
    assert labels == ["fp32 NCHW native SGD", "fp32 NCHW native LARS", "fp32 CL native LARS"]
    assert rows[0]["baseline"] and rows[0]["vs_baseline"] == 1.0
    for r in rows:
        assert r["images_per_second"] > 0 and r["peak_rss_mb"] > 0
        assert r["vs_baseline"] == pytest.approx(r["images_per_second"] / rows[0]["images_per_second"])
        assert r["phase_ms"]["forward"] > 0 and r["phase_ms"]["backward"] > 0 and r["phase_ms"]["allreduce"] == 0
        assert r["step_ms"] >= r["phase_ms"]["forward"] + r["phase_ms"]["backward"]
    assert rows[1]["optimizer_impl"] == "fused" and rows[0]["optimizer_impl"] == "torch.optim.SGD"
    assert "fp32 CL native LARS" in stdout and "x base" in stdout
    assert (tmp_path / "chart.png").stat().st_size > 1000


@pytest.mark.slow
def test_ranks_runs_through_lars_run_and_reports_scaling_efficiency(tmp_path):
    _, doc = _bench(tmp_path, "--layouts", "nchw", "--ranks", "2")
    two = [r for r in doc["results"] if r["ranks"] == 2]
    assert len(two) == 2 and all(r["global_batch"] == 32 and r["threads"] == 1 for r in two)
    for r in two:
        one = next(o for o in doc["results"] if o["ranks"] == 1 and o["label"] == r["label"])
        assert r["scaling_efficiency"] == pytest.approx(r["images_per_second"] / one["images_per_second"])
        assert r["phase_ms"]["allreduce"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--models", "vgg"],
            "argument --models: expected comma-separated models out of resnet50, alexnet_bn, digits_cnn, got 'vgg'",
        ),
        (
            ["--batches", "32,0"],
            "argument --batches: expected comma-separated per-rank batch sizes from 1 to 65536, got '32,0'",
        ),
        (["--steps", "0"], "argument --steps: expected a whole number from 1 to 10000, got '0'"),
        (["--warmup", "-1"], "argument --warmup: expected a whole number from 0 to 10000, got '-1'"),
        (["--timeout", "0"], "argument --timeout: expected a number above 0 and at most 86400, got '0'"),
        (
            ["--executions", "tensorrt"],
            "argument --executions: expected comma-separated executions out of native, ipex, compile, got 'tensorrt'",
        ),
        (
            ["--backends", "tensorrt"],  # the old name, still checked
            "argument --backends: expected comma-separated executions out of native, ipex, compile, got 'tensorrt'",
        ),
        (["--stacks", "conda"], "argument --stacks: expected comma-separated stacks out of ipex, native, got 'conda'"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_flag(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "train", *args, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"ipex-lars bench train: error: {message} (see ipex-lars bench train --help)\n"
    assert not list(tmp_path.iterdir()), "nothing ran"


def test_a_failing_configuration_is_reported_and_the_others_still_run(tmp_path):
    # alexnet_bn's pooling cannot shrink 8-pixel images: its worker fails for real, digits_cnn's succeeds
    out = run_cli(
        "bench",
        "train",
        "--models",
        "alexnet_bn,digits_cnn",
        "--image-size",
        "8",
        "--batches",
        "2",
        "--precisions",
        "fp32",
        "--layouts",
        "nchw",
        "--backends",
        "native",
        "--optimizers",
        "sgd",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(tmp_path),
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    block = out.stderr[out.stderr.index("[bench train] FAILED: ") :]
    assert block.startswith(
        "[bench train] FAILED: current alexnet_bn b2 fp32 NCHW native SGD x1 (round 1 of 1)\n"
        "  exited with code 1: RuntimeError: "
    )
    assert "\n  | RuntimeError: " in block, "the child's own last stderr lines are shown"
    assert "[bench train] 1 of 2 configurations failed (details above): current alexnet_bn" in out.stderr
    assert not any(line.startswith("Traceback") for line in out.stderr.splitlines()), "bench train itself ran on"
    failed, ok = json.loads((tmp_path / "results.json").read_text())["results"]
    assert failed["model"] == "alexnet_bn" and failed["error"].startswith("exited with code 1: RuntimeError: ")
    assert failed["failures"][0]["round"] == 1 and failed["failures"][0]["stderr_tail"][-1].startswith("RuntimeError")
    assert ok["model"] == "digits_cnn" and ok["images_per_second"] > 0 and ok["failures"] == []
    assert "FAILED: exited with code 1: RuntimeError" in out.stdout and "wrote " in out.stdout
    assert "[bench train] --backends is now called --executions" in out.stderr  # the old flag still runs


def test_a_configuration_that_times_out_is_stopped_and_reported(tmp_path):
    out = run_cli(
        "bench", "train", *TINY, "--layouts", "nchw", "--timeout", "0.05", "--out", str(tmp_path), timeout=120
    )
    assert out.returncode == 1
    assert (
        "FAILED: current digits_cnn b16 fp32 NCHW native SGD x1 (round 1 of 1)\n  timed out after 0.05 s" in out.stderr
    )
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["error"] for r in rows] == ["timed out after 0.05 s (raise --timeout)"] * 2


@pytest.mark.parametrize(
    "returncode,stdout,stderr,error",
    [
        (-9, "", "", "was killed by SIGKILL: its stderr is empty"),
        (139, "", "rank 1 crashed\n", "exited with code 139 (128 + SIGSEGV): rank 1 crashed"),
        (
            1,
            RESULT_TAG + '{"error": "ValueError: bad"}',
            "Traceback\nValueError: bad",
            "exited with code 1: ValueError: bad",
        ),
        (0, RESULT_TAG + "{cut", "", "exited with code 0, unparseable result line: "),
        (0, "", "a warning\n", "exited with code 0 without a result line: a warning"),
    ],
)
def test_a_failed_child_is_described_by_how_it_ended(returncode, stdout, stderr, error):
    failure = outcome(returncode, stdout, stderr)
    assert failure["error"].startswith(error) and failure["stderr_tail"] == stderr.splitlines()
