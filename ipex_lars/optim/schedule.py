"""Learning-rate schedules of large-batch training.

``WarmupPolyLR`` is the schedule of "ImageNet Training in Minutes" and of
MLPerf's LARS ResNet-50: a linear warmup (Goyal et al.) that keeps the large
initial rate from diverging, then polynomial decay to ``end_lr``.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupPolyLR(LRScheduler):
    """Per-iteration schedule: linear warmup to the base lr, then polynomial decay.

    At step t (``scheduler.step()`` once per iteration):
    - t < warmup_steps: warmup_start_lr + (base_lr - warmup_start_lr) * t / warmup_steps
    - after: end_lr + (base_lr - end_lr) * (1 - (t - warmup_steps) / (total_steps - warmup_steps)) ** power,
      held at end_lr once t >= total_steps.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        power: float = 2.0,
        end_lr: float = 0.0,
        warmup_start_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must be greater than warmup_steps ({warmup_steps})")
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        if end_lr < 0 or warmup_start_lr < 0:
            raise ValueError("end_lr and warmup_start_lr must be >= 0")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.power, self.end_lr, self.warmup_start_lr = power, end_lr, warmup_start_lr
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, t: int) -> float:
        """The learning rate at iteration ``t`` for a group whose base lr is ``base_lr``."""
        if t < self.warmup_steps:
            return self.warmup_start_lr + (base_lr - self.warmup_start_lr) * t / self.warmup_steps
        progress = min(1.0, (t - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.end_lr + (base_lr - self.end_lr) * (1.0 - progress) ** self.power

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
