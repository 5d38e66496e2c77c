"""Smoke test of ``ipex-lars bench launch`` with a tiny workload (real torch children)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from ipex_lars.bench import launch


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")
def test_bench_launch_reports_all_setups_and_pins_with_lars_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    out = tmp_path / "launch.json"
    assert launch.run(parser.parse_args(["--size", "32", "--seconds", "0.2", "--rounds", "1", "--json-out", str(out)])) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {name for name, _, _ in launch.SETUPS}
    pinned = report["results"]["pinned+capped"]["instances"]
    assert len(pinned) == 2 and not set(pinned[0]["cpus"]) & set(pinned[1]["cpus"])
    assert all(i["threads"] == len(i["cpus"]) for i in pinned)
    assert all(r["total_matmuls_per_s"] > 0 for r in report["results"].values())
    assert "lars-run vs neither" in capsys.readouterr().out
