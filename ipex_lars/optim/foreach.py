"""The ``foreach`` LARS implementation: torch's multi-tensor ``_foreach_*`` ops, no host sync.

Works on any device torch supports; the fallback when the fused kernel cannot load.
"""

from __future__ import annotations

import torch


def lars_foreach(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    low_params: list[torch.Tensor | None],
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
    """Step fp32 ``weights`` and momentum in place; ``low_params[i]`` (bf16 or None) gets the rounded weights."""
    ws, vs, m, wd = weights, momentum_buffers, momentum, weight_decay
    gs = [g.float() for g in grads]
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(ws))
        g_norm = torch.stack(torch._foreach_norm(gs))
        tau = trust_coefficient * w_norm / (g_norm + wd * w_norm + eps)
        tau = torch.where((w_norm > 0) & (g_norm > 0), tau, torch.ones_like(tau))
        rate = tau.clamp(max=lr) if clip else tau * lr
        rates = list(rate.unbind(0))
    else:
        rates = None
    d = torch._foreach_add(gs, ws, alpha=wd) if wd else list(gs)
    paper = momentum_style == "paper"
    u = (torch._foreach_mul(d, rates) if rates else torch._foreach_mul(d, lr)) if paper else d
    torch._foreach_mul_(vs, m)
    torch._foreach_add_(vs, u)
    step = torch._foreach_add(u, vs, alpha=m) if nesterov else vs
    if paper:
        torch._foreach_sub_(ws, step)
    elif rates:
        torch._foreach_sub_(ws, torch._foreach_mul(step, rates))
    else:
        torch._foreach_add_(ws, step, alpha=-lr)
    for low, w in zip(low_params, ws):
        if low is not None:
            low.copy_(w)
