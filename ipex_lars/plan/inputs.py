"""Turning ``ipex-lars plan`` flags, a scenario preset and input files into model inputs.

Each input is taken from the first place that has it: an explicit flag, then a file the user
named (``--from-bench``, ``--network``), then the ``--scenario`` preset, then a default. The
place is kept next to the value, so every plan can print where each of its inputs came from.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ipex_lars.plan.cost import DEFAULT_OVERLAP, IMAGENET_TRAIN_IMAGES, Network, PlanError, PlanInputs
from ipex_lars.plan.presets import MODELS, Input, Scenario


@dataclass(frozen=True)
class Resolved:
    """Model inputs for the first node count, the node counts to tabulate, and each input's source."""

    inputs: PlanInputs
    node_counts: list[int]
    model: str
    sources: dict[str, Input]
    published_minutes: Input | None


def _read_json(path: str, what: str, fix: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise PlanError(f"cannot read {what} {path}: {reason}; {fix}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{what} {path} is not a JSON object; {fix}")
    return data


def read_bench_throughput(path: str, model: str) -> float:
    """Best ``images_per_second`` for ``model`` in a ``bench train`` JSON: {"results": [{...}, ...]}."""
    fix = "pass a file written by `ipex-lars bench train` (its --out folder's results.json), or give --throughput IMG_S"
    rows = _read_json(path, "benchmark file", fix).get("results")
    if not isinstance(rows, list):
        raise PlanError(f'benchmark file {path} has no "results" list; {fix}')
    rates = [r.get("images_per_second") for r in rows if isinstance(r, dict) and r.get("model") == model]
    rates = [r for r in rates if isinstance(r, (int, float)) and r > 0]
    if not rates:
        found = sorted({str(r.get("model")) for r in rows if isinstance(r, dict)})
        raise PlanError(
            f"benchmark file {path} has no images_per_second for model {model!r} (it has: "
            f"{', '.join(found) or 'none'}); benchmark that model or choose it with --model"
        )
    return float(max(rates))


def read_network(path: str) -> tuple[float, float]:
    """(latency in us, bandwidth in Gbit/s) from a file written by ``plan --calibrate --save``."""
    fix = "pass a file written by `ipex-lars plan --calibrate --save FILE.json`"
    data = _read_json(path, "network file", fix)
    values = (data.get("latency_us"), data.get("bandwidth_gbps"))
    if not all(isinstance(v, (int, float)) for v in values):
        raise PlanError(f"network file {path} needs numbers latency_us and bandwidth_gbps; {fix}")
    return float(values[0]), float(values[1])


def _pick(name: str, flag: str, given, file_value, scenario: Scenario | None, default, default_source: str):
    """The Input for ``name``: explicit flag, then file, then scenario, then default (None if none)."""
    if given is not None:
        return Input(given, f"given: {flag}")
    if file_value is not None:
        return file_value
    if scenario is not None and hasattr(scenario, name):
        return getattr(scenario, name)
    return None if default is None else Input(default, default_source)


def _require(sources: dict[str, Input | None], name: str, fix: str) -> float:
    if sources.get(name) is None:
        raise PlanError(fix)
    return sources[name].value


def resolve(args: argparse.Namespace, scenario: Scenario | None) -> Resolved:
    """Combine flags, files, a scenario and defaults into model inputs; raise PlanError if one is missing."""
    model = args.model or (scenario.model if scenario else "resnet50")
    if model not in MODELS and args.params is None:
        raise PlanError(f"unknown model {model!r}; choose {', '.join(MODELS)} or give --params N")
    bench = None
    if args.from_bench:
        bench = Input(
            read_bench_throughput(args.from_bench, model), f"best images_per_second for {model} in {args.from_bench}"
        )
    network = read_network(args.network) if args.network else None
    net_source = f"from {args.network} (ipex-lars plan --calibrate)"
    s: dict[str, Input | None] = {
        "params": (
            Input(args.params, "given: --params")
            if args.params is not None
            else Input(MODELS[model].params, MODELS[model].source)
        ),
        "nodes": (
            Input(",".join(map(str, args.nodes)), "given: --nodes")
            if args.nodes
            else scenario.nodes
            if scenario
            else None
        ),
        "ranks_per_node": _pick(
            "ranks_per_node", "--ranks-per-node", args.ranks_per_node, None, scenario, 1, "default: one rank per node"
        ),
        "node_throughput": _pick("node_throughput", "--throughput", args.throughput, bench, scenario, None, ""),
        "global_batch": _pick("global_batch", "--global-batch", args.global_batch, None, scenario, None, ""),
        "epochs": _pick("epochs", "--epochs", args.epochs, None, scenario, 90, "default: 90 epochs"),
        "dataset_size": _pick(
            "dataset_size",
            "--dataset-size",
            args.dataset_size,
            None,
            None,
            IMAGENET_TRAIN_IMAGES,
            "default: ImageNet-1k train split",
        ),
        "latency_us": _pick(
            "latency_us",
            "--latency-us",
            args.latency_us,
            Input(network[0], net_source) if network else None,
            scenario,
            None,
            "",
        ),
        "bandwidth_gbps": _pick(
            "bandwidth_gbps",
            "--bandwidth-gbps",
            args.bandwidth_gbps,
            Input(network[1], net_source) if network else None,
            scenario,
            None,
            "",
        ),
        "reduce_gbytes_s": _pick(
            "reduce_gbytes_s",
            "--reduce-gbytes-s",
            args.reduce_gbytes_s,
            None,
            None,
            0.0,
            "default: local reduction cost not modelled",
        ),
        "bytes_per_param": _pick(
            "bytes_per_param", "--bytes-per-param", args.bytes_per_param, None, scenario, 4, "default: fp32 gradients"
        ),
        "algorithm": _pick(
            "algorithm",
            "--algorithm",
            args.algorithm,
            None,
            scenario,
            "auto",
            "default: the cheaper of ring and rabenseifner",
        ),
        "overlap": _pick(
            "overlap",
            "--overlap",
            args.overlap,
            None,
            None,
            DEFAULT_OVERLAP,
            "ASSUMPTION (default): backward is ~2/3 of the FLOPs of forward + backward",
        ),
    }
    given = _require(s, "nodes", "the node count is unknown: give --nodes N (or a list N1,N2,...) or --scenario NAME")
    nodes = [int(n) for n in str(given).split(",")]  # --nodes, checked by its type, or a scenario's count
    throughput = _require(
        s,
        "node_throughput",
        "the per-node throughput is unknown: give --throughput IMG_S, --from-bench FILE.json or --scenario NAME",
    )
    batch = _require(s, "global_batch", "the global batch is unknown: give --global-batch B or --scenario NAME")
    net = None
    if s["latency_us"] is not None or s["bandwidth_gbps"] is not None:
        missing = "--latency-us" if s["latency_us"] is None else "--bandwidth-gbps"
        latency = _require(s, "latency_us", f"the network is half given: add {missing} (or use --network FILE)")
        gbps = _require(s, "bandwidth_gbps", f"the network is half given: add {missing} (or use --network FILE)")
        rpn = max(1, int(s["ranks_per_node"].value))
        reduce_rate = float(s["reduce_gbytes_s"].value) * 1e9
        net = Network(
            latency_s=float(latency) * 1e-6, bandwidth_bytes_s=float(gbps) * 1e9 / 8 / rpn, reduce_bytes_s=reduce_rate
        )
    inputs = PlanInputs(
        params=int(s["params"].value),
        nodes=nodes[0],
        node_throughput=float(throughput),
        global_batch=int(batch),
        epochs=float(s["epochs"].value),
        network=net,
        ranks_per_node=int(s["ranks_per_node"].value),
        dataset_size=int(s["dataset_size"].value),
        algorithm=str(s["algorithm"].value),
        overlap=float(s["overlap"].value),
        bytes_per_param=int(s["bytes_per_param"].value),
    )
    published = scenario.published_minutes if scenario else None
    return Resolved(inputs, nodes, model, {k: v for k, v in s.items() if v is not None}, published)
