"""One training run of the large-batch study: a deep MLP on mnist5k, SGD or LARS, fixed epochs.

Kept apart from the training engine on purpose: the study runs hundreds of short runs, so
each is a plain in-memory loop (one thread, no checkpoints) that stops as soon as the loss
stops being finite, and records that as a divergence.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ipex_lars.data.loader import TensorData
from ipex_lars.optim import LARS, WarmupPolyLR, lars_param_groups

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4  # on weights only: BN and bias are excluded from decay (and from LARS's adaptation)
POLY_POWER = 2.0


class DeepMLP(nn.Module):
    """``depth`` hidden layers of ``width`` ReLU units, with or without BatchNorm after each linear.

    He-initialised, biases zero. Without BN nothing rescales the activations between layers,
    which is the setting of the LARS paper's AlexNet-without-BN argument.
    """

    def __init__(self, in_features: int, num_classes: int, width: int, depth: int, norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers.append(nn.Linear(in_features if i == 0 else width, width, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class RunSpec:
    """What one run trains: optimizer, peak lr, global batch, epochs, warmup, seed, network."""

    optimizer: str  # "sgd" (torch.optim.SGD) or "lars" (ipex_lars.optim.LARS)
    lr: float
    batch: int
    epochs: int
    warmup_epochs: float
    seed: int
    norm: bool
    width: int = 128
    depth: int = 8


@dataclass
class RunResult:
    spec: RunSpec
    val_top1: float
    test_top1: float
    diverged: bool  # the training loss became non-finite (the run stopped there)
    final_loss: float  # mean training loss over the last epoch run
    steps: int
    cpu_seconds: float  # CPU time of the run (its process's), to size the study on an idle machine

    def to_dict(self) -> dict:
        return {
            **asdict(self.spec),
            "val_top1": self.val_top1,
            "test_top1": self.test_top1,
            "diverged": self.diverged,
            "final_loss": self.final_loss,
            "steps": self.steps,
            "cpu_seconds": self.cpu_seconds,
        }


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    groups = lars_param_groups(model, WEIGHT_DECAY)  # the same decay split for both optimizers
    if spec.optimizer == "lars":
        return LARS(groups, lr=spec.lr, momentum=MOMENTUM)
    if spec.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=spec.lr, momentum=MOMENTUM)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


@torch.no_grad()
def _top1(model: nn.Module, data: TensorData) -> float:
    model.eval()
    logits = torch.nan_to_num(model(data.images), nan=0.0)  # a diverged net still gets its (chance) score
    return 100.0 * (logits.argmax(1) == data.labels).float().mean().item()


def train_one(spec: RunSpec, train: TensorData, val: TensorData, test: TensorData) -> RunResult:
    """Train ``spec`` on ``train`` (dropping the last partial batch of each epoch) and score the
    final weights on ``val`` and ``test``."""
    started = time.process_time()
    torch.manual_seed(spec.seed)
    model = DeepMLP(train.images[0].numel(), train.num_classes, spec.width, spec.depth, spec.norm)
    optimizer = _optimizer(spec, model)
    steps_per_epoch = len(train) // spec.batch
    total = steps_per_epoch * spec.epochs
    warmup = min(round(spec.warmup_epochs * steps_per_epoch), total - 1)
    schedule = WarmupPolyLR(optimizer, warmup_steps=warmup, total_steps=total, power=POLY_POWER)
    loss_fn = nn.CrossEntropyLoss()
    order_gen = torch.Generator().manual_seed(spec.seed)
    diverged, steps, epoch_loss = False, 0, math.nan
    for _ in range(spec.epochs):
        model.train()
        order = torch.randperm(len(train), generator=order_gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * spec.batch : (s + 1) * spec.batch]
            loss = loss_fn(model(train.images[idx]), train.labels[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            losses.append(loss.item())
        if diverged:
            break
        epoch_loss = sum(losses) / len(losses)
    val_top1, test_top1 = _top1(model, val), _top1(model, test)
    return RunResult(spec, val_top1, test_top1, diverged, epoch_loss, steps, time.process_time() - started)
