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
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None] | None,
    momentum_buffers: list[torch.Tensor],
    master_params: list[torch.Tensor | None] | None,
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
    """Step ``params`` (or the fp32 ``master_params[i]`` of a bf16 ``params[i]``, then rounded into
    it) and momentum in place. A parameter whose gradient is None is skipped; ``grads`` None takes
    each parameter's own ``.grad``. Validates everything before writing anything."""
    load().lars_step(
        params if type(params) is list else list(params),
        grads if grads is None or type(grads) is list else list(grads),
        momentum_buffers if type(momentum_buffers) is list else list(momentum_buffers),
        master_params if master_params is None or type(master_params) is list else list(master_params),
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
