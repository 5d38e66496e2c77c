"""``ipex-lars experiment large-batch`` writes its table, data and plot."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli


@pytest.mark.slow
def test_large_batch_experiment_writes_table_json_and_plot(tmp_path):
    out = run_cli("experiment", "large-batch", "--batches", "64,512", "--epochs", "2", "--seeds", "1",
                  "--out", str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "large_batch.json").read_text())
    assert [r["batch"] for r in rows] == [64, 512]
    assert all(0 <= r["sgd"] <= 100 and 0 <= r["lars"] <= 100 for r in rows)
    table = (tmp_path / "large_batch.md").read_text()
    assert "| 512 | 2 |" in table
    assert (tmp_path / "large_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_batch_list_is_a_clear_error(tmp_path):
    out = run_cli("experiment", "large-batch", "--batches", "64,huge", "--out", str(tmp_path))
    assert out.returncode == 2 and "--batches must be integers" in out.stdout
