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
    assert (
        launch.run(parser.parse_args(["--size", "32", "--seconds", "0.2", "--rounds", "1", "--json-out", str(out)]))
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report["results"]) == {name for name, _, _ in launch.SETUPS}
    pinned = report["results"]["pinned+capped"]["instances"]
    assert len(pinned) == 2 and not set(pinned[0]["cpus"]) & set(pinned[1]["cpus"])
    assert all(i["threads"] == len(i["cpus"]) for i in pinned)
    assert all(r["total_matmuls_per_s"] > 0 for r in report["results"].values())
    assert "lars-run vs neither" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["launch", "--instances", "0"], "argument --instances: expected a whole number from 1 to "),
        (["launch", "--instances", "9999"], "argument --instances: expected a whole number from 1 to "),
        (["launch", "--size", "0"], "argument --size: expected a whole number from 1 to 16384, got '0'"),
        (["launch", "--seconds", "0"], "argument --seconds: expected a number above 0 and at most 3600, got '0'"),
        (["launch", "--rounds", "-1"], "argument --rounds: expected a whole number from 1 to 100, got '-1'"),
        (
            ["comm", "--backends", "foo"],
            "argument --backends: expected comma-separated backends out of oneccl, gloo, got 'foo'",
        ),
        (["comm", "--backends", "gloo,"], "argument --backends: expected comma-separated backends"),
        (["comm", "--worlds", "2,x"], "argument --worlds: expected comma-separated rank counts from 2 to 256"),
        (["comm", "--sizes", "2G"], "argument --sizes: expected comma-separated sizes from 1 byte to 1G"),
        (["comm", "--sizes", "0"], "argument --sizes: expected comma-separated sizes from 1 byte to 1G"),
        (["comm", "--seconds", "-0.5"], "argument --seconds: expected a number above 0 and at most 3600"),
    ],
)
def test_bench_bad_numbers_exit_2_naming_the_flag_and_range_before_starting_anything(args, message, capsys):
    """Checked by argparse types in-process: nothing is started, no traceback (test_cli.py has
    the cases of --worlds 1, --sizes 4Q and 1K, and --ddp-steps 0)."""
    from ipex_lars import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"ipex-lars bench {args[0]}: error: {message}")
    assert "Traceback" not in err
