"""Tables, targets, JSON and the chart of ``ipex-lars bench train``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ipex_lars.doctor import cpu_info

TARGETS = {
    "best ResNet-50 configuration vs the plain baseline": 2.5,
    "native stack's best vs the ipex stack's best": 0.95,
}


def _key(row: dict, ranks: int | None = None) -> tuple:
    return row["stack"], row["model"], row["batch"], ranks or row["ranks"]


def summarise(rows: list[dict]) -> dict:
    """Adds each row's ratio to its baseline and scaling efficiency; returns the bests and the targets."""
    ok = [r for r in rows if "error" not in r]
    baselines = {_key(r): r["images_per_second"] for r in ok if r["baseline"]}
    singles = {(_key(r, 1), r["label"]): r["images_per_second"] for r in ok if r["ranks"] == 1}
    for r in ok:
        base = baselines.get(_key(r))
        r["vs_baseline"] = r["images_per_second"] / base if base else None
        one = singles.get((_key(r, 1), r["label"]))
        r["scaling_efficiency"] = r["images_per_second"] / one if one and r["ranks"] > 1 else None
    best: dict[str, dict] = {}
    for r in ok:
        name = f"{r['stack']} {r['model']} b{r['batch']} x{r['ranks']}"
        if name not in best or r["images_per_second"] > best[name]["images_per_second"]:
            best[name] = r
    targets = {}
    resnet = [r for r in ok if r["model"] == "resnet50" and r["vs_baseline"] and r["ranks"] == 1]
    if resnet:
        top = max(resnet, key=lambda r: r["vs_baseline"])
        targets["best ResNet-50 configuration vs the plain baseline"] = {
            "ratio": top["vs_baseline"],
            "target": TARGETS["best ResNet-50 configuration vs the plain baseline"],
            "configuration": f"{top['stack']}: {top['label']} b{top['batch']}",
        }
    stacks = {r["stack"] for r in ok}
    if {"ipex", "native"} <= stacks:
        for model in sorted({r["model"] for r in ok}):
            tops = {
                s: max(
                    (r["images_per_second"] for r in ok if r["stack"] == s and r["model"] == model and r["ranks"] == 1),
                    default=0.0,
                )
                for s in ("ipex", "native")
            }
            if tops["ipex"]:
                targets[f"native stack's best vs the ipex stack's best, {model}"] = {
                    "ratio": tops["native"] / tops["ipex"],
                    "target": TARGETS["native stack's best vs the ipex stack's best"],
                }
    return {
        "best": {k: {"label": v["label"], "images_per_second": v["images_per_second"]} for k, v in best.items()},
        "targets": targets,
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'stack':7} {'model':10} {'batch':>5} {'ranks':>5}  {'configuration':28} {'img/s':>8} {'x base':>7} "
        f"{'effic.':>6} {'data':>6} {'fwd':>7} {'bwd':>7} {'allred':>7} {'optim':>6} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['stack']:7} {r['model']:10} {r['batch']:>5} {r['ranks']:>5}  {r['label']:28}"
        if "error" in r:
            lines.append(f"{lead} FAILED: {r['error'].splitlines()[0]}")
            continue
        ph = r["phase_ms"]
        ratio = f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] else "-"
        eff = f"{r['scaling_efficiency']:.2f}" if r["scaling_efficiency"] else "-"
        note = f"  ({len(r['failures'])} of {r['runs']} runs FAILED)" if r["failures"] else ""
        lines.append(
            f"{lead} {r['images_per_second']:8.2f} {ratio:>7} {eff:>6} {ph['data']:6.1f} "
            f"{ph['forward']:7.1f} {ph['backward']:7.1f} {ph['allreduce']:7.1f} {ph['optimizer']:6.1f} "
            f"{r['peak_rss_mb']:8.0f}{note}"
        )
    return "\n".join(lines)


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r["vs_baseline"]]
    groups = sorted({(r["model"], r["batch"], r["ranks"]) for r in ok})
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.32 * len(ok) + 1.2 * len(groups)), squeeze=False)
    for ax, (model, batch, ranks) in zip(axes[:, 0], groups):
        sel = sorted(
            (r for r in ok if (r["model"], r["batch"], r["ranks"]) == (model, batch, ranks)),
            key=lambda r: r["vs_baseline"],
        )
        names = [f"{r['stack']}: {r['label']}" for r in sel]
        ax.barh(names, [r["vs_baseline"] for r in sel], color=["grey" if r["baseline"] else "tab:blue" for r in sel])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{model}, batch {batch} per rank, {ranks} rank(s)", fontsize=9)
        ax.set_xlabel("training images/s relative to fp32 NCHW eager SGD (grey)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """Prints the table and targets, writes results.json and chart.png."""
    summary = summarise(rows)
    print(_table(rows))
    print("\nPhases are median ms per step; peak MB is the peak resident memory of the (largest) rank process.")
    for name, t in summary["targets"].items():
        verdict = "met" if t["ratio"] >= t["target"] else "NOT met"
        where = f" ({t['configuration']})" if "configuration" in t else ""
        print(f"target {name}: {t['ratio']:.2f}x (>= {t['target']}x) {verdict}{where}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chart.png").unlink(missing_ok=True)  # never leave an older run's chart next to these results
    doc = {
        "command": " ".join(["ipex-lars", *sys.argv[1:]]),
        "cpu": cpu_info()["model"],
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "results": rows,
        **summary,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    _chart(rows, out / "chart.png")
    print(f"wrote {out / 'results.json'}" + (f" and {out / 'chart.png'}" if (out / "chart.png").exists() else ""))
