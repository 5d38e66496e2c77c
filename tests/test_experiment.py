"""``ipex-lars experiment large-batch`` in miniature: its data split, and that it writes well-formed
tables, JSON and plots (not what they conclude)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import run_cli

from ipex_lars import cli

MINI = [
    "--batches",
    "128,512",
    "--stability-batch",
    "512",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
    "--seeds",
    "2",
    "--grid",
    "2",
    "--sweep-points",
    "3",
    "--width",
    "8",
    "--depth",
    "2",
    "--jobs",
    "2",
]


def test_mnist5k_is_real_shipped_data_in_disjoint_stratified_splits():
    from ipex_lars.data.sources import mnist5k

    train, val, test = mnist5k()
    assert (len(train), len(val), len(test)) == (3500, 500, 1000)
    for split, per_class in ((train, 350), (val, 50), (test, 100)):
        assert split.images.shape[1:] == (1, 14, 14)
        assert split.labels.bincount(minlength=10).tolist() == [per_class] * 10
    flat = {tuple(x.tolist()) for x in train.images.flatten(1)}
    assert not any(tuple(x.tolist()) in flat for x in test.images.flatten(1))
    assert torch.allclose(train.images.mean(), torch.tensor(0.0), atol=1e-4)


@pytest.mark.slow
def test_large_batch_experiment_writes_tables_json_and_plots(tmp_path):
    out = run_cli("experiment", "large-batch", *MINI, "--out", str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "large-batch" in out.stderr  # the progress bar
    report = json.loads((tmp_path / "large_batch.json").read_text())
    runs = report["runs"]
    assert len(runs["stability"]) == 2 * 3 * 2 and len(runs["scaling"]) == 2 * 2 * 2 * 2 * 2
    assert all(0 <= r["val_top1"] <= 100 and 0 <= r["test_top1"] <= 100 for rs in runs.values() for r in rs)
    assert {r["norm"] for r in runs["stability"]} == {False}
    rows = report["scaling"]
    assert [(r["norm"], r["batch"]) for r in rows] == [(False, 128), (False, 512), (True, 128), (True, 512)]
    for r in rows:
        assert r["verdict"] in ("no effect", "LARS better", "SGD better")
        assert r["sgd"]["lr"] in r["sgd"]["tried"] and len(r["lars"]["tried"]) == 2
    assert set(report["stability"]["usable"]) == {"sgd", "lars"}
    table = (tmp_path / "large_batch.md").read_text()
    assert "## Predictions (written before" in table and "| no | 512 | 6 | 213,527 |" in table
    assert "## Predictions against the results" in table and "- Question 2, with BN: " in table
    assert report["setup"]["cpu_seconds"] > 0 and all(r["cpu_seconds"] > 0 for rs in runs.values() for r in rs)
    assert table.count("| SGD | ") == 3 and table.count("| LARS | ") == 3
    for plot in ("large_batch_stability.png", "large_batch_scaling.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batches", "64,huge"], "argument --batches: expected comma-separated batch sizes from 2 to 1048576"),
        (["--batches", "64,1"], "argument --batches: expected comma-separated batch sizes from 2 to 1048576"),
        (["--seeds", "1"], "argument --seeds: expected a whole number from 2 to 1000, got '1'"),
        (["--grid", "8"], "argument --grid: expected a whole number from 2 to 7, got '8'"),
        (["--epochs", "0"], "argument --epochs: expected a whole number from 1 to 10000, got '0'"),
        (["--warmup-epochs", "-1"], "argument --warmup-epochs: expected a number from 0 to 10000, got '-1'"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_flag(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["experiment", "large-batch", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batches", "64,9999"], "batch sizes must be at most 3500 (the training split), got 9999"),
        (["--stability-batch", "4000"], "batch sizes must be at most 3500 (the training split), got 4000"),
        (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2 must be fewer than --epochs 2"),
    ],
)
def test_settings_the_data_cannot_serve_are_one_line_errors(tmp_path, capsys, args, message):
    assert cli.main(["experiment", "large-batch", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not any(tmp_path.iterdir())
