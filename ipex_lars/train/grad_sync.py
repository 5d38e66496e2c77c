"""DDP's gradient allreduce as a communication hook: timed, and optionally followed by LARS.

Without overlap the hook does what DDP does by default (average each bucket with one
allreduce) and notes when the last bucket was handed over, so the engine can split
the backward pass into compute and the allreduce time it did not hide.

With an optimizer the hook also runs LARS on a bucket's parameters as soon as that
bucket's allreduce completes, while backward still computes the earlier layers'
gradients. DDP buckets hold whole parameters, so each layer's trust ratio sees its
whole averaged gradient and the weights equal those of a separate step. The updates
run on one optimizer thread, in bucket order: not on the communication library's
thread (oneccl completes every allreduce on one thread, which would then wait for
LARS before starting the next bucket), and never two at once (gloo completes
allreduces from several threads).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every value of every gradient is finite (one fused norm pass, one host sync)."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())) if grads else True


@dataclass(frozen=True)
class SyncReport:
    """What the hook saw during one optimizer step's reducing backward pass."""

    handoff: float  # perf_counter() when the last bucket went to allreduce
    skipped_buckets: int  # buckets whose gradients were not finite, left unstepped (overlap only)
    stepped_buckets: int  # buckets the optimizer updated as their allreduce completed (overlap only)
    overlapped: bool  # each bucket was stepped as its allreduce completed: no optimizer.step() to do


class GradientSync:
    """The allreduce hook of one DDP model; ``report()`` after each reducing backward says what it did."""

    def __init__(self, model: nn.parallel.DistributedDataParallel, optimizer=None, skip_nonfinite: bool = True):
        if optimizer is not None and not model.gradient_as_bucket_view:
            raise ValueError(
                "stepping buckets needs DDP(..., gradient_as_bucket_view=True): only then are the "
                "parameters' .grad the averaged bucket values when the allreduce completes"
            )
        self.group = model.process_group
        self.world = self.group.size()
        self.optimizer = optimizer  # set: step each bucket's parameters after its allreduce
        self.skip_nonfinite = skip_nonfinite
        self._handoff = 0.0
        self._skipped = self._stepped = 0  # since the last report
        if optimizer is not None:
            self._work: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._step_buckets, name="ipex-lars-bucket-optimizer", daemon=True).start()
        model.register_comm_hook(None, self._hook)

    def report(self) -> SyncReport:
        """This step's figures, once backward has returned (DDP has then waited for every bucket);
        the counts start again from zero for the next step."""
        done = SyncReport(self._handoff, self._skipped, self._stepped, self.optimizer is not None)
        self._skipped = self._stepped = 0
        return done

    def _hook(self, _state, bucket):  # unannotated: DDP rejects string annotations of a hook
        buffer = bucket.buffer()
        buffer.div_(self.world)
        future = dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
        self._handoff = time.perf_counter()
        if self.optimizer is None:
            return future.then(lambda done: done.value()[0])
        stepped: torch.futures.Future = torch.futures.Future()
        item = (bucket.parameters(), bucket.gradients(), buffer, stepped)
        future.add_done_callback(lambda done: self._work.put((done, *item)))
        return stepped

    def _step_buckets(self) -> None:
        """The optimizer thread: steps each reduced bucket, then tells DDP the bucket is done."""
        while True:
            done, params, grads, buffer, stepped = self._work.get()
            try:
                done.value()  # raises if the allreduce failed
                if self.skip_nonfinite and not grads_finite(grads):
                    self._skipped += 1
                else:
                    self.optimizer.step_params(params)
                    self._stepped += 1
            except Exception as exc:  # handed to DDP, which raises it in backward()
                stepped.set_exception(exc)
            else:
                stepped.set_result(buffer)
