"""The ``reference`` LARS step: one parameter at a time, plain torch, straight from the formula.

This is the ground truth the other implementations are tested against, so it
favours readability over speed (it syncs with the host once per tensor).
Algorithm 1 of You, Gitman, Ginsburg (arXiv 1708.03888), as used in
"ImageNet Training in Minutes":

    tau = eta * ||w|| / (||g|| + beta * ||w|| + eps)   (tau = 1 if ||w|| = 0 or ||g|| = 0)
    paper style:  v <- m v + lr tau (g + beta w);   w <- w - v
    sgd style:    v <- m v + (g + beta w);          w <- w - lr tau v
"""

from __future__ import annotations

import torch


def trust_ratio(w: torch.Tensor, g: torch.Tensor, group: dict) -> float:
    """LARS's per-layer trust ratio tau; 1 for groups excluded from adaptation."""
    if not group["lars"]:
        return 1.0
    w_norm = torch.linalg.vector_norm(w).item()
    g_norm = torch.linalg.vector_norm(g).item()
    if w_norm == 0.0 or g_norm == 0.0:
        return 1.0
    return group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])


def local_rate(tau: float, group: dict) -> float:
    """The per-layer learning rate: lr*tau, or min(tau, lr) with LARC clipping (adapted groups only)."""
    if group["clip"] and group["lars"]:
        return min(tau, group["lr"])
    return group["lr"] * tau


def step_param(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, group: dict) -> None:
    """Update fp32 weights ``w`` and momentum ``v`` in place from gradient ``g``."""
    m, wd = group["momentum"], group["weight_decay"]
    rate = local_rate(trust_ratio(w, g, group), group)
    d = g + wd * w
    if group["momentum_style"] == "paper":
        v.mul_(m).add_(d, alpha=rate)
        w.sub_(v * m + d * rate if group["nesterov"] else v)
    else:
        v.mul_(m).add_(d)
        w.sub_(v * m + d if group["nesterov"] else v, alpha=rate)
