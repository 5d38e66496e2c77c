"""``ipex-lars bench launch``: does pinning by ``lars-run`` and capping threads pay off?

Runs the same compute-bound torch workload (a float32 matmul loop) as N concurrent
instances in four set-ups, side by side in one run:

* pinned + capped   -- ``lars-run --ninstances N`` (own cores, OMP_NUM_THREADS = its cores)
* pinned, uncapped  -- ``lars-run``, but each instance asks torch for every CPU of the machine
* unpinned + capped -- plain processes with OMP_NUM_THREADS = cores / N
* unpinned, uncapped -- plain processes, torch's default thread count (every core each)

Instances start their timed loop together (a file barrier after warm-up), so they really
compete. The four set-ups are interleaved over ``--rounds`` rounds and each reports its
median round, so a burst of load from elsewhere hits them alike; the load average is
recorded so a busy machine shows. Reports per-instance and total matmuls/s and ratios
against unpinned-uncapped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launchers.argtypes import float_range, int_range

CHILD = r"""
import json, os, sys, time
import torch
size, seconds, threads, sync = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
if threads == "all":
    torch.set_num_threads(os.cpu_count())
a, b = torch.randn(size, size), torch.randn(size, size)
for _ in range(5):
    a @ b
open(os.path.join(sync, f"ready_{os.getpid()}"), "w").close()
deadline = time.time() + 120
while not os.path.exists(os.path.join(sync, "go")) and time.time() < deadline:
    time.sleep(0.002)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    a @ b
    n += 1
elapsed = time.perf_counter() - start
line = json.dumps({"matmuls_per_s": n / elapsed, "threads": torch.get_num_threads(),
                   "cpus": sorted(os.sched_getaffinity(0))})
