"""Which samples each rank sees at each step, derived from (seed, epoch, step) alone.

Deriving the order instead of keeping iterator state makes resume exact (a
checkpoint stores only epoch and step) and makes data parallelism equal to
gradient accumulation: global batch k of an epoch is cut into world x accum
micro-batches, and rank r takes micro-batches r*accum ... r*accum+accum-1. One
rank accumulating over W*A micro-batches sees exactly the batches (BN
statistics included) that W ranks see.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ipex_lars.data.folder import collate_skipping_bad, limit_worker_threads


@dataclass
class TensorData:
    """An in-memory dataset: images (N, C, H, W) and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        """Input channels of the model that reads these images."""
        return self.images.shape[1]


@dataclass(frozen=True)
class BatchPlan:
    """The sample order for one rank of a data-parallel job."""

    num_samples: int
    global_batch: int
    accum_steps: int = 1
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        parts = self.world_size * self.accum_steps
        if self.global_batch % parts:
            raise ValueError(
                f"global batch {self.global_batch} does not split into {self.world_size} rank(s) x "
                f"{self.accum_steps} accumulation step(s); pick a multiple of {parts}"
            )
        if self.global_batch > self.num_samples:
            raise ValueError(
                f"global batch {self.global_batch} is larger than the {self.num_samples} training "
                "samples; lower --global-batch"
            )

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.accum_steps)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a run holds one or two plans; caching keeps them alive
    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order, the same on every rank."""
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def micro_batches(self, epoch: int, step: int) -> list[torch.Tensor]:
        """Sample indices of this rank's micro-batches for ``step`` of ``epoch``."""
        batch = self.order(epoch)[step * self.global_batch : (step + 1) * self.global_batch]
        m, first = self.micro_batch, self.rank * self.accum_steps
        return [batch[(first + j) * m : (first + j + 1) * m] for j in range(self.accum_steps)]


Batch = tuple[torch.Tensor, torch.Tensor, int]  # images, labels, unreadable images skipped


def epoch_batches(data, plan: BatchPlan, epoch: int, start_step: int, workers: int = 0) -> Iterator[Batch]:
    """This rank's micro-batches for steps ``start_step`` onwards of ``epoch``, in order.

    In-memory data is sliced directly; image folders go through a DataLoader whose
    workers decode ahead of the training loop.
    """
    steps = range(start_step, plan.steps_per_epoch)
    if isinstance(data, TensorData):
        for step in steps:
            for idx in plan.micro_batches(epoch, step):
                yield data.images[idx], data.labels[idx], 0
        return
    seed = plan.seed * 1_000_003 + epoch * 7_919
    batches = [[(i, seed + i) for i in idx.tolist()] for step in steps for idx in plan.micro_batches(epoch, step)]
    yield from _folder_loader(data, workers, seed, batch_sampler=batches)


def eval_batches(data, batch: int = 256, workers: int = 0, part: range | None = None) -> Iterator[Batch]:
    """The samples ``part`` (default: all) of ``data``, in order, for evaluation."""
    part = range(len(data)) if part is None else part
    if isinstance(data, TensorData):
        for i in range(part.start, part.stop, batch):
            end = min(i + batch, part.stop)
            yield data.images[i:end], data.labels[i:end], 0
        return
    yield from _folder_loader(data, workers, 0, batch_size=batch, sampler=part)


def _folder_loader(data, workers: int, seed: int, **batching) -> Iterator[Batch]:
    """Batches from a DataLoader over an image folder: one thread per worker, and its own generator, so
    creating it does not draw from the global RNG (dropout's), which resume relies on. Unreadable images
    are left out, counted in the batch, and recorded on ``data`` here, in the process that owns it."""
    loader = torch.utils.data.DataLoader(
        data,
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        worker_init_fn=limit_worker_threads,
        generator=torch.Generator().manual_seed(seed),
        **batching,
    )
    for images, labels, skips in loader:
        data.record_skips(skips)
        yield images, labels, len(skips)
