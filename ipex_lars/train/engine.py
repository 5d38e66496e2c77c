"""The training loop. Read it top to bottom: ``train`` sets a ``Run`` up, runs
``train_one_epoch`` until the last step, saves checkpoints when ``CheckpointPolicy`` says,
and ends; ``train_step`` is one optimizer step.

One optimizer step = ``accum_steps`` micro-batches on each of ``world_size`` ranks,
``global_batch`` images in all. The sample order comes from ``BatchPlan`` (seed,
epoch, step), so resuming from a checkpoint continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ipex_lars.distributed as ild
from ipex_lars.data import BatchPlan, build_datasets, epoch_batches, write_skipped
from ipex_lars.optim import WarmupPolyLR
from ipex_lars.train import checkpoint, precision, resume
from ipex_lars.train.config import TrainConfig
from ipex_lars.train.evaluate import average_buffers, evaluate
from ipex_lars.train.grad_sync import GradientSync, grads_finite
from ipex_lars.train.metrics import PHASES, MetricsLog
from ipex_lars.train.parts import build_model, init_distributed, wrap_model
from ipex_lars.train.precision import autocast, to_input
from ipex_lars.train.stop import Interrupted, StopRequest


@dataclass
class Run:
    """One training run as ``setup`` builds it: where it writes, its place in the job, its data,
    the model (``core``, what checkpoints save, and ``model``, how it runs), and its step."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    joined: bool  # this process started the process group, so it ends it
    train_data: Any
    val_data: Any
    plan: BatchPlan
    total_steps: int
    core: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupPolyLR
    criterion: nn.Module
    sync: GradientSync | None
    step: int = 0
    resumed_from: Path | None = None

    def log(self, message: str) -> None:
        _log(self.rank, message)


@dataclass
class StepResult:
    """One optimizer step as ``train_step`` saw it on this rank."""

    loss: float
    finite: bool  # gradients were finite, so the step was taken
    skipped_images: int  # unreadable images left out of its micro-batches
    overlapped_buckets: int = 0  # buckets LARS stepped during backward (overlap_optimizer)


@dataclass
class Tally:
    """What the run counts over all its steps."""

    skipped_steps: int = 0
    skipped_images: int = 0
    overlapped_buckets: int = 0
    timings: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


