"""The ``foreach`` LARS step: torch's multi-tensor ``_foreach_*`` ops, no host sync.

Works on any device torch supports; the fallback when the fused kernel cannot load.
"""

from __future__ import annotations

import torch


def step_group(ws: list[torch.Tensor], gs: list[torch.Tensor], vs: list[torch.Tensor], group: dict) -> None:
    """Update fp32 weights ``ws`` and momentum ``vs`` in place from gradients ``gs``."""
    m, wd, lr = group["momentum"], group["weight_decay"], group["lr"]
    if group["lars"]:
        w_norm = torch.stack(torch._foreach_norm(ws))
        g_norm = torch.stack(torch._foreach_norm(gs))
        tau = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
        tau = torch.where((w_norm > 0) & (g_norm > 0), tau, torch.ones_like(tau))
        rate = tau.clamp(max=lr) if group["clip"] else tau * lr
        rates = list(rate.unbind(0))
    else:
        rates = None
    d = torch._foreach_add(gs, ws, alpha=wd) if wd else list(gs)
    paper = group["momentum_style"] == "paper"
    u = (torch._foreach_mul(d, rates) if rates else torch._foreach_mul(d, lr)) if paper else d
    torch._foreach_mul_(vs, m)
    torch._foreach_add_(vs, u)
    step = torch._foreach_add(u, vs, alpha=m) if group["nesterov"] else vs
    if paper:
        torch._foreach_sub_(ws, step)
    elif rates:
        torch._foreach_sub_(ws, torch._foreach_mul(step, rates))
    else:
        torch._foreach_add_(ws, step, alpha=-lr)
