"""``ipex-lars experiment large-batch``: does LARS keep accuracy where SGD loses it as the batch grows?

On the digits task, for growing global batch sizes and the same number of epochs, it trains
(a) SGD with momentum, the learning rate scaled linearly with the batch and a warmup
(Goyal et al.), and (b) LARS with warmup and polynomial decay. Both use the same schedule
shape (linear warmup, then decay with power 2), so the difference is the per-layer trust
ratio. It writes a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

SGD_LR_PER_32 = 0.1    # SGD's rate at batch 32, scaled linearly with the batch (Goyal et al.)
LARS_LR_PER_512 = 4.0  # LARS's rate at batch 512 (the digits recipe), scaled linearly too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="32,64,128,256,512,1024",
                        help="global batch sizes (the digits training set has 1,437 images)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for every run (default: 30)")
    parser.add_argument("--warmup-epochs", type=float, default=3.0, help="warmup epochs for both (default: 3)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per point, averaged (default: 2)")
    parser.add_argument("--out", default="docs", help="folder for large_batch.md/.json/.png (default: docs)")


def run_point(optimizer: str, batch: int, epochs: int, warmup: float, seed: int, out_dir: str) -> float:
    """Held-out top-1 of one training run."""
    from ipex_lars.train.config import load_config
    from ipex_lars.train.engine import train

    lr = SGD_LR_PER_32 * batch / 32 if optimizer == "sgd" else LARS_LR_PER_512 * batch / 512
    cfg = load_config("digits", dict(optimizer=optimizer, global_batch=batch, epochs=epochs, lr=lr,
                                     warmup_epochs=warmup, seed=seed, out_dir=out_dir, progress=False,
                                     keep_checkpoints=1, checkpoint_every=10**9))
    return train(cfg)["val_top1"]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["sgd"] for r in rows], "o-", label="SGD + momentum, linear lr scaling, warmup")
    ax.plot(batches, [r["lars"] for r in rows], "s-", label="LARS, warmup, poly decay")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size (digits train set: 1,437 images)")
    ax.set_ylabel("held-out top-1 accuracy (%)")
    ax.set_title("Large-batch training on digits, same epochs")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        print(f"ipex-lars experiment large-batch: --batches must be integers, got {args.batches!r}")
        return 2
    if any(b < 1 or b > 1437 for b in batches) or args.epochs < 1 or args.seeds < 1:
        print("ipex-lars experiment large-batch: batches must be in 1..1437, --epochs and --seeds >= 1")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = [(b, opt, s) for b in batches for opt in ("sgd", "lars") for s in range(args.seeds)]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, tqdm(runs, unit="run", desc="large-batch") as bar:
        for batch, opt, seed in bar:
            bar.set_postfix(batch=batch, optimizer=opt, seed=seed)
            acc = run_point(opt, batch, args.epochs, args.warmup_epochs, seed, f"{tmp}/{opt}-{batch}-{seed}")
            results.setdefault((batch, opt), []).append(acc)
    for batch in batches:
        rows.append({"batch": batch, "sgd": statistics.mean(results[(batch, "sgd")]),
                     "lars": statistics.mean(results[(batch, "lars")]),
                     "sgd_runs": results[(batch, "sgd")], "lars_runs": results[(batch, "lars")]})
    lines = [f"Command: `ipex-lars experiment large-batch --batches {args.batches} --epochs {args.epochs} "
             f"--warmup-epochs {args.warmup_epochs} --seeds {args.seeds}`", "",
             f"Digits (1,437 train / 360 held-out images), DigitsCNN, {args.epochs} epochs for every run, "
             f"mean of {args.seeds} seed(s). SGD: lr {SGD_LR_PER_32} x batch/32; LARS: lr {LARS_LR_PER_512} "
             "x batch/512; both linear warmup then poly decay (power 2), momentum 0.9, wd 5e-4 "
             "(BN and bias excluded).", "",
             "| global batch | steps/epoch | SGD top-1 (%) | LARS top-1 (%) |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {1437 // r['batch']} | {r['sgd']:.1f} | {r['lars']:.1f} |" for r in rows]
    (out / "large_batch.md").write_text("\n".join(lines) + "\n")
    (out / "large_batch.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(rows, out / "large_batch.png")
    print("\n".join(lines[4:]))
    print(f"wrote {out / 'large_batch.md'}, {out / 'large_batch.json'} and {out / 'large_batch.png'}")
    return 0
