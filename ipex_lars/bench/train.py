"""``ipex-lars bench train``: training images/second per configuration, as ratios to plain PyTorch.

Configurations are model x batch x precision (fp32, bf16 autocast) x layout (NCHW,
channels-last) x execution (native eager, ipex.optimize, torch.compile) x optimizer
(our LARS, torch.optim.SGD). Next to them, in the same run, the benchmark times the
baseline a user would write without this project: fp32, NCHW, eager, SGD. Every
configuration runs in a fresh process (see ``train_worker``), in round-robin order
over ``--repeat`` rounds, so drifting machine load spreads over all of them. Each
figure is the median step of ``--steps`` timed steps after ``--warmup`` untimed ones.

``--stacks ipex,native`` runs each configuration on both project stacks, alternating,
and compares their best configurations. ``--ranks N`` also runs each configuration as
N ranks through ``lars-run`` and reports the scaling efficiency against one rank.

A configuration run that fails (exit code, signal, timeout, no result) is reported on
stderr at once: which configuration, how its process ended and its last stderr lines.
The others still run; failures are marked in the table and results.json, and the
benchmark exits 1 at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from ipex_lars.bench.train_worker import MODEL_INPUTS, RESULT_TAG
from launchers.argtypes import UsageError, csv_of, float_range, int_range, one_of, renamed
from launchers.supervise import how_it_ended

BASELINE = {"precision": "fp32", "layout": "nchw", "execution": "native", "optimizer": "sgd"}
AXES = {
    "precision": ("fp32", "bf16"),
    "layout": ("nchw", "channels_last"),
    "execution": ("native", "ipex", "compile"),  # TrainConfig.execution
    "optimizer": ("lars", "sgd"),
}
ROOT = Path(__file__).resolve().parents[2]
TAIL_LINES = 10  # of a failed child's stderr, shown with its failure


def _names(choices: Collection[str], what: str) -> Callable[[str], list]:
    """Type of a comma-separated subset of ``choices``."""
    return csv_of(one_of(choices), f"{what} out of {', '.join(choices)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        type=_names(MODEL_INPUTS, "models"),
        default=["resnet50"],
        help="comma-separated: resnet50, alexnet_bn, digits_cnn (default: resnet50)",
    )
    parser.add_argument(
        "--batches",
        type=csv_of(int_range(1, 65536), "per-rank batch sizes from 1 to 65536"),
        default=[32],
        help="per-rank batch sizes, each 1-65536 (default: 32)",
    )
    for axis, choices in AXES.items():
        parser.add_argument(
            f"--{axis}s",
            type=_names(choices, f"{axis}s"),
            default=list(choices),
            help=f"comma-separated subset of {', '.join(choices)} (default: all"
            f"{'; ipex only where installed' if axis == 'execution' else ''})",
        )
    parser.add_argument(
        "--image-size",
        type=int_range(0, 4096),
        default=0,
        help="input side, 1-4096; 0: the model's own (224 for resnet50/alexnet_bn, 8 for digits_cnn) (default 0)",
    )
    parser.add_argument(  # the old name of --executions, kept working with a warning
        "--backends",
        dest="executions",
        action=renamed("--executions", "[bench train]"),
        type=_names(AXES["execution"], "executions"),
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--steps", type=int_range(1, 10000), default=5, help="timed steps per configuration, 1-10000 (default 5)"
    )
    parser.add_argument(
        "--warmup",
        type=int_range(0, 10000),
        default=2,
        help="untimed steps first, for allocation, prepacking and compilation, 0-10000 (default 2)",
    )
    parser.add_argument(
        "--repeat",
        type=int_range(1, 100),
        default=1,
        help="rounds over all configurations, 1-100; each figure is the median round's (the lower "
        "middle one for an even count) (default 1)",
    )
    parser.add_argument(
        "--stacks",
        type=_names(("ipex", "native"), "stacks"),
        help="run on these project stacks (.venv-STACK), alternating; default: this Python",
    )
    parser.add_argument(
        "--ranks",
        type=int_range(1, 256),
        default=1,
        help="also run every configuration as this many ranks via lars-run, 1-256 (default 1: no)",
    )
    parser.add_argument(
        "--timeout",
        type=float_range(0, 86400, above=True),
        default=1800,
        help="seconds allowed per configuration run, above 0 and up to 86400 (default 1800)",
    )
    parser.add_argument(
        "--out", default="runs/bench-train", help="folder for results.json and chart.png (default runs/bench-train)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one configuration


def configurations(args: argparse.Namespace) -> list[dict]:
    """The baseline and every requested configuration, per model and batch, baseline first."""
    specs = []
    for model, batch in itertools.product(args.models, args.batches):
        common = {
            "model": model,
            "batch": batch,
            "image_size": args.image_size,
            "steps": args.steps,
            "warmup": args.warmup,
        }
        specs.append({**common, **BASELINE, "baseline": True})
        for values in itertools.product(*(getattr(args, f"{axis}s") for axis in AXES)):
            combo = dict(zip(AXES, values))
            if combo != BASELINE:
                specs.append({**common, **combo, "baseline": False})
    return specs


def _python(stack: str | None) -> str:
    if stack is None:
        return sys.executable
    path = ROOT / f".venv-{stack}" / "bin" / "python"
    if not path.exists():
        raise ValueError(f"stack {stack} is not set up ({path} is missing); run env/setup.sh {stack}")
    return str(path)


def _has_ipex(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('intel_extension_for_pytorch') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _failure(error: str, stderr: str) -> dict:
    return {"error": error, "stderr_tail": stderr.strip().splitlines()[-TAIL_LINES:]}


def outcome(returncode: int, stdout: str, stderr: str) -> dict:
    """A finished child's result line, or ``{"error": why, "stderr_tail": last stderr lines}``."""
    tagged = [line[len(RESULT_TAG) :] for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    try:
        results = [json.loads(line) for line in tagged]
    except json.JSONDecodeError as exc:
        return _failure(f"{how_it_ended(returncode)}, unparseable result line: {exc}", stderr)
    errors = [r["error"] for r in results if "error" in r]
    last = (stderr.strip().splitlines() or ["its stderr is empty"])[-1]
    if errors or returncode != 0:
        return _failure(f"{how_it_ended(returncode)}: {errors[0] if errors else last}", stderr)
    if not results:
        return _failure(f"{how_it_ended(0)} without a result line: {last}", stderr)
    return results[0]


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(python: str, spec: dict, ranks: int, timeout: float) -> dict:
    worker = ["-m", "ipex_lars", "bench", "train", "--worker", json.dumps(spec)]
    if ranks > 1:
        cmd = [python, "-m", "launchers", "--nprocs-per-node", str(ranks), "-m", *worker[1:]]
    else:
        cmd = [python, *worker]
    # a session of its own, so a timeout or Ctrl-C also kills lars-run's mpiexec (whose proxies then stop the ranks)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        return _failure(f"timed out after {timeout:g} s (raise --timeout)", proc.communicate()[1])
    except BaseException:
        _kill_session(proc)
        raise
    return outcome(proc.returncode, stdout, stderr)


def _label(spec: dict) -> str:
    return (
        f"{spec['precision']} {'CL' if spec['layout'] == 'channels_last' else 'NCHW'} "
        f"{spec['execution']} {spec['optimizer'].upper()}"
    )


def run(args: argparse.Namespace) -> int:
    if args.worker:
        from ipex_lars.bench.train_worker import main

        return main(args.worker)
    from ipex_lars.bench.train_report import report

    try:
        stacks = args.stacks or [None]
        pythons = {stack: _python(stack) for stack in stacks}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ipex_on = {stack: _has_ipex(python) for stack, python in pythons.items()}
    rank_counts = [1] + ([args.ranks] if args.ranks > 1 else [])
    runs = [
        (stack, spec, ranks)
        for spec in configurations(args)
        for ranks in rank_counts
        for stack in stacks
        if spec["execution"] != "ipex" or ipex_on[stack]
    ]
    skipped = [s or "this python" for s, ok in ipex_on.items() if not ok and "ipex" in args.executions]
    if skipped:
        print(f"[bench train] execution ipex skipped on {', '.join(skipped)}: IPEX is not installed there")

    from tqdm import tqdm

    measured: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    with tqdm(total=len(runs) * args.repeat, unit="run", dynamic_ncols=True) as bar:
        for round_ in range(1, args.repeat + 1):
            for i, (stack, spec, ranks) in enumerate(runs):
                bar.set_postfix_str(_name(stack, spec, ranks))
                measured[i].append(_run(pythons[stack], spec, ranks, args.timeout))
                if "error" in measured[i][-1]:
                    bar.write(
                        _failure_block(_name(stack, spec, ranks), round_, args.repeat, measured[i][-1]), file=sys.stderr
                    )
                bar.update(1)
    rows = [_row(stack, spec, ranks, measured[i]) for i, (stack, spec, ranks) in enumerate(runs)]
    report(rows, args)
    failed = [_name(stack, spec, ranks) for (stack, spec, ranks), row in zip(runs, rows) if row["failures"]]
    if failed:
        print(
            f"[bench train] {len(failed)} of {len(rows)} configurations failed (details above): {'; '.join(failed)}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _name(stack: str | None, spec: dict, ranks: int) -> str:
    return f"{stack or 'current'} {spec['model']} b{spec['batch']} {_label(spec)} x{ranks}"


def _failure_block(name: str, round_: int, rounds: int, failure: dict) -> str:
    """What stderr shows the moment a configuration run fails: which one, how it ended, its stderr's end."""
    tail = failure["stderr_tail"]
    lines = [
        f"[bench train] FAILED: {name} (round {round_} of {rounds})",
        f"  {failure['error']}",
        f"  last {len(tail)} lines of its stderr:" if tail else "  its stderr is empty",
    ]
    return "\n".join(lines + [f"  | {line}" for line in tail])


def _row(stack: str | None, spec: dict, ranks: int, measured: list[dict]) -> dict:
    """One configuration's results row: the median round's figures, and its failed runs if any."""
    ok = [m for m in measured if "error" not in m]
    row = {
        **{k: v for k, v in spec.items() if k not in ("steps", "warmup")},
        "stack": stack or "current",
        "ranks": ranks,
        "label": _label(spec),
        "runs": len(measured),
        "failures": [{"round": n, **m} for n, m in enumerate(measured, 1) if "error" in m],
    }
    if ok:
        middle = statistics.median_low([m["images_per_second"] for m in ok])  # a real run's figure
        chosen = next(m for m in ok if m["images_per_second"] == middle)  # with its own breakdown
        row.update(
            {
                k: chosen[k]
                for k in (
                    "images_per_second",
                    "step_ms",
                    "phase_ms",
                    "peak_rss_mb",
                    "global_batch",
                    "optimizer_impl",
                    "threads",
                    "torch",
                )
            }
        )
    else:
        row["error"] = row["failures"][-1]["error"]
    return row
