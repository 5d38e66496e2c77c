"""The parts a training run is built from: the process group, the model with its optimizer,
and how the model runs (compiled, under DDP). ``ipex-lars bench train`` builds its runs from them too."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import ipex_lars.distributed as ild
from ipex_lars.models import create_model
from ipex_lars.optim import LARS, lars_param_groups
from ipex_lars.train.config import TrainConfig
from ipex_lars.train.grad_sync import GradientSync


def init_distributed(cfg: TrainConfig) -> tuple[int, int, bool]:
    """Join the job the launcher (torchrun, mpiexec, srun, lars-run) started, on the backend
    ``cfg.dist_backend`` names (auto: chosen by transport, see ``ipex_lars.distributed``).

    Returns (rank, world size, whether this call started the process group)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if ild.env.detect().world_size == 1:
        return 0, 1, False
    ild.init(backend=cfg.dist_backend)
    return dist.get_rank(), dist.get_world_size(), True


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """LARS (or SGD, the large-batch baseline) with BN and bias excluded from decay."""
    groups = lars_param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            [{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=cfg.lr, momentum=cfg.momentum
        )
    return LARS(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        trust_coefficient=cfg.trust_coefficient,
        eps=cfg.lars_eps,
        momentum_style=cfg.momentum_style,
        impl=cfg.impl,
    )


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model in its memory format with its optimizer, both through ipex.optimize for execution ipex."""
    model = create_model(cfg.model, num_classes, in_channels=in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    if cfg.execution == "ipex":
        model, optimizer = _ipex_optimize(model, optimizer, cfg)
    return model, optimizer


def wrap_model(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, world: int
) -> tuple[nn.Module, GradientSync | None]:
    """How the model runs: compiled for execution compile, and under DDP when there are several ranks."""
    if cfg.execution == "compile":
        model = torch.compile(model)
    if world == 1:
        return model, None
    # gradients live in DDP's buckets, where the optimizer reads the averaged values in place. BN running
    # statistics stay each rank's own (no broadcast from rank 0 before every forward): they are averaged
    # across ranks before each evaluation and checkpoint instead, which counts every rank's batches.
    model = nn.parallel.DistributedDataParallel(
        model, gradient_as_bucket_view=True, bucket_cap_mb=cfg.bucket_cap_mb, broadcast_buffers=False
    )
    return model, GradientSync(model, optimizer if cfg.overlap_optimizer else None, cfg.skip_nonfinite)


def _ipex_optimize(model: nn.Module, optimizer, cfg: TrainConfig):
    """IPEX's graph and weight-layout optimisations (and, for bf16, its fp32 master weights)."""
    try:
        import intel_extension_for_pytorch as ipex
    except ImportError:
        raise ValueError(
            "execution ipex needs Intel Extension for PyTorch: use the ipex stack "
            "(env/setup.sh ipex, .venv-ipex) or --execution native"
        ) from None
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    return ipex.optimize(model, optimizer=optimizer, dtype=dtype)
