"""Parameter groups for LARS: which parameters are adapted and decayed.

Following the paper and MLPerf, normalization-layer parameters and biases are
excluded from the trust-ratio adaptation and from weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def lars_param_groups(model: nn.Module, weight_decay: float, exclude: Sequence[str] = ("bn", "bias")) -> list[dict]:
    """Split ``model``'s trainable parameters into a LARS group and an excluded group.

    ``exclude`` names what goes to the excluded group (``lars=False``,
    ``weight_decay=0``): ``"bn"`` for the parameters of normalization layers
    (BatchNorm, GroupNorm, LayerNorm, ...), ``"bias"`` for every bias, and any
    other string for parameters whose qualified name contains it. Empty groups
    are left out; frozen parameters are not included.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    norm_params = set()
    if "bn" in exclude:
        for module in model.modules():
            if isinstance(module, _NORM_LAYERS):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    patterns = [e for e in exclude if e not in ("bn", "bias")]
    adapted: list[torch.Tensor] = []
    excluded: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (
            id(p) in norm_params
            or ("bias" in exclude and leaf == "bias")
            or any(pattern in name for pattern in patterns)
        )
        (excluded if skip else adapted).append(p)
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay, "lars": True})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars": False})
    return groups
