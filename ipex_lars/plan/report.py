"""What ``ipex-lars plan`` prints: one line per term, scaling tables, the published-scenario check.

Text for people, and the same content as plain dicts for ``--json``.
"""

from __future__ import annotations

from dataclasses import asdict

from ipex_lars.plan.cost import PlanInputs, Prediction, gradient_bytes
from ipex_lars.plan.presets import Input


def _ms(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if 0 < seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _allreduce_formula(inputs: PlanInputs, p: Prediction) -> str:
    cost, net = p.allreduce, inputs.network
    latency = "2(p-1)" if cost.algorithm == "ring" else "2*ceil(log2 p)"
    gamma = f" + {_ms(cost.reduce_s)} reduce" if cost.reduce_s else ""
    return (
        f"{cost.algorithm}: {latency}*alpha + 2(p-1)/p*n*beta = {_ms(cost.latency_s)} latency + "
        f"{_ms(cost.transfer_s)} transfer{gamma} (p={p.ranks}, n={gradient_bytes(inputs) / 1e6:.1f} MB, "
        f"alpha={net.latency_s * 1e6:g} us, {net.bandwidth_bytes_s * 8 / 1e9:g} Gbit/s per rank)"
    )


def explain(inputs: PlanInputs, p: Prediction) -> list[str]:
    """Each term of one prediction on one line: its value and what it means."""
    rank_rate = inputs.node_throughput / inputs.ranks_per_node
    lines = [
        f"  compute        {_ms(p.compute_s):>11}  per-rank batch {p.per_rank_batch:g} / {rank_rate:g} img/s "
        "per rank: forward, backward and update of one rank's share"
    ]
    if p.allreduce is None:
        lines.append(f"  allreduce      {_ms(0):>11}  one rank: no gradients to exchange")
    else:
        lines += [
            f"  allreduce      {_ms(p.allreduce.total_s):>11}  {_allreduce_formula(inputs, p)}",
            f"  hidden         {_ms(p.hidden_s):>11}  runs under backward: at most overlap {inputs.overlap:.2f}"
            f" x compute = {_ms(inputs.overlap * p.compute_s)}",
            f"  exposed        {_ms(p.exposed_s):>11}  allreduce beyond that; it adds to every iteration",
        ]
    lines += [
        f"  iteration      {_ms(p.iteration_s):>11}  compute + exposed allreduce",
        f"  time to train  {_duration(p.time_to_train_s):>11}  {inputs.epochs:g} epochs x "
        f"{inputs.dataset_size:,} images / global batch {inputs.global_batch:,} = {p.iterations:,.0f} "
        "iterations x iteration",
        f"  throughput     {p.throughput:>7,.0f} img/s  global batch / iteration",
        f"  efficiency     {p.efficiency * 100:>9.1f} %  throughput / ({p.ranks} ranks x per-rank throughput) "
        "= compute / iteration: 100% is perfect linear scaling",
    ]
    return lines


def scaling_table(inputs: PlanInputs, predictions: list[Prediction]) -> list[str]:
    """Node count against time to train and efficiency, global batch fixed."""
    lines = [
        f"{'nodes':>6} {'ranks':>6} {'batch/rank':>10} {'compute':>10} {'allreduce':>10} {'exposed':>10} "
        f"{'iteration':>10} {'to train':>10} {'img/s':>9} {'effic.':>7}"
    ]
    for p in predictions:
        total = p.allreduce.total_s if p.allreduce else 0.0
        lines.append(
            f"{p.ranks // inputs.ranks_per_node:>6} {p.ranks:>6} {p.per_rank_batch:>10.4g} "
            f"{_ms(p.compute_s):>10} {_ms(total):>10} {_ms(p.exposed_s):>10} {_ms(p.iteration_s):>10} "
            f"{_duration(p.time_to_train_s):>10} {p.throughput:>9,.0f} {p.efficiency * 100:>6.1f}%"
        )
    lines.append(
        "(global batch fixed; compute shrinks with the per-rank batch while the allreduce does not, "
        "so efficiency falls once the allreduce no longer hides under backward)"
    )
    return lines


def _value(v: float | str) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.4g}"
    return f"{int(v):,}" if isinstance(v, (int, float)) else str(v)


def sources_block(sources: dict[str, Input]) -> list[str]:
    """Every input with its value and where it came from; circular ones are marked."""
    width = max(len(k) for k in sources)
    return [f"  {name:<{width}} = {_value(value.value):<12} {value.source}" for name, value in sources.items()]


def sources_dict(sources: dict[str, Input]) -> dict:
    """The inputs and their sources as plain data for --json."""
    return {name: {"value": v.value, "source": v.source, "circular": v.circular} for name, v in sources.items()}


def percent_off(predicted_s: float, published_minutes: float) -> float:
    """Signed difference of the prediction from the published time, in percent of the published time."""
    return (predicted_s / 60 - published_minutes) / published_minutes * 100


def _hides(r: dict) -> str:
    """The node bandwidth below which the allreduce stops hiding under backward, as text."""
    if r["ranks"] == 1:
        return "n/a"
    return "never" if r["hiding_gbps"] is None else f"{r['hiding_gbps']:.1f} Gbit/s"


def outcome_line(label: str, r: dict) -> str:
    """One prediction's terms in a line: compute, allreduce, exposed part, efficiency, hiding bandwidth."""
    return (
        f"  -> {label}compute {r['compute_ms']:.1f} ms, {r['algorithm']} allreduce {r['allreduce_ms']:.1f} ms, "
        f"exposed {r['exposed_ms']:.1f} ms, efficiency {r['efficiency'] * 100:.1f}%, hides down to {_hides(r)}"
    )


def _cells(r: dict, mark: str) -> str:
    """Throughput, predicted time, % off and exposed allreduce of one prediction, as table cells."""
    return (
        f"{r['node_throughput']:>9.1f}{mark:<2} {r['predicted_minutes']:>6.1f} min {r['percent_off']:>+7.1f}% "
        f"{r['exposed_ms']:>6.1f} ms"
    )


def check_table(rows: list[dict]) -> list[str]:
    """Predicted vs published time for each scenario: with its own throughput, then an independent one.

    The first throughput is the scenario's (marked C when it was derived from the published
    result); the second was measured apart from the record run. Where there is no such
    figure the row says so instead of leaving a blank.
    """
    cols = f"{'img/s/node':>11} {'predicted':>10} {'off':>8} {'exposed':>9}"
    lines = [
        f"{'':28}{'scenario throughput':<41}independent throughput",
        f"{'scenario':<16} {'published':>10}  {cols}  {cols}",
    ]
    for r in rows:
        ind = r["independent"]
        left = _cells(r, " C" if r["circular"] else "")
        right = _cells(ind, "") if ind else "  none found: no independent figure (see below)"
        lines.append(f"{r['scenario']:<16} {r['published_minutes']:>6.1f} min  {left}  {right}")
    lines += [
        "img/s/node: training images/s of one node. C = CIRCULAR: derived from the published result itself,",
        "  so that prediction tests only the communication model. independent: measured apart from the record",
        "  run (sources below), so it tests the compute side too. exposed: allreduce time per iteration that",
        "  backward does not hide.",
    ]
    return lines


def prediction_dict(inputs: PlanInputs, p: Prediction) -> dict:
    """A prediction and its inputs as plain data for --json."""
    out = asdict(p)
    out["allreduce_s"] = p.allreduce.total_s if p.allreduce else 0.0
    out["inputs"] = asdict(inputs)
    return out
