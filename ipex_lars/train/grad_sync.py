"""DDP's gradient allreduce as a communication hook: timed, and optionally followed by LARS.

Without overlap the hook does what DDP does by default (average each bucket with one
allreduce) and notes when the last bucket was handed over, so the engine can split
the backward pass into compute and the allreduce time it did not hide.

With ``overlap_optimizer`` the hook also runs LARS on a bucket's parameters as soon
as that bucket's allreduce completes, while backward still computes the earlier
layers' gradients. DDP buckets hold whole parameters, so each layer's trust ratio
sees its whole averaged gradient and the weights equal those of a separate step.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every value of every gradient is finite (one fused norm pass, one host sync)."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())) if grads else True


class GradientSync:
    """The allreduce hook of one DDP model, with the state the engine reads after backward."""

    def __init__(self, model: nn.parallel.DistributedDataParallel, optimizer=None, skip_nonfinite: bool = True):
        self.world = dist.get_world_size()
        self.optimizer = optimizer  # set: step each bucket's parameters after its allreduce
        self.skip_nonfinite = skip_nonfinite
        self.last_handoff = 0.0  # perf_counter() when the last bucket went to allreduce
        self.skipped_buckets = 0  # buckets whose gradients were not finite, left unstepped
        self.stepped_buckets = 0  # buckets the optimizer updated from this hook, over the run
        model.register_comm_hook(None, self._hook)

    def _hook(self, _state, bucket):  # unannotated: DDP rejects string annotations of a hook
        buffer = bucket.buffer()
        buffer.div_(self.world)
        future = dist.all_reduce(buffer, async_op=True).get_future()
        self.last_handoff = time.perf_counter()
        if self.optimizer is None:
            return future.then(lambda done: done.value()[0])
        params = bucket.parameters()

        def step_bucket(done: torch.futures.Future) -> torch.Tensor:
            reduced = done.value()[0]
            if self.skip_nonfinite and not grads_finite(bucket.gradients()):
                self.skipped_buckets += 1
            else:
                self.optimizer.step_params(params)
                self.stepped_buckets += 1
            return reduced

        return future.then(step_bucket)
