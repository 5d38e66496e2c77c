"""The ``fused`` LARS implementation: one C++ call per param group (csrc/lars_fused.cpp).

Built for the CPU's best vector ISA, or the one ``IPEX_LARS_ISA`` names (see ``ext.kernel_isa``).
"""

from __future__ import annotations

from types import ModuleType

import torch

from ipex_lars import ext

SPEC = ext.ExtensionSpec(name="_ipex_lars_fused_lars", sources=("lars_fused.cpp",))


def load() -> ModuleType:
    """The compiled kernel module; raises ExtensionBuildError with the fix when it cannot load."""
    return ext.load(SPEC)


def lars_fused(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    low_params: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    momentum_style: str,
    clip: bool,
    adapt: bool,
) -> None:
    """Step fp32 ``weights`` and momentum in place; ``low_params[i]`` (bf16, or an empty tensor) gets
    the rounded weights (``low_params`` empty: none has one). Validates everything before writing anything."""
    load().lars_step(
        weights,
        grads,
        momentum_buffers,
        low_params,
        lr,
        momentum,
        weight_decay,
        trust_coefficient,
        eps,
        nesterov,
        momentum_style == "paper",
        clip,
        adapt,
    )