class CheckpointPolicy:
    """When to save, and the checkpoint saved last.

    A checkpoint is due every ``every`` steps (0: at the end of every epoch); ``save`` is also
    called when a stop is asked for and at the end. A step is written once however often it is
    asked for. Every rank calls ``save``: BN statistics are averaged across ranks first, then
    rank 0 writes.
    """

    def __init__(self, every: int, keep: int, step: int, path: Path | None) -> None:
        self.every, self.keep = every, keep
        self.saved_step, self.saved_path = step, path

    def due(self, step: int, end_of_epoch: bool) -> bool:
        return step % self.every == 0 if self.every else end_of_epoch

    def save(self, run: Run) -> Path | None:
        """This step's checkpoint path (None on ranks other than 0)."""
        if self.saved_step != run.step:
            average_buffers(run.core, run.world)
            if run.rank == 0:
                state = _state(run.cfg, run.step, run.core, run.optimizer, run.scheduler)
                self.saved_path = checkpoint.save(run.out, run.step, state, self.keep)
            self.saved_step = run.step
        return self.saved_path


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training ``cfg`` describes; return the final metrics."""
    run = setup(cfg)
    policy = CheckpointPolicy(run.cfg.checkpoint_every, run.cfg.keep_checkpoints, run.step, run.resumed_from)
    tally = Tally()
    metrics = MetricsLog(run.out, resumed_at=run.step) if run.rank == 0 else None  # drops a crashed run's lines
    progress = _progress(run.rank, run.total_steps, run.step) if run.cfg.progress else None
    record: dict = {}
    try:
        with StopRequest() as stop:
            while run.step < run.total_steps:
                for record, end_of_epoch, stopping in train_one_epoch(run, tally, stop):
                    _report(record, metrics, progress)
                    if policy.due(run.step, end_of_epoch):
                        policy.save(run)
                    if stopping:  # every rank learns it at the same step
                        path = policy.save(run)
                        run.log(f"stopped at step {run.step}: saved {path}; continue with --resume auto")
                        raise Interrupted(f"signal {stop.signum or 'on another rank'}")
    finally:
        if progress:
            progress.close()
        if metrics:
            metrics.close()
        if skip_log := write_skipped(run.out, run.train_data, run.val_data, rank=run.rank):
            run.log(f"unreadable images skipped so far are named in {skip_log}")
    policy.save(run)
    if "val_top1" not in record:
        record["val_top1"] = evaluate(run.core, run.val_data, run.cfg, run.rank, run.world)["top1"]
    finish(run)
    record.update(
        {
            "rank": run.rank,
            "world_size": run.world,
            "skipped_steps": tally.skipped_steps,
            "skipped_images": tally.skipped_images,
            "steps": run.step,
            "phase_seconds": tally.timings,
            "optimizer_impl": getattr(run.optimizer, "impl", "torch.optim.SGD"),
            "overlapped_bucket_steps": tally.overlapped_buckets,
        }
    )
    return record


def setup(cfg: TrainConfig) -> Run:
    """Everything a run needs, resumed from a checkpoint when ``cfg.resume`` asks for one."""
    cfg, precision_note = precision.choose(cfg)
    out = Path(cfg.out_dir)
    _prepare_out_dir(out)
    rank, world, joined = init_distributed(cfg)
    _log(rank, precision_note)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_data, val_data = build_datasets(
        cfg.data,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        image_size=cfg.image_size,
        num_classes=cfg.num_classes,
        data_dir=cfg.data_dir,
        max_pixels=cfg.max_image_pixels,
    )
    plan = BatchPlan(len(train_data), cfg.global_batch, cfg.accum_steps, rank, world, cfg.seed)
    schedule_steps = cfg.epochs * plan.steps_per_epoch
    total_steps = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    core, optimizer = build_model(cfg, train_data.num_classes, train_data.channels)
    warmup_steps = min(round(cfg.warmup_epochs * plan.steps_per_epoch), schedule_steps - 1)
    scheduler = WarmupPolyLR(
        optimizer,
        warmup_steps=warmup_steps,
        total_steps=schedule_steps,
        power=cfg.poly_power,
        end_lr=cfg.end_lr,
        warmup_start_lr=cfg.warmup_start_lr,
    )

    if rank == 0 and (removed := checkpoint.remove_interrupted(out))[0]:
        files, freed = removed
        _log(
            rank,
            f"removed {files} temp file(s) of interrupted checkpoint saves from {out}, freeing {freed} bytes"
            + (f" ({checkpoint.human_size(freed)})" if freed >= 1000 else ""),
        )
    step, resumed_from = 0, None
    if resumed := resume.agree(cfg, out, rank, world):
        resumed_from, state = resumed
        step = _restore(state, cfg, core, optimizer, scheduler)
        del resumed, state  # free the checkpoint's copy of the weights
        _log(rank, f"resumed from {resumed_from} at step {step}")
    model, sync = wrap_model(core, optimizer, cfg, world)
    if world == 1 and cfg.overlap_optimizer:
        _log(rank, "--overlap-optimizer has no effect in a single process: there is no allreduce to overlap")
    return Run(
        cfg,
        out,
        rank,
        world,
        joined,
        train_data,
        val_data,
        plan,
        total_steps,
        core,
        model,
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        sync,
        step,
        resumed_from,
    )


def train_one_epoch(run: Run, tally: Tally, stop: StopRequest) -> Iterator[tuple[dict, bool, bool]]:
    """The steps from ``run.step`` to the end of its epoch (or of training), each yielding (its
    metrics record, whether it ended the epoch, whether a rank was asked to stop). The epoch's
    last record carries the held-out metrics. On a stop the caller saves and ends the run."""
    steps_per_epoch = run.plan.steps_per_epoch
    epoch, in_epoch = divmod(run.step, steps_per_epoch)
    batches = epoch_batches(run.train_data, run.plan, epoch, in_epoch, run.cfg.workers)
    end = min((epoch + 1) * steps_per_epoch, run.total_steps)
    while run.step < end:
        before, started = dict(tally.timings), time.perf_counter()
        result = train_step(run.model, run.optimizer, run.criterion, batches, run.cfg, tally.timings, run.sync)
        seconds = time.perf_counter() - started
        loss, stopping = _mean_over_ranks(result.loss, stop.signum is not None, run.world)
        tally.skipped_images += result.skipped_images
        tally.skipped_steps += not result.finite
        tally.overlapped_buckets += result.overlapped_buckets
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used
        run.scheduler.step()  # the schedule follows iterations, taken or skipped
        run.step += 1
        record = {
            "step": run.step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "images_per_second": round(run.cfg.global_batch / seconds, 2),
            **{f"{k}_seconds": round(tally.timings[k] - before[k], 5) for k in PHASES},
            "skipped_steps": tally.skipped_steps,
            "skipped_images": tally.skipped_images,
        }
        end_of_epoch = run.step == end
        if end_of_epoch:
            held_out = evaluate(run.core, run.val_data, run.cfg, run.rank, run.world)
            record.update({f"val_{k}": v for k, v in held_out.items()})
            record["phase_seconds"] = {k: round(v, 4) for k, v in tally.timings.items()}
        yield record, end_of_epoch, stopping


def finish(run: Run) -> None:
    """End the process group if this run started it: all ranks together, DDP dropped first."""
    if run.joined:
        run.model = run.core  # drops DDP
        dist.barrier()
        ild.shutdown()


def train_step(
    model, optimizer, criterion, batches, cfg: TrainConfig, timings: dict, sync: GradientSync | None
) -> StepResult:
    """One optimizer step over this rank's next ``accum_steps`` micro-batches; adds each phase's
    seconds to ``timings``."""
    loss_sum, bad = 0.0, 0
    report = None
    for j in range(cfg.accum_steps):
        t0 = time.perf_counter()
        images, y, skipped = next(batches)
        bad += skipped
        if not len(y):
            raise ValueError(f"a micro-batch of {skipped} images had none readable; check the data folder")
        x = to_input(images, cfg)
        t1 = time.perf_counter()
        reduce = sync is not None and j == cfg.accum_steps - 1  # earlier micro-batches only accumulate
        with model.no_sync() if sync is not None and not reduce else nullcontext():
            with autocast(cfg):
                loss = criterion(model(x).float(), y) / cfg.accum_steps
            t2 = time.perf_counter()
            loss.backward()
        t3 = time.perf_counter()
        # backward computes until the last bucket goes to allreduce; the rest is communication it did not hide
        if reduce:
            report = sync.report()
        handoff = min(max(report.handoff, t2), t3) if reduce else t3
        loss_sum += loss.item()
        timings["data"] += t1 - t0
        timings["forward"] += t2 - t1
        timings["backward"] += handoff - t2
        timings["allreduce"] += t3 - handoff
    t0 = time.perf_counter()
    overlapped = report is not None and report.overlapped
    if overlapped:  # each bucket was stepped after its allreduce
        finite = report.skipped_buckets == 0
    else:
        finite = not cfg.skip_nonfinite or grads_finite(
            [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        )
        if finite:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timings["optimizer"] += time.perf_counter() - t0
    return StepResult(loss_sum, finite, bad, report.stepped_buckets if overlapped else 0)


def _report(record: dict, metrics: MetricsLog | None, progress) -> None:
    """Rank 0's record to the metrics file and the progress bar."""
    if metrics:
        metrics.write(record)
    if progress:
        progress.update(1)
        progress.set_postfix(
            loss=f"{record['loss']:.3f}",
            lr=f"{record['lr']:.3g}",
            **({"val_top1": f"{record['val_top1']:.1f}"} if "val_top1" in record else {}),
        )


def _mean_over_ranks(loss: float, stop: bool, world: int) -> tuple[float, bool]:
    """The step's loss averaged over all ranks (what the metrics log), and whether any rank was asked to
    stop (so ranks stop together, at the same step); one allreduce."""
    if world == 1:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64)
    dist.all_reduce(t)
    return t[0].item() / world, t[1].item() > 0


def _state(cfg: TrainConfig, step: int, model: nn.Module, optimizer, scheduler) -> dict:
    return {
        "step": step,
        "config": dataclasses.asdict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }


def _restore(state: dict, cfg: TrainConfig, model, optimizer, scheduler) -> int:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"]


def _prepare_out_dir(out: Path) -> None:
    """Create ``out`` if needed and make sure files can be written there, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a folder; pick a folder with --out-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise ValueError(
            f"out_dir {out} is not writable ({exc.strerror or exc}); pick a writable folder with --out-dir"
        ) from None


def _progress(rank: int, total: int, done: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[ipex-lars] {message}", flush=True)
