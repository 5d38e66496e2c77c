"""``ipex-lars bench optimizer``: LARS step time against each other and the memory floor.

Every candidate and the triad bandwidth probe are timed in the same process,
interleaved round-robin, so the ratios hold on a shared, noisy machine even
when absolute times drift. The floor is 20 bytes per element (read w, g, v;
write w, v) at the STREAM-triad bandwidth measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

from launchers.argtypes import csv_of, int_range, one_of

PARAM_SETS = {
    "resnet50": "ResNet-50's parameters: torchvision's resnet50 tensor by tensor, in fp32",
    "many-small": "overhead-bound: 2,000 tensors of 512 values",
}
IMPLS = ("fused", "foreach", "reference")
# peers a user might pick instead: torch's own fused SGD (LARS's bytes minus the norms) and
# our foreach LARS through torch.compile
MAX_COMPILED_TENSORS = 200
BYTES_PER_ELEMENT = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sets",
        type=csv_of(one_of(PARAM_SETS), f"parameter sets out of {', '.join(PARAM_SETS)}"),
        default=",".join(PARAM_SETS),
        help=f"comma-separated parameter sets: {', '.join(PARAM_SETS)} (default: all)",
    )
    parser.add_argument(
        "--repeats", type=int_range(1, 10000), default=30, help="timed steps per candidate, 1-10000 (default: 30)"
    )
    parser.add_argument(
        "--warmup", type=int_range(0, 10000), default=3, help="untimed steps per candidate first, 0-10000 (default: 3)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the slow per-parameter reference")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile'd foreach LARS (its compile time grows with the tensor count; "
        "see docs/BENCHMARKS.md)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def _param_shapes(name: str) -> list[tuple[int, ...]]:
    if name == "resnet50":
        import torchvision

        return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]
    return [(512,)] * 2000


def _make_params(shapes: list[tuple[int, ...]], seed: int) -> list:
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def _candidates(shapes: list[tuple[int, ...]], impls: list[str], compiled: bool) -> dict[str, Callable[[], None]]:
    import torch

    from ipex_lars.optim import LARS

    steps: dict[str, Callable[[], None]] = {}
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=5e-5)
    for impl in impls:
        steps[impl] = LARS(_make_params(shapes, 0), momentum_style="sgd", impl=impl, **hyper).step
    steps["sgd-fused"] = torch.optim.SGD(_make_params(shapes, 0), fused=True, **hyper).step
    if compiled and len(shapes) <= MAX_COMPILED_TENSORS:
        steps["compiled-foreach"] = _compiled_foreach(shapes, hyper)
    elif compiled:
        print(
            f"[bench optimizer] compiled-foreach skipped for {len(shapes)} tensors: torch.compile's time grows "
            f"with the tensor count (limit {MAX_COMPILED_TENSORS}); see docs/BENCHMARKS.md",
            file=sys.stderr,
        )
    ipex_step = _ipex_candidate(shapes, hyper)
    if ipex_step is not None:
        steps["ipex"] = ipex_step
    return steps


def _compiled_foreach(shapes: list[tuple[int, ...]], hyper: dict) -> Callable[[], None]:
    """Our foreach LARS step compiled by torch.compile (what a user might try instead of a kernel)."""
    import torch

    from ipex_lars.optim.foreach import lars_foreach

    params = _make_params(shapes, 0)
    ws, gs = [p.detach() for p in params], [p.grad for p in params]
    vs, lows = [torch.zeros_like(w) for w in ws], [None] * len(ws)
    kw = dict(
        lr=hyper["lr"],
        momentum=hyper["momentum"],
        weight_decay=hyper["weight_decay"],
        trust_coefficient=0.001,
        eps=0.0,
        nesterov=False,
        momentum_style="sgd",
        clip=False,
        adapt=True,
    )
    step = torch.compile(lambda: lars_foreach(ws, gs, vs, lows, **kw))
    return step


def _ipex_candidate(shapes: list[tuple[int, ...]], hyper: dict) -> Callable[[], None] | None:
    """IPEX's fused LARS, set up the way users get it: ``ipex.optimize`` with its ``Lars``."""
    try:
        import intel_extension_for_pytorch as ipex
        from intel_extension_for_pytorch.optim._lars import Lars
    except ImportError:
        return None
    import torch

    holder = torch.nn.Module()
    holder.params = torch.nn.ParameterList(_make_params(shapes, 0))
    opt = Lars(
        holder.parameters(),
        lr=hyper["lr"],
        momentum=hyper["momentum"],
        weight_decay=hyper["weight_decay"],
        eeta=0.001,
        epsilon=0.0,
    )
    holder.train()
    holder, opt = ipex.optimize(holder, optimizer=opt, dtype=torch.float32, weights_prepack=False)
    if not getattr(opt, "fused", False):
        raise RuntimeError("ipex.optimize did not switch Lars to its fused step")
    for p, fresh in zip(holder.parameters(), _make_params(shapes, 0)):  # optimize() copies the module
        p.grad = fresh.grad
    return opt.step


def _triad(n: int) -> Callable[[], None]:
    import torch

    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    return lambda: torch.add(b, c, alpha=3.0, out=a)


def measure(set_name: str, repeats: int, warmup: int, impls: list[str], compiled: bool = True) -> dict:
    """Median step time of every candidate on one parameter set, with the floor."""
    shapes = _param_shapes(set_name)
    numel = sum(math.prod(s) for s in shapes)
    steps = _candidates(shapes, impls, compiled)
    triad_n = 1 << 25  # 128 MB per array: well past any last-level cache
    steps["triad"] = _triad(triad_n)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    from tqdm import tqdm

    for r in tqdm(range(repeats), desc=set_name, unit="round", leave=False):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    bandwidth = 3 * 4 * triad_n / med.pop("triad")
    floor = BYTES_PER_ELEMENT * numel / bandwidth
    result = {
        "set": set_name,
        "tensors": len(shapes),
        "elements": numel,
        "triad_GBps": bandwidth / 1e9,
        "floor_ms": floor * 1e3,
        "median_ms": {},
        "x_floor": {},
    }
    for name, t in med.items():
        result["median_ms"][name] = t * 1e3
        result["x_floor"][name] = t / floor
    if "ipex" in med:
        result["speedup_vs_ipex"] = {name: med["ipex"] / t for name, t in med.items() if name != "ipex"}
    return result


def _print_table(result: dict) -> None:
    print(
        f"\n{result['set']}: {result['tensors']} tensors, {result['elements']:,} elements; "
        f"triad {result['triad_GBps']:.1f} GB/s -> floor {result['floor_ms']:.2f} ms"
    )
    vs_ipex = result.get("speedup_vs_ipex", {})
    print(f"  {'impl':<17} {'median ms':>10} {'x floor':>8} {'ipex/impl':>10}")
    for name, ms in result["median_ms"].items():
        ratio = f"{vs_ipex[name]:.2f}" if name in vs_ipex else "-"
        print(f"  {name:<17} {ms:>10.3f} {result['x_floor'][name]:>8.2f} {ratio:>10}")


def run(args: argparse.Namespace) -> int:
    import torch

    impls = [i for i in IMPLS if not (args.no_reference and i == "reference")]
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": []}
    for set_name in args.sets:
        result = measure(set_name, args.repeats, args.warmup, impls, compiled=not args.no_compile)
        _print_table(result)
        report["results"].append(result)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
