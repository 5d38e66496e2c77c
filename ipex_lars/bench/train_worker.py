"""One configuration of ``ipex-lars bench train``, measured in its own process (or job of ranks).

It builds the model, optimizer and wrappers exactly as ``ipex-lars train`` does and
times the engine's own ``train_step`` on synthetic images, so the figures are those of
the training loop users run. A fresh process per configuration keeps compile caches,
IPEX's weight prepacking and the peak-memory reading of one configuration out of the next.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback

RESULT_TAG = "BENCH_TRAIN_RESULT "
# Input shape and classes per model: ImageNet-sized for the two paper models, digits-sized for the small one.
MODEL_INPUTS = {"resnet50": (224, 1000), "alexnet_bn": (224, 1000), "digits_cnn": (8, 10)}


def measure(spec: dict) -> dict:
    """Time ``spec["steps"]`` training steps after ``spec["warmup"]`` untimed ones; rank 0 gets the medians."""
    import torch
    from torch import nn

    from ipex_lars.data import BatchPlan, epoch_batches
    from ipex_lars.data.sources import synthetic
    from ipex_lars.train.config import TrainConfig
    from ipex_lars.train.engine import train_step
    from ipex_lars.train.metrics import PHASES
    from ipex_lars.train.parts import build_model, init_distributed, wrap_model

    image_size, num_classes = MODEL_INPUTS[spec["model"]]
    image_size = spec.get("image_size") or image_size
    steps, warmup = spec["steps"], spec["warmup"]
    rank, world, started = init_distributed(TrainConfig())  # oneccl when launched as several ranks
    global_batch = spec["batch"] * world
    cfg = TrainConfig(
        model=spec["model"],
        data="synthetic",
        image_size=image_size,
        num_classes=num_classes,
        num_samples=global_batch * (steps + warmup),
        epochs=1,
        global_batch=global_batch,
        optimizer=spec["optimizer"],
        lr=0.1,
        warmup_epochs=0,
        precision=spec["precision"],
        channels_last=spec["layout"] == "channels_last",
        execution=spec["execution"],
        progress=False,
    )
    train_data, _ = synthetic(cfg.num_samples, image_size, num_classes=num_classes, seed=0)
    torch.manual_seed(0)
    model, optimizer = build_model(cfg, num_classes)
    model, sync = wrap_model(model, optimizer, cfg, world)
    plan = BatchPlan(len(train_data), cfg.global_batch, 1, rank, world, cfg.seed)
    batches = epoch_batches(train_data, plan, 0, 0, cfg.workers)
    criterion = nn.CrossEntropyLoss()

    step_seconds, phases = [], {p: [] for p in PHASES}
    for i in range(warmup + steps):
        timings = dict.fromkeys(PHASES, 0.0)
        start = time.perf_counter()
        train_step(model, optimizer, criterion, batches, cfg, timings, sync)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            step_seconds.append(elapsed)
            for p in PHASES:
                phases[p].append(timings[p])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if world > 1:  # the job's figure is its slowest rank's step and its largest rank's memory
        import torch.distributed as dist

        worst = torch.tensor([statistics.median(step_seconds), peak_mb], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        median_step, peak_mb = worst.tolist()
        del model, sync
        if started:
            import ipex_lars.distributed as ild

            dist.barrier()
            ild.shutdown()
    else:
        median_step = statistics.median(step_seconds)
    return {
        "rank": rank,
        "ranks": world,
        "global_batch": global_batch,
        "images_per_second": global_batch / median_step,
        "step_ms": 1000 * median_step,
        "phase_ms": {p: 1000 * statistics.median(v) for p, v in phases.items()},
        "peak_rss_mb": peak_mb,
        "optimizer_impl": getattr(optimizer, "impl", "torch.optim.SGD"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(spec_json: str) -> int:
    """Run one configuration; rank 0 prints its result as one tagged JSON line. On a failure every
    rank prints the error as that line and its traceback on stderr, for the parent to show."""
    try:
        result = measure(json.loads(spec_json))
    except (ValueError, RuntimeError, ImportError) as exc:
        traceback.print_exc()
        print(f"{RESULT_TAG}{json.dumps({'error': f'{type(exc).__name__}: {exc}'})}", flush=True)
        return 1
    if result["rank"] == 0:
        print(f"{RESULT_TAG}{json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
