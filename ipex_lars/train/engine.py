"""The training loop: data, model, LARS, schedule, checkpoints. Read it top to bottom.

One optimizer step = ``accum_steps`` micro-batches on each of ``world_size`` ranks,
``global_batch`` images in all. The sample order comes from ``BatchPlan`` (seed,
epoch, step), so resuming from a checkpoint continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ipex_lars.distributed as ild
from ipex_lars.data import BatchPlan, build_datasets, epoch_batches, write_skipped
from ipex_lars.models import create_model
from ipex_lars.optim import LARS, WarmupPolyLR, lars_param_groups
from ipex_lars.train import checkpoint, precision, resume
from ipex_lars.train.config import TrainConfig
from ipex_lars.train.evaluate import average_buffers, evaluate
from ipex_lars.train.grad_sync import GradientSync, grads_finite
from ipex_lars.train.metrics import PHASES, MetricsLog
from ipex_lars.train.precision import autocast, to_input


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; a checkpoint of the last completed step was saved."""


class _StopRequest:
    """The first Ctrl-C or SIGTERM asks to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> _StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print("\n[ipex-lars] stopping after this step to save a checkpoint (Ctrl-C again to abort)", flush=True)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """LARS (or SGD, the large-batch baseline) with BN and bias excluded from decay."""
    groups = lars_param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "lars"} for g in groups],
                               lr=cfg.lr, momentum=cfg.momentum)
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient,
                momentum_style=cfg.momentum_style, impl=cfg.impl)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model in its memory format with its optimizer, both through ipex.optimize for backend ipex."""
    model = create_model(cfg.model, num_classes, in_channels=in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    if cfg.backend == "ipex":
        model, optimizer = _ipex_optimize(model, optimizer, cfg)
    return model, optimizer


def wrap_model(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               world: int) -> tuple[nn.Module, GradientSync | None]:
    """How the model runs: compiled for backend compile, and under DDP when there are several ranks."""
    if cfg.backend == "compile":
        model = torch.compile(model)
    if world == 1:
        return model, None
    # gradients live in DDP's buckets, where the optimizer reads the averaged values in place. BN running
    # statistics stay each rank's own (no broadcast from rank 0 before every forward): they are averaged
    # across ranks before each evaluation and checkpoint instead, which counts every rank's batches.
    model = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=cfg.bucket_cap_mb,
                                                broadcast_buffers=False)
    return model, GradientSync(model, optimizer if cfg.overlap_optimizer else None, cfg.skip_nonfinite)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training ``cfg`` describes; return the final metrics."""
    cfg, precision_note = precision.choose(cfg)
    out = Path(cfg.out_dir)
    _prepare_out_dir(out)
    rank, world, joined = init_distributed(cfg)
    _log(rank, precision_note)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_data, val_data = build_datasets(cfg.data, seed=cfg.seed, num_samples=cfg.num_samples,
                                          image_size=cfg.image_size, num_classes=cfg.num_classes,
                                          data_dir=cfg.data_dir, max_pixels=cfg.max_image_pixels)
    plan = BatchPlan(len(train_data), cfg.global_batch, cfg.accum_steps, rank, world, cfg.seed)
    steps_per_epoch = plan.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    in_channels = train_data.images.shape[1] if hasattr(train_data, "images") else 3
    model, optimizer = build_model(cfg, train_data.num_classes, in_channels)
    schedule_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), schedule_steps - 1)
    scheduler = WarmupPolyLR(optimizer, warmup_steps=warmup_steps, total_steps=schedule_steps,
                             power=cfg.poly_power, end_lr=cfg.end_lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    if rank == 0 and (removed := checkpoint.remove_interrupted(out))[0]:
        files, freed = removed
        _log(rank, f"removed {files} temp file(s) of interrupted checkpoint saves from {out}, freeing {freed} bytes"
                   + (f" ({checkpoint.human_size(freed)})" if freed >= 1000 else ""))
    step, resume_from = 0, None
    if resumed := resume.agree(cfg, out, rank, world):
        resume_from, state = resumed
        step = _restore(state, cfg, model, optimizer, scheduler)
        del resumed, state  # free the checkpoint's copy of the weights
        _log(rank, f"resumed from {resume_from} at step {step}")
    saved_step, saved_path = step, resume_from

    core = model  # what checkpoints save; the wrappers only change how it runs
    model, sync = wrap_model(model, optimizer, cfg, world)
    if world == 1 and cfg.overlap_optimizer:
        _log(rank, "--overlap-optimizer has no effect in a single process: there is no allreduce to overlap")

    def save_checkpoint() -> Path | None:
        """Every rank calls it: BN statistics are averaged across ranks, then rank 0 writes this step's
        checkpoint, once however often asked; returns its path (None on the other ranks)."""
        nonlocal saved_step, saved_path
        if saved_step != step:
            average_buffers(core, world)
            if rank == 0:
                saved_path = checkpoint.save(out, step, _state(cfg, step, core, optimizer, scheduler),
                                             cfg.keep_checkpoints)
            saved_step = step
        return saved_path

    metrics = MetricsLog(out, resumed_at=step) if rank == 0 else None  # a fresh run drops a crashed run's lines
    timings = dict.fromkeys(PHASES, 0.0)
    skipped = bad_images = 0
    batches = None
    progress = _progress(rank, total_steps, step) if cfg.progress else None
    result: dict = {}
    try:
        with _StopRequest() as stop:
            while step < total_steps:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                if batches is None or in_epoch == 0:
                    batches = epoch_batches(train_data, plan, epoch, in_epoch, cfg.workers)
                before, started = dict(timings), time.perf_counter()
                loss_sum, finite, bad = train_step(model, optimizer, criterion, batches, cfg, timings, sync)
                seconds = time.perf_counter() - started
                loss_sum, stopping = _mean_over_ranks(loss_sum, stop.signum is not None, world)
                bad_images += bad
                skipped += not finite
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                scheduler.step()  # the schedule follows iterations, taken or skipped
                step += 1
                record = {"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr,
                          "images_per_second": round(cfg.global_batch / seconds, 2),
                          **{f"{k}_seconds": round(timings[k] - before[k], 5) for k in PHASES},
                          "skipped_steps": skipped, "skipped_images": bad_images}
                end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
                if end_of_epoch:
                    record.update({f"val_{k}": v for k, v in evaluate(core, val_data, cfg, rank, world).items()})
                    record["phase_seconds"] = {k: round(v, 4) for k, v in timings.items()}
                if metrics:
                    metrics.write(record)
                if progress:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{record['lr']:.3g}",
                                         **({"val_top1": f"{record['val_top1']:.1f}"} if end_of_epoch else {}))
                if ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                        or (not cfg.checkpoint_every and end_of_epoch)):
                    save_checkpoint()
                result = record
                if stopping:
                    path = save_checkpoint()
                    _log(rank, f"stopped at step {step}: saved {path}; continue with --resume auto")
                    raise Interrupted(f"signal {stop.signum or 'on another rank'}")
    finally:
        if progress:
            progress.close()
        if metrics:
            metrics.close()
        if skip_log := write_skipped(out, train_data, val_data, rank=rank):
            _log(rank, f"unreadable images skipped so far are named in {skip_log}")
    save_checkpoint()
    if "val_top1" not in result:
        result["val_top1"] = evaluate(core, val_data, cfg, rank, world)["top1"]
    if joined:  # we started the process group, so we end it: all ranks together, DDP dropped first
        del model
        dist.barrier()
        ild.shutdown()
    result.update({"rank": rank, "world_size": world, "skipped_steps": skipped, "skipped_images": bad_images,
                   "steps": step, "phase_seconds": timings,
                   "optimizer_impl": getattr(optimizer, "impl", "torch.optim.SGD"),
                   "overlapped_bucket_steps": sync.stepped_buckets if sync else 0})
    return result


def train_step(model, optimizer, criterion, batches, cfg: TrainConfig, timings: dict,
               sync: GradientSync | None) -> tuple[float, bool, int]:
    """One optimizer step over this rank's next ``accum_steps`` micro-batches; adds each phase's seconds to
    ``timings``.

    Returns (loss, gradients finite, unreadable images skipped).
    """
    loss_sum, bad = 0.0, 0
    for j in range(cfg.accum_steps):
        t0 = time.perf_counter()
        images, y, skipped = next(batches)
        bad += skipped
        if not len(y):
            raise ValueError(f"a micro-batch of {skipped} images had none readable; check the data folder")
        x = to_input(images, cfg)
        t1 = time.perf_counter()
        reduce = sync is not None and j == cfg.accum_steps - 1  # earlier micro-batches only accumulate
        with (model.no_sync() if sync is not None and not reduce else nullcontext()):
            with autocast(cfg):
                loss = criterion(model(x).float(), y) / cfg.accum_steps
            t2 = time.perf_counter()
            loss.backward()
        t3 = time.perf_counter()
        # backward computes until the last bucket goes to allreduce; the rest is communication it did not hide
        handoff = min(max(sync.last_handoff, t2), t3) if reduce else t3
        loss_sum += loss.item()
        timings["data"] += t1 - t0
        timings["forward"] += t2 - t1
        timings["backward"] += handoff - t2
        timings["allreduce"] += t3 - handoff
    t0 = time.perf_counter()
    if sync is not None and sync.optimizer is not None:  # each bucket was stepped after its allreduce
        finite = sync.skipped_buckets == 0
        sync.skipped_buckets = 0
    else:
        finite = not cfg.skip_nonfinite or grads_finite(
            [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
        if finite:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timings["optimizer"] += time.perf_counter() - t0
    return loss_sum, finite, bad


def _ipex_optimize(model: nn.Module, optimizer, cfg: TrainConfig):
    """IPEX's graph and weight-layout optimisations (and, for bf16, its fp32 master weights)."""
    try:
        import intel_extension_for_pytorch as ipex
    except ImportError:
        raise ValueError("backend ipex needs Intel Extension for PyTorch: use the ipex stack "
                         "(env/setup.sh ipex, .venv-ipex) or --backend native") from None
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    return ipex.optimize(model, optimizer=optimizer, dtype=dtype)


def _mean_over_ranks(loss: float, stop: bool, world: int) -> tuple[float, bool]:
    """The step's loss averaged over all ranks (what the metrics log), and whether any rank was asked to
    stop (so ranks stop together, at the same step); one allreduce."""
    if world == 1:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64)
    dist.all_reduce(t)
    return t[0].item() / world, t[1].item() > 0


def _state(cfg: TrainConfig, step: int, model: nn.Module, optimizer, scheduler) -> dict:
    return {"step": step, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}


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
        raise ValueError(f"out_dir {out} is not writable ({exc.strerror or exc}); pick a writable folder with "
                         "--out-dir") from None


def init_distributed(cfg: TrainConfig) -> tuple[int, int, bool]:
    """Join the job the launcher (torchrun, mpiexec, srun, lars-run) started, on oneCCL when it can.

    Returns (rank, world size, whether this call started the process group)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if ild.env.detect().world_size == 1:
        return 0, 1, False
    ild.init(backend=cfg.dist_backend)
    return dist.get_rank(), dist.get_world_size(), True


def _progress(rank: int, total: int, done: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[ipex-lars] {message}", flush=True)
