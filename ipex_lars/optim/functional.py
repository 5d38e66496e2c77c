"""``lars()``: one LARS step over lists of tensors, without an optimizer object.

The ``LARS`` class gathers these lists from its param groups and state at every step and
calls this function, as torch.optim's classes call ``torch.optim._functional``. It is
public so that other training frameworks can drive LARS with state they keep themselves.
Every implementation takes the same keyword-only hyperparameters:

- ``reference``: one tensor at a time, straight from the paper's formula;
- ``foreach``: torch's multi-tensor ops, any device;
- ``fused``: one C++ call (csrc/lars_fused.cpp), CPU, the fastest;
- ``auto``: ``fused`` when it loads, else ``foreach``.
"""

from __future__ import annotations

import warnings

import torch

from ipex_lars.ext import ExtensionBuildError
from ipex_lars.optim import fused
from ipex_lars.optim.foreach import lars_foreach
from ipex_lars.optim.reference import lars_reference

IMPLS = ("auto", "fused", "foreach", "reference")
STYLES = ("paper", "sgd")


def resolve_impl(impl: str) -> str:
    """The implementation ``impl`` names; ``auto`` is ``fused`` if the kernel loads, else ``foreach``."""
    if impl not in IMPLS:
        raise ValueError(f"LARS impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl in ("reference", "foreach"):
        return impl
    try:
        fused.load()
        return "fused"
    except ExtensionBuildError as exc:
        if impl == "fused":
            raise
        warnings.warn(f"LARS: the fused kernel is unavailable, using impl='foreach'. {exc}", stacklevel=3)
        return "foreach"


def scalar_lr(lr: float | torch.Tensor) -> float:
    """The learning rate as a Python float: a number, or a one-element tensor as torch's optimizers accept."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        return float(lr.item())
    return float(lr)


def _validate(params: list, grads: list, momentum_buffers: list, master_params: list) -> None:
    """What the fused kernel checks in C++, for the Python implementations: before anything is written."""
    if not len(params) == len(grads) == len(momentum_buffers) == len(master_params):
        raise ValueError("LARS: params, grads, momentum_buffers and master_params must have the same length")
    for p, g, v, master in zip(params, grads, momentum_buffers, master_params):
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError("LARS does not support sparse gradients")
        w = p if master is None else master
        if w.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError(
                f"LARS: weights and momentum must be float32 (bf16 parameters keep an fp32 master), "
                f"got {w.dtype} and {v.dtype}"
            )
        if master is not None and p.dtype != torch.bfloat16:
            raise ValueError("LARS: a parameter with an fp32 master copy must be bfloat16")
        if g.shape != p.shape:
            raise ValueError(f"LARS: gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        if v.shape != p.shape or w.shape != p.shape:
            raise ValueError(
                f"LARS state does not fit its parameter: momentum of shape {tuple(v.shape)} for a "
                f"parameter of shape {tuple(p.shape)}; load the optimizer state saved with this model"
            )


@torch.no_grad()
def lars(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None] | None,
    momentum_buffers: list[torch.Tensor],
    master_params: list[torch.Tensor | None] | None = None,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    momentum_style: str,
    clip: bool,
    adapt: bool,
    impl: str = "auto",
) -> None:
    """One LARS step over one param group's tensors, in place (the update is in the docstring of
    ``ipex_lars.optim.optimizer``).

    ``params`` are float32 or bfloat16; ``master_params[i]`` is the float32 master of a
    bfloat16 ``params[i]`` (None for a float32 parameter), which the step updates before
    rounding it into the parameter. A parameter whose gradient is None is skipped; ``grads``
    None takes each parameter's own ``.grad``. ``momentum_buffers`` are float32, shaped like the
    parameters. ``adapt=False`` turns the trust ratio off (BN and bias groups). Everything is
    checked before any tensor is written: an invalid input raises and changes nothing. Runs
    without autograd, as an optimizer step does.
    """
    lr = scalar_lr(lr)
    if momentum_style not in STYLES:
        raise ValueError(f"LARS momentum_style must be one of {', '.join(STYLES)}, got {momentum_style!r}")
    hyper = dict(
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        momentum_style=momentum_style,
        clip=clip,
        adapt=adapt,
    )
    if impl == "auto" or impl not in IMPLS:  # a named impl is used as is: no kernel probe on every step
        impl = resolve_impl(impl)
    if impl == "fused":  # the kernel checks its inputs itself, in C++
        fused.lars_fused(params, grads, momentum_buffers, master_params, **hyper)
        return
    masters = master_params if master_params is not None else [None] * len(params)
    if grads is None:
        grads = [p.grad for p in params]
    _validate(params, grads, momentum_buffers, masters)
    if any(g is None for g in grads):  # a parameter without a gradient is skipped
        kept = [i for i, g in enumerate(grads) if g is not None]
        params, grads = [params[i] for i in kept], [grads[i] for i in kept]
        momentum_buffers, masters = [momentum_buffers[i] for i in kept], [masters[i] for i in kept]
    if not params:  # torch's multi-tensor ops refuse empty lists
        return
    weights = [p if m is None else m for p, m in zip(params, masters)]
    lows = [None if m is None else p for p, m in zip(params, masters)]
    step = lars_foreach if impl == "foreach" else lars_reference
    step(weights, grads, momentum_buffers, lows, **hyper)
