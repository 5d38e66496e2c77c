"""``ipex-lars bench train`` as users run it: real worker processes, a tiny model, few steps."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli

TINY = ["--models", "digits_cnn", "--batches", "16", "--precisions", "fp32", "--backends", "native",
        "--optimizers", "lars", "--steps", "2", "--warmup", "1"]


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


@pytest.mark.parametrize("args,message", [
    (["--models", "vgg"], "comma-separated list of resnet50, alexnet_bn, digits_cnn"),
    (["--steps", "0"], "--steps, --repeat, --ranks and --batches must be >= 1"),
    (["--backends", "tensorrt"], "native, ipex, compile"),
])
def test_bad_arguments_are_clear_errors(tmp_path, args, message):
    out = run_cli("bench", "train", *args, "--out", str(tmp_path))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_configuration_that_fails_is_reported_in_the_table(tmp_path):
    out = run_cli("bench", "train", "--models", "alexnet_bn", "--image-size", "8", "--batches", "2",
                  "--precisions", "fp32", "--layouts", "nchw", "--backends", "native", "--optimizers", "sgd",
                  "--steps", "1", "--warmup", "0", "--out", str(tmp_path), timeout=300)
    assert out.returncode == 1, "a failed baseline fails the benchmark"
    assert "failed: RuntimeError" in out.stdout and "Traceback" not in out.stderr
    assert "error" in json.loads((tmp_path / "results.json").read_text())["results"][0]
