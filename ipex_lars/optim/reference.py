"""The ``reference`` LARS implementation: one tensor at a time, plain torch, straight from the formula.

The readable ground truth the other implementations are compared with (the tests also
check all of them against a float64 step). Algorithm 1 of You, Gitman, Ginsburg
(arXiv 1708.03888), as used in "ImageNet Training in Minutes":

    tau = eta * ||w|| / (||g|| + beta * ||w|| + eps)   (tau = 1 if ||w|| = 0 or ||g|| = 0)
    paper style:  v <- m v + lr tau (g + beta w);   w <- w - v
    sgd style:    v <- m v + (g + beta w);          w <- w - lr tau v
"""

from __future__ import annotations

import torch


def trust_ratio(
    w: torch.Tensor, g: torch.Tensor, *, weight_decay: float, trust_coefficient: float, eps: float
) -> float:
    """LARS's per-layer trust ratio tau (1 when either norm is zero)."""
    w_norm = torch.linalg.vector_norm(w).item()
    g_norm = torch.linalg.vector_norm(g).item()
    if w_norm == 0.0 or g_norm == 0.0:
        return 1.0
    return trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)


def lars_reference(
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
    m, wd = momentum, weight_decay
    for w, g, v, low in zip(weights, grads, momentum_buffers, low_params):
        g = g.float()
        rate = lr
        if adapt:
            tau = trust_ratio(w, g, weight_decay=wd, trust_coefficient=trust_coefficient, eps=eps)
            rate = min(tau, lr) if clip else lr * tau  # LARC's clip: min(tau, lr)
        d = g + wd * w
        if momentum_style == "paper":
            v.mul_(m).add_(d, alpha=rate)
            w.sub_(v * m + d * rate if nesterov else v)
        else:
            v.mul_(m).add_(d)
            w.sub_(v * m + d if nesterov else v, alpha=rate)
        if low is not None:
            low.copy_(w)
