"""Held-out evaluation shared by the ranks of a job, on one set of BN statistics.

- Each rank evaluates one contiguous share of the validation set, samples
  ``[r*n//W, (r+1)*n//W)``: every sample is counted exactly once whatever ``n`` and
  ``W``, with no padding repeats (which a ``DistributedSampler`` would add and count).
- Counts and loss sums are summed across ranks in float64, so every rank returns the
  metrics of the whole set.
- BN running statistics first become the same on every rank (``average_buffers``):
  each rank's reflect only the batches it saw, so without this each rank would score a
  slightly different model, and the checkpoint, written by rank 0, would keep rank 0's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ipex_lars.data import eval_batches
from ipex_lars.train.config import TrainConfig
from ipex_lars.train.precision import autocast, to_input


def share(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` samples; the shares of all ranks partition ``range(n)``."""
    return range(rank * n // world, (rank + 1) * n // world)


@torch.no_grad()
def average_buffers(model: nn.Module, world: int) -> None:
    """Make every floating-point buffer (BN running mean and variance) the mean of its value on all ranks.

    One allreduce over all buffers, summed in float64 so the result does not depend on the order the
    ranks' values are added in. Integer buffers (BN's batch counters) are equal on every rank and left.
    """
    if world == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, rank: int = 0, world: int = 1) -> dict:
    """Top-1 and top-5 accuracy (percent) and mean loss over the readable images of all of ``data``, how many
    those were and how many were not; with several ranks, every rank must call it and gets the same result."""
    average_buffers(model, world)
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # top-1 hits, top-5 hits, loss sum, images, unreadable
    for images, y, bad in eval_batches(data, workers=cfg.workers, part=share(len(data), rank, world)):
        totals[4] += bad
        if not len(y):
            continue
        with autocast(cfg):
            logits = model(to_input(images, cfg)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += (top[:, 0] == y).sum().item()
        totals[1] += (top == y[:, None]).any(dim=1).sum().item()
        totals[2] += nn.functional.cross_entropy(logits, y, reduction="none").double().sum().item()
        totals[3] += len(y)
    model.train()
    if world > 1:
        dist.all_reduce(totals)
    correct1, correct5, loss, n, unreadable = totals.tolist()
    return {
        "top1": 100.0 * correct1 / max(n, 1),
        "top5": 100.0 * correct5 / max(n, 1),
        "loss": loss / max(n, 1),
        "images": int(n),
        "skipped_images": int(unreadable),
    }
