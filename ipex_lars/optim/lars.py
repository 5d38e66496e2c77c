"""LARS: Layer-wise Adaptive Rate Scaling.

Paper: "Large Batch Training of Convolutional Networks", You, Gitman, Ginsburg
(arXiv 1708.03888), as used in "ImageNet Training in Minutes", You, Zhang,
Hsieh, Demmel, Keutzer (ICPP 2018) to train AlexNet and ResNet-50 at batch
sizes of 16K-32K. Each layer gets its own rate lr * tau, with the trust ratio

    tau = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)

(tau = 1 when ||w|| or ||g|| is zero, and for groups with ``lars=False``, which
is where BN and bias parameters go; see ``lars_param_groups``).

Two momentum shapes are in use and both are offered:

- ``momentum_style="paper"`` (Algorithm 1; MLPerf TF reference, NVIDIA):
  v <- m v + lr tau (g + wd w);  w <- w - v
- ``momentum_style="sgd"`` (IPEX, Intel's MLPerf PyTorch code):
  v <- m v + (g + wd w);         w <- w - lr tau v

``clip=True`` is LARC's clipping (NVIDIA apex): the adapted rate becomes
min(tau, lr) instead of lr * tau. ``nesterov=True`` applies Nesterov momentum to
either style.

bfloat16 parameters are updated through an fp32 master copy kept in the
optimizer state (``state[p]["master_param"]``); the momentum buffer is always
fp32 (``state[p]["momentum_buffer"]``), so state dicts load across impls.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch

from ipex_lars.ext import ExtensionBuildError
from ipex_lars.optim import foreach, fused, reference

IMPLS = ("auto", "fused", "foreach", "reference")
STYLES = ("paper", "sgd")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _resolve_impl(impl: str) -> str:
    _check(impl in IMPLS, f"LARS impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "reference" or impl == "foreach":
        return impl
    try:
        fused.load()
        return "fused"
    except ExtensionBuildError as exc:
        if impl == "fused":
            raise
        warnings.warn(f"LARS: the fused kernel is unavailable, using impl='foreach'. {exc}", stacklevel=3)
        return "foreach"


class LARS(torch.optim.Optimizer):
    """LARS with per-group ``lars`` adaptation switch; see the module docstring for the update.

    ``impl`` picks the implementation: ``"fused"`` (multi-tensor C++ kernel,
    CPU), ``"foreach"`` (torch multi-tensor ops), ``"reference"`` (per-parameter
    ground truth) or ``"auto"`` (fused if it loads, else foreach).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        momentum_style: str = "paper",
        clip: bool = False,
        impl: str = "auto",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, momentum_style=momentum_style, clip=clip, lars=True)
        self.impl = _resolve_impl(impl)
        self._fused = fused.FusedGroups() if self.impl == "fused" else None
        self._written_version: dict[torch.Tensor, int] = {}
        self._subsets: dict[tuple[int, ...], list[tuple[int, list[torch.Tensor]]]] = {}
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "impl": self.impl}

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle rebuild optimizers through here; IPEX's load_state_dict
        # also calls it on a live optimizer with only "state" and "param_groups".
        super().__setstate__(state)
        self.impl = state.get("impl") or getattr(self, "impl", "foreach")
        self._fused = fused.FusedGroups() if self.impl == "fused" else None
        self._subsets = {}
        self._record_master_versions()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._subsets = {}
        group = self.param_groups[-1]
        _check(isinstance(group["lr"], (int, float)) and group["lr"] >= 0,
               f"LARS lr must be a number >= 0, got {group['lr']!r}")
        _check(0.0 <= group["momentum"] < 1.0, f"LARS momentum must be in [0, 1), got {group['momentum']!r}")
        _check(group["weight_decay"] >= 0, f"LARS weight_decay must be >= 0, got {group['weight_decay']!r}")
        _check(group["trust_coefficient"] > 0,
               f"LARS trust_coefficient must be > 0 (the paper uses 0.001), got {group['trust_coefficient']!r}")
        _check(group["eps"] >= 0, f"LARS eps must be >= 0, got {group['eps']!r}")
        _check(group["momentum_style"] in STYLES,
               f"LARS momentum_style must be one of {', '.join(STYLES)}, got {group['momentum_style']!r}")
        _check(not group["nesterov"] or group["momentum"] > 0, "LARS nesterov=True needs momentum > 0")
        for p in group["params"]:
            _check(p.dtype in (torch.float32, torch.bfloat16),
                   f"LARS updates float32 or bfloat16 parameters (bf16 through an fp32 master copy); "
                   f"got a {p.dtype} parameter of shape {tuple(p.shape)}")

    def init_state(self, p: torch.Tensor) -> dict:
        """The state of parameter ``p``, created or repaired: fp32 momentum and, for bf16, an fp32 master."""
        state = self.state[p]
        if p.dtype == torch.bfloat16 and "master_param" not in state:
            state["master_param"] = p.detach().float()  # keeps p's layout (e.g. channels-last)
            self._written_version[p] = p._version
        elif p.dtype != torch.bfloat16 and "master_param" in state:
            del state["master_param"]  # e.g. state saved from a bf16 model, loaded into an fp32 one
            self._written_version.pop(p, None)
        if "momentum_buffer" not in state:
            weight = state.get("master_param", p)
            state["momentum_buffer"] = torch.zeros_like(weight, dtype=torch.float32,
                                                        memory_format=torch.preserve_format)
        elif state["momentum_buffer"].shape != p.shape:
            raise ValueError(f"LARS state does not fit its parameter: momentum of shape "
                             f"{tuple(state['momentum_buffer'].shape)} for a parameter of shape {tuple(p.shape)}; "
                             "load the optimizer state saved with this model")
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to each parameter's dtype; the master and momentum
        # of a bf16 parameter must stay fp32, so they bypass that cast.
        fp32_keys = ("momentum_buffer", "master_param")
        kept = {pid: {k: v for k, v in s.items() if k in fp32_keys} for pid, s in state_dict["state"].items()}
        stripped = dict(state_dict)
        stripped["state"] = {pid: {k: v for k, v in s.items() if k not in fp32_keys}
                             for pid, s in state_dict["state"].items()}
        super().load_state_dict(stripped)
        by_id = {pid: p for saved, group in zip(state_dict["param_groups"], self.param_groups)
                 for pid, p in zip(saved["params"], group["params"])}
        for pid, values in kept.items():
            p = by_id[pid]
            for key, value in values.items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            self.init_state(p)  # masters follow this model's dtypes; shapes must match
        self._record_master_versions()
        self._subsets = {}
        if self._fused is not None:
            self._fused.invalidate()

    def _record_master_versions(self) -> None:
        """Take the bf16 parameters as they are now as what their masters hold (after a load)."""
        self._written_version = {p: p._version for p, s in self.state.items() if "master_param" in s}

    def _sync_masters(self, params: Iterable[torch.Tensor]) -> None:
        """Re-read a bf16 parameter into its master if something else wrote the parameter."""
        if not self._written_version:  # no bf16 parameters
            return
        for p in params:
            version = self._written_version.get(p)
            if version is not None and p._version != version:
                master = self.state[p]["master_param"]
                if not torch.equal(master.to(torch.bfloat16), p.detach()):
                    master.copy_(p.detach())
                self._written_version[p] = p._version

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._step_params(index, index, group["params"])
        return loss

    @torch.no_grad()
    def step_params(self, params: Sequence[torch.Tensor]) -> None:
        """Update only ``params``, e.g. one DDP gradient bucket as soon as its allreduce is done.

        Each tensor is updated exactly as ``step()`` updates it: the trust ratio needs
        only that tensor's own norms, and DDP buckets hold whole tensors. So stepping
        every bucket once is one ``step()``. Parameters not in this optimizer are ignored.
        """
        key = tuple(map(id, params))
        parts = self._subsets.get(key)
        if parts is None:  # which params of which group: worked out once per bucket
            ids = set(key)
            parts = [(index, [p for p in group["params"] if id(p) in ids])
                     for index, group in enumerate(self.param_groups)]
            parts = self._subsets[key] = [(index, subset) for index, subset in parts if subset]
        for index, subset in parts:
            self._step_params(index, (index, key), subset)

    def _step_params(self, index: int, plan_key, params: list[torch.Tensor]) -> None:
        group = self.param_groups[index]
        self._sync_masters(params)
        if self._fused is not None:
            self._fused.step(self, plan_key, params, group)
        else:
            self._step_unfused(group, params)
        if self._written_version:
            for p in params:
                if p in self._written_version:
                    self._written_version[p] = p._version

    def _step_unfused(self, group: dict, params: list[torch.Tensor]) -> None:
        ws, gs, vs, lows = [], [], [], []
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            state = self.init_state(p)
            w = state.get("master_param", p)
            ws.append(w)
            gs.append(p.grad.float())
            vs.append(state["momentum_buffer"])
            if w is not p:
                lows.append((p, w))
        if not ws:
            return
        if self.impl == "foreach":
            foreach.step_group(ws, gs, vs, group)
        else:
            for w, g, v in zip(ws, gs, vs):
                reference.step_param(w, g, v, group)
        for p, w in lows:
            p.copy_(w)