sys.stdout.write("RESULT " + line + "\n")  # one write: instances may share a pipe
sys.stdout.flush()
"""

CLEAR = ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "MKL_NUM_THREADS")
SETUPS = (
    ("pinned+capped", True, True),
    ("pinned, uncapped", True, False),
    ("unpinned+capped", False, True),
    ("unpinned, uncapped", False, False),
)
BASELINE = "unpinned, uncapped"


def physical_cores() -> int:
    """Physical cores this process may use: lars-run gives each pinned instance cores of its own."""
    from affinity.cpuset import allowed_cpus
    from affinity.machine import this_machine

    return len(this_machine().topology.restricted(allowed_cpus()).cores())


def instances(text: str) -> int:
    """argparse type of ``--instances``: 1 up to the physical cores here."""
    return int_range(1, physical_cores())(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instances",
        type=instances,
        default=2,
        help="concurrent instances, 1 up to the physical cores here (default 2)",
    )
    parser.add_argument(
        "--size", type=int_range(1, 16384), default=256, help="square matmul size, 1-16384 (default 256)"
    )
    parser.add_argument(
        "--seconds",
        type=float_range(0, 3600, above=True),
        default=2.0,
        help="timed loop per set-up and round, above 0 and up to 3600 (default 2)",
    )
    parser.add_argument(
        "--rounds", type=int_range(1, 100), default=2, help="interleaved rounds, 1-100; the median is kept (default 2)"
    )
    parser.add_argument("--json-out", help="also write the JSON result to this file")


def _one_setup(pinned: bool, capped: bool, args: argparse.Namespace, script: Path) -> list[dict]:
    """Start the instances of one set-up, release them together, return their results."""
    ncpu = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in CLEAR}
    with tempfile.TemporaryDirectory(prefix="lars-bench-") as sync:
        child = [str(script), str(args.size), str(args.seconds), "env" if capped else "all", sync]
        if pinned:
            cmds = [
                [
                    sys.executable,
                    "-m",
                    "launchers",
                    "--ninstances",
                    str(args.instances),
                    "--memory-allocator",
                    "default",
                    sys.executable,
                    *child,
                ]
            ]
        else:
            if capped:
                env["OMP_NUM_THREADS"] = str(max(1, ncpu // args.instances))
            cmds = [[sys.executable, *child] for _ in range(args.instances)]
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
        deadline = time.time() + 120
        while len(list(Path(sync).glob("ready_*"))) < args.instances:
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    "bench instances did not start: "
                    + " | ".join((p.communicate()[1] or "").strip()[-300:] for p in procs)
                )
            time.sleep(0.01)
        (Path(sync) / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("bench instance failed: " + " | ".join(err.strip()[-300:] for _, err in outs))
    return [json.loads(line[7:]) for out, _ in outs for line in out.splitlines() if line.startswith("RESULT ")]


def run(args: argparse.Namespace) -> int:
    """Run the four set-ups one after another and print a table and JSON."""
    import torch  # only the children compute; imported here for the version in the report

    with tempfile.TemporaryDirectory(prefix="lars-bench-") as tmp:
        script = Path(tmp) / "matmul_child.py"
        script.write_text(CHILD)
        load_before = os.getloadavg()[0]
        rounds: dict[str, list[dict]] = {name: [] for name, _, _ in SETUPS}
        for _ in range(args.rounds):
            for name, pinned, capped in SETUPS:
                inst = _one_setup(pinned, capped, args, script)
                rounds[name].append(
                    {
                        "pinned": pinned,
                        "capped": capped,
                        "instances": inst,
                        "total_matmuls_per_s": sum(i["matmuls_per_s"] for i in inst),
                    }
                )
        load_after = os.getloadavg()[0]
    results = {}
    for name, runs in rounds.items():
        totals = sorted(r["total_matmuls_per_s"] for r in runs)
        middle = statistics.median_low(totals)  # a real round's figure, kept with its own instances
        chosen = next(r for r in runs if r["total_matmuls_per_s"] == middle)
        results[name] = dict(chosen, rounds_total_matmuls_per_s=totals)
    base = results[BASELINE]["total_matmuls_per_s"]
    for r in results.values():
        r["ratio_vs_unpinned_uncapped"] = r["total_matmuls_per_s"] / base if base else None
    print(
        f"lars-run launch benchmark: {args.instances} instances x {args.size}x{args.size} fp32 matmul, "
        f"{args.seconds:g} s x {args.rounds} round(s), {len(os.sched_getaffinity(0))} allowed CPUs, "
        f"torch {torch.__version__}, load average {load_before:.1f} -> {load_after:.1f}"
    )
    print(
        f"{'set-up':<20} {'threads':>7}  {'cpus per instance':<22} {'matmul/s per instance':<24} "
        f"{'total':>9} {'ratio':>6}"
    )
    for name, r in results.items():
        inst = r["instances"]
        print(
            f"{name:<20} {','.join(str(i['threads']) for i in inst):>7}  "
            f"{' | '.join(','.join(map(str, i['cpus'])) for i in inst):<22} "
            f"{' | '.join(format(i['matmuls_per_s'], '.0f') for i in inst):<24} "
            f"{r['total_matmuls_per_s']:>9.0f} {r['ratio_vs_unpinned_uncapped']:>6.2f}"
        )
    total = {name: r["total_matmuls_per_s"] for name, r in results.items()}
    ratios = {
        "pinning, both capped": total["pinned+capped"] / total["unpinned+capped"],
        "capping, both pinned": total["pinned+capped"] / total["pinned, uncapped"],
        "capping, both unpinned": total["unpinned+capped"] / total[BASELINE],
        "lars-run vs neither": total["pinned+capped"] / total[BASELINE],
    }
    for name, value in ratios.items():
        print(f"ratio {name:<24} {value:6.2f}")
    report = {
        "benchmark": "launch",
        "ratios": ratios,
        "rounds": args.rounds,
        "load_average": [load_before, load_after],
        "instances": args.instances,
        "size": args.size,
        "seconds": args.seconds,
        "torch": torch.__version__,
        "allowed_cpus": len(os.sched_getaffinity(0)),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="ipex-lars bench launch", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
