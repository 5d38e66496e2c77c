"""``ipex-lars bench comm``: allreduce latency and bus bandwidth, and a DDP step, oneccl vs gloo.

One run starts, for each world size and backend, a job of local rank processes
(torchrun-style variables, one thread each). Every job sweeps allreduce over message
sizes, then times a DDP step on a model with ResNet-50's gradient volume (its parameter
count, counted from the model, in as many fp32 tensors) whose forward and backward cost
almost nothing, so the step time is the gradient allreduce DDP cannot hide. Rank 0 reports medians; the parent
prints a table with gloo/oneccl ratios and the same figures as JSON.

Bus bandwidth follows the NCCL convention: bytes x 2(n-1)/n / time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from ipex_lars.bench.local_job import finish, start_ranks
from launchers.argtypes import byte_size, csv_of, float_range, int_range, one_of, parse_size

BACKENDS = ("oneccl", "gloo")
SIZES = ["1K", "4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M", "100M", "256M"]
TARGETS = {"allreduce 100M, 2 ranks": 2.5, "allreduce 1K, 2 ranks": 5.0, "DDP step, 2 ranks": 2.0}
MAX_SIZE = 1 << 30  # each rank holds one tensor of the size
JOB_TIMEOUT_S = 900  # one job of ranks, all sizes and the DDP steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        type=csv_of(one_of(BACKENDS), f"backends out of {', '.join(BACKENDS)}"),
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {', '.join(BACKENDS)} (default: {','.join(BACKENDS)})",
    )
    parser.add_argument(
        "--worlds",
        type=csv_of(int_range(2, 256), "rank counts from 2 to 256"),
        default="2,4",
        help="rank counts to run, each 2-256 (default: 2,4)",
    )
    parser.add_argument(
        "--sizes",
        type=csv_of(byte_size(MAX_SIZE), "sizes from 1 byte to 1G, e.g. 1K,4M,256M"),
        default=",".join(SIZES),
        help="allreduce message sizes from 1 byte to 1G, e.g. 1K,4M,256M",
    )
    parser.add_argument(
        "--seconds",
        type=float_range(0, 3600, above=True),
        default=0.3,
        help="time budget per size, above 0 and up to 3600 (default 0.3)",
    )
    parser.add_argument("--ddp-steps", type=int_range(1, 10000), default=8, help="timed DDP steps, 1-10000 (default 8)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run as one rank of a job


# ---------------------------------------------------------------- one rank


def _time_allreduce(torch, dist, tensor, budget: float) -> float:
    start = time.perf_counter()
    for _ in range(2):
        dist.all_reduce(tensor)
    # Rank 0 picks the iteration count from the warm-up, so every rank runs the same number.
    iters = torch.tensor([min(500, max(3, int(budget / ((time.perf_counter() - start) / 2))))])
    dist.broadcast(iters, src=0)
    times: list[float] = []
    for _ in range(int(iters)):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_ddp_step(torch, dist, steps: int, values: int, tensors: int) -> float:
    from torch import nn

    class GradientVolume(nn.Module):
        """``values`` parameters in ``tensors`` equal tensors, with a forward that costs ~nothing."""

        def __init__(self) -> None:
            super().__init__()
            sizes = [values // tensors] * tensors
            sizes[-1] += values - sum(sizes)
            self.params = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes)

        def forward(self, x):
            return sum(p.sum() for p in self.params) * x

    model = nn.parallel.DistributedDataParallel(GradientVolume())
    x = torch.ones(())
    times = []
    for i in range(steps + 2):
        dist.barrier()
        start = time.perf_counter()
        model(x).backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    import ipex_lars.distributed as ild
    from ipex_lars.models import parameter_sizes

    ild.init(backend=args.worker, timeout=120, verbose=False)
    torch.set_num_threads(1)
    result: dict[str, object] = {"allreduce_s": {}}
    for label in args.sizes:
        tensor = torch.ones(max(1, parse_size(label) // 4))
        result["allreduce_s"][label] = _time_allreduce(torch, dist, tensor, args.seconds)
        del tensor
    resnet50 = parameter_sizes("resnet50")
    result["ddp_values"], result["ddp_tensors"] = sum(resnet50), len(resnet50)
    result["ddp_step_s"] = _time_ddp_step(torch, dist, args.ddp_steps, sum(resnet50), len(resnet50))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------- the run


def _job(backend: str, world: int, args: argparse.Namespace) -> dict:
    argv = [
        sys.executable,
        "-m",
        "ipex_lars.bench.comm",
        "--worker",
        backend,
        "--sizes",
        ",".join(args.sizes),
        "--seconds",
        str(args.seconds),
        "--ddp-steps",
        str(args.ddp_steps),
    ]
    ranks = finish(start_ranks(argv, world, env={**os.environ, "OMP_NUM_THREADS": "1"}), timeout=JOB_TIMEOUT_S)
    if any(r.rc is None for r in ranks):
        raise RuntimeError(f"{backend} with {world} ranks did not finish within {JOB_TIMEOUT_S} s")
    if any(r.rc for r in ranks):
        details = "\n".join(f"rank {i}: rc={r.rc}\n{r.err[-2000:]}" for i, r in enumerate(ranks))
        raise RuntimeError(f"{backend} with {world} ranks failed:\n{details}")
    line = next(x for x in ranks[0].out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _report(results: dict, backends: list[str], worlds: list[int], sizes: list[str]) -> dict:
    ratios: dict[str, float] = {}
    base, fast = "gloo", "oneccl"
    header = f"{'ranks':>5} {'size':>6} " + " ".join(f"{b + ' us':>12} {b + ' GB/s':>11}" for b in backends)
    compare = base in backends and fast in backends
    print(header + (f" {'gloo/oneccl':>11}" if compare else ""))
    for world in worlds:
        for size in sizes:
            row = f"{world:>5} {size:>6} "
            for b in backends:
                t = results[b][str(world)]["allreduce_s"][size]
                busbw = parse_size(size) * 2 * (world - 1) / world / t / 1e9
                row += f" {t * 1e6:>12.1f} {busbw:>11.2f}"
            if compare:
                times = {b: results[b][str(world)]["allreduce_s"][size] for b in (base, fast)}
                ratio = times[base] / times[fast]
                ratios[f"allreduce {size}, {world} ranks"] = round(ratio, 2)
                row += f" {ratio:>11.2f}"
            print(row)
    print()
    for world in worlds:
        values = results[backends[0]][str(world)]["ddp_values"]
        row = f"DDP step, {values / 1e6:.1f}M fp32 grads, {world} ranks: " + ", ".join(
            f"{b} {results[b][str(world)]['ddp_step_s'] * 1e3:.1f} ms" for b in backends
        )
        if compare:
            ratio = results[base][str(world)]["ddp_step_s"] / results[fast][str(world)]["ddp_step_s"]
            ratios[f"DDP step, {world} ranks"] = round(ratio, 2)
            row += f" (gloo/oneccl {ratio:.2f}x)"
        print(row)
    targets = {
        name: {"target": want, "measured": ratios.get(name), "met": ratios.get(name, 0) >= want}
        for name, want in TARGETS.items()
        if name in ratios
    }
    for name, t in targets.items():
        print(
            f"target {name}: oneccl >= {t['target']}x gloo: measured {t['measured']}x -> "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    return {"results": results, "ratios_gloo_over_oneccl": ratios, "targets": targets}


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return _worker(args)
    backends, worlds, sizes = args.backends, args.worlds, args.sizes
    results: dict[str, dict[str, dict]] = {b: {} for b in backends}
    for world in worlds:
        for b in backends:
            start = time.perf_counter()
            try:
                results[b][str(world)] = _job(b, world, args)
            except RuntimeError as exc:
                print(f"[bench comm] {exc}", file=sys.stderr)
                return 1
            print(
                f"[bench comm] {b}, {world} ranks: done in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    report = _report(results, backends, worlds, sizes)
    print(json.dumps(report["ratios_gloo_over_oneccl"] | {"targets": report["targets"]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="ipex-lars bench comm", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
