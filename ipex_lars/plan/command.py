"""``ipex-lars plan``: predict time per iteration, time to train and scaling efficiency.

Given per-node throughput, model size, network latency and bandwidth, node count, global
batch and epochs, the cost model in ``cost.py`` predicts compute and allreduce time per
iteration (with the allreduce partly hidden under backward), time to train and efficiency
against perfect linear scaling. ``--check`` runs the three published scenarios and prints
predicted vs published time, once with each scenario's circular throughput and once with an
independent one where a published figure exists; ``--calibrate`` fits latency and bandwidth to real oneccl
allreduces between 2 local ranks. See docs/PLAN.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ipex_lars.plan import calibrate
from ipex_lars.plan.cost import DEFAULT_OVERLAP, PlanError, PlanInputs, hiding_bandwidth, predict, scaling
from ipex_lars.plan.inputs import resolve
from ipex_lars.plan.presets import MODELS, SCENARIOS
from ipex_lars.plan.report import (
    check_table,
    explain,
    outcome_line,
    percent_off,
    prediction_dict,
    scaling_table,
    sources_block,
    sources_dict,
)
from launchers.argtypes import byte_size, csv_of, float_range, int_range

PROG = "ipex-lars plan"
MAX_NODES = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run (default: one plan from the inputs below)")
    what.add_argument(
        "--scenario",
        help=f"start from a published scenario: {', '.join(SCENARIOS)}; flags given as well override its inputs",
    )
    what.add_argument(
        "--check",
        action="store_true",
        help="predict all published scenarios; print predicted vs published time and the %% difference",
    )
    what.add_argument(
        "--calibrate",
        action="store_true",
        help="time oneccl allreduces between 2 local ranks and fit latency and bandwidth",
    )
    what.add_argument("--save", metavar="FILE.json", help="with --calibrate: write the fit for --network")
    what.add_argument(
        "--calibrate-sizes",
        type=csv_of(byte_size(1 << 30), "sizes from 1 byte to 1G, e.g. 4K,1M,16M"),
        default=calibrate.SIZES,
        help=f"message sizes, 1 byte to 1G each (default {calibrate.SIZES})",
    )
    what.add_argument(
        "--calibrate-seconds",
        type=float_range(0, 3600, above=True),
        default=0.2,
        help="time budget per size, above 0 and up to 3600 (default 0.2)",
    )
    what.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    model = parser.add_argument_group("model and data")
    model.add_argument("--model", help=f"parameter count preset: {', '.join(MODELS)} (default resnet50)")
    model.add_argument("--params", type=int_range(1, 10**13), help="parameter count (overrides --model's)")
    model.add_argument(
        "--bytes-per-param", type=int_range(1, 16), help="bytes per gradient value reduced (default 4: fp32)"
    )
    model.add_argument("--global-batch", type=int_range(1, 10**9), help="images per iteration over all ranks")
    model.add_argument("--epochs", type=float_range(0, 10**6, above=True), help="epochs to train (default 90)")
    model.add_argument(
        "--dataset-size", type=int_range(1, 10**12), help="images per epoch (default 1,281,167: ImageNet-1k train)"
    )
    compute = parser.add_argument_group("compute")
    compute.add_argument(
        "--throughput",
        type=float_range(0, 10**9, above=True),
        metavar="IMG_S",
        help="training images/s of one node alone",
    )
    compute.add_argument(
        "--from-bench",
        metavar="FILE.json",
        help="take the best images_per_second for the model from the results.json of `ipex-lars bench train`",
    )
    compute.add_argument(
        "--nodes",
        type=csv_of(int_range(1, MAX_NODES), f"node counts from 1 to {MAX_NODES}, e.g. 16 or 1,2,4,8"),
        help="node count, or a list (1,2,4,8) for a scaling table",
    )
    compute.add_argument(
        "--ranks-per-node",
        type=int_range(1, 8192),
        help="ranks per node; they share the node's throughput and bandwidth (default 1)",
    )
    net = parser.add_argument_group("network")
    net.add_argument("--latency-us", type=float_range(0, 10**9), help="allreduce message latency alpha, microseconds")
    net.add_argument(
        "--bandwidth-gbps", type=float_range(0, 10**9, above=True), help="network bandwidth of one node, Gbit/s"
    )
    net.add_argument(
        "--reduce-gbytes-s",
        type=float_range(0, 10**9),
        help="local reduction speed (gamma term), GB/s; default 0 = not modelled",
    )
    net.add_argument("--network", metavar="FILE.json", help="latency and bandwidth from --calibrate --save")
    net.add_argument(
        "--algorithm", choices=("ring", "rabenseifner", "auto"), help="allreduce algorithm (default auto: the cheaper)"
    )
    net.add_argument(
        "--overlap",
        type=float_range(0, 1),
        help=f"fraction of compute that can hide the allreduce (default {DEFAULT_OVERLAP:.2f}: backward's share)",
    )


def _plan(args: argparse.Namespace) -> int:
    scenario = SCENARIOS.get(args.scenario) if args.scenario else None
    if args.scenario and scenario is None:
        raise PlanError(f"unknown scenario {args.scenario!r}; choose one of {', '.join(SCENARIOS)}")
    r = resolve(args, scenario)
    predictions = scaling(r.inputs, r.node_counts)
    if args.json:
        print(
            json.dumps(
                {
                    "model": r.model,
                    "predictions": [
                        prediction_dict(replace(r.inputs, nodes=n), p) for n, p in zip(r.node_counts, predictions)
                    ],
                    "sources": sources_dict(r.sources),
                },
                indent=2,
            )
        )
        return 0
    inputs = r.inputs
    title = scenario.title if scenario else f"{r.model}, {inputs.params:,} parameters"
    print(f"{PROG}: {title}")
    print("inputs:")
    print("\n".join(sources_block(r.sources)))
    if len(predictions) == 1:
        p = predictions[0]
        print(
            f"prediction for {inputs.nodes} nodes x {inputs.ranks_per_node} ranks, global batch "
            f"{inputs.global_batch:,}:"
        )
        print("\n".join(explain(inputs, p)))
        if r.published_minutes is not None:
            print(
                f"published: {r.published_minutes.value:g} min; predicted {p.time_to_train_s / 60:.1f} min "
                f"({percent_off(p.time_to_train_s, r.published_minutes.value):+.1f}%)"
            )
    else:
        print("\n".join(scaling_table(inputs, predictions)))
    if any(v.circular for v in r.sources.values()):
        print(
            "CIRCULAR: an input above was derived from the published result, so this prediction tests only "
            "the communication model, not the compute throughput"
        )
    return 0


def _outcome(inputs: PlanInputs, published_minutes: float) -> dict:
    """One prediction of a published run as plain data: time, % off, and the allreduce it exposes."""
    p = predict(inputs)
    hiding = hiding_bandwidth(inputs)
    return {
        "node_throughput": inputs.node_throughput,
        "predicted_minutes": p.time_to_train_s / 60,
        "percent_off": percent_off(p.time_to_train_s, published_minutes),
        "compute_ms": p.compute_s * 1e3,
        "allreduce_ms": p.allreduce.total_s * 1e3 if p.allreduce else 0.0,
        "algorithm": p.allreduce.algorithm if p.allreduce else "none",
        "exposed_ms": p.exposed_s * 1e3,
        "efficiency": p.efficiency,
        "ranks": p.ranks,
        "hiding_gbps": hiding * 8 / 1e9 * inputs.ranks_per_node if hiding else None,
    }


def _check(args: argparse.Namespace) -> int:
    """Predict every published scenario twice: with its own throughput and with an independent one.

    The scenario's own throughput is circular (taken from the result); the independent one was
    measured apart from the record run, so only that prediction tests the compute side. Flags
    such as --overlap apply to both; the independent throughput always comes from the preset.
    """
    rows, details = [], []
    for name, scenario in SCENARIOS.items():
        r = resolve(args, scenario)
        published = float(r.published_minutes.value)
        row = {
            "scenario": name,
            "title": scenario.title,
            "published_minutes": published,
            **_outcome(r.inputs, published),
            "circular": any(v.circular for v in r.sources.values()),
            "inputs": sources_dict(r.sources),
            "independent": None,
            "independent_missing": scenario.independent_missing,
        }
        details += [f"{name}: {scenario.title}", *sources_block(r.sources), outcome_line("", row)]
        ind = scenario.independent_throughput
        if ind is None:
            details.append(f"  independent throughput: none found; {scenario.independent_missing}")
        else:
            row["independent"] = {
                **_outcome(replace(r.inputs, node_throughput=float(ind.value)), published),
                "source": ind.source,
            }
            details += [
                f"  independent throughput = {float(ind.value):.1f} img/s per node: {ind.source}",
                outcome_line("independent: ", row["independent"]),
            ]
        rows.append(row)
        details.append("")
    if args.json:
        print(json.dumps({"scenarios": rows}, indent=2))
        return 0
    print(f"{PROG} --check: predicted vs published time to train, with two per-node throughputs")
    print("\n".join(check_table(rows)) + "\n")
    print("\n".join(details).rstrip())
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    try:
        result = calibrate.fit(*calibrate.measure(args.calibrate_sizes, args.calibrate_seconds))
    except calibrate.CalibrationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    network = result.as_network_file()
    if args.save:
        try:
            with open(args.save, "w") as f:
                json.dump(network, f, indent=2)
        except OSError as exc:
            raise PlanError(f"cannot write {args.save}: {exc.strerror}; choose a writable path for --save") from None
    if args.json:
        print(json.dumps(network, indent=2))
        return 0
    print("\n".join(calibrate.report(result)))
    if args.save:
        print(f"saved to {args.save}; use it with `ipex-lars plan --network {args.save} ...`")
    return 0


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("check", "calibrate") if getattr(args, m)]
    if len(modes) > 1 or (modes and args.scenario):
        raise PlanError("--check, --calibrate and --scenario are separate modes: give one of them")
    if args.save and not args.calibrate:
        raise PlanError("--save writes a calibration: use it together with --calibrate")
    if args.check:
        return _check(args)
    if args.calibrate:
        return _calibrate(args)
    return _plan(args)
