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

import copy
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ipex_lars.optim.functional import STYLES, lars, resolve_impl

_FP32_STATE = ("momentum_buffer", "master_param")  # kept float32 whatever the parameter's dtype


class _Changes:
    """How many times any LARS state mapping or per-parameter state dict was changed, so a step
    can tell in O(1) whether the lists it gathered last time still hold."""

    count = 0


def _counting(base: type, name: str) -> Callable:
    method = getattr(base, name)

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        _Changes.count += 1
        return method(self, *args, **kwargs)

    counted.__name__ = name
    return counted


_MUTATORS = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update", "__ior__")


class _Entry(dict):
    """One parameter's state (``optimizer.state[p]``): a dict whose changes are counted."""

    __slots__ = ()


class _State(defaultdict):
    """``optimizer.state``: a defaultdict of ``_Entry`` whose changes, and its entries', are counted.
    Entries given as plain dicts (by a user, or by IPEX's __setstate__) stay those very dicts;
    a step compares their tensors one by one instead."""

    __slots__ = ()

    def __init__(self, entries: Any = ()) -> None:
        super().__init__(_Entry, entries)

    def __reduce__(self) -> tuple:  # deepcopy and pickle: the same class, the same entries
        return (_State, (dict(self),))

    def copy(self) -> _State:  # also copy.copy: defaultdict's own passes a factory first
        return _State(self)

    __copy__ = copy


for _name in _MUTATORS:
    setattr(_Entry, _name, _counting(dict, _name))
    setattr(_State, _name, _counting(defaultdict, _name))


class _Gathered:
    """One param group's tensors as the last full gather found them, and what must not have changed."""

    def __init__(
        self, group: dict, state: Any, changes: int, ps: list, bufs: list, masters: list, states: list, idle: list
    ) -> None:
        self.group, self.params, self.snapshot, self.changes = group, group["params"], tuple(group["params"]), changes
        self.state = state
        self.ps, self.bufs, self.masters, self.idle = ps, bufs, masters, idle
        self.any_master = any(m is not None for m in masters)
        # entries that are not counting dicts (a user stored a plain dict) are compared each step
        self.plain = [(s, b, m) for s, b, m in zip(states, bufs, masters) if type(s) is not _Entry]

    def still_valid(self, group: dict, state: Any) -> bool:
        """The same state mapping and group, the same parameter list (element by element), no
        state mapping or entry changed since (counted), the same momentum and master tensors in any
        plain-dict entry, and no parameter that had no gradient then has one now."""
        params = group["params"]
        return (
            state is self.state
            and type(state) is _State
            and _Changes.count == self.changes
            and self.group is group
            and self.params is params
            and len(params) == len(self.snapshot)
            and all(map(operator.is_, params, self.snapshot))
            and all(p.grad is None for p in self.idle)
            and all(s.get("momentum_buffer") is b and s.get("master_param") is m for s, b, m in self.plain)
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class LARS(torch.optim.Optimizer):
    """LARS with per-group ``lars`` adaptation switch; see the module docstring for the update.

    ``impl`` picks the implementation (see ``ipex_lars.optim.functional``): ``"fused"``
    (multi-tensor C++ kernel, CPU), ``"foreach"`` (torch multi-tensor ops), ``"reference"``
    (per-tensor ground truth) or ``"auto"`` (fused if it loads, else foreach). Each step uses
    the tensors that ``param_groups`` and ``state`` hold at that moment: it reuses the lists it
    gathered last time only while a check shows none of them changed, so whatever is changed
    through the public API between steps is what the next step uses.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        momentum_style: str = "paper",
        clip: bool = False,
        impl: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            momentum_style=momentum_style,
            clip=clip,
            lars=True,
        )
        self.impl = resolve_impl(impl)
        self._written_version: dict[torch.Tensor, int] = {}
        self._gathered: dict[int, _Gathered] = {}
        super().__init__(params, defaults)
        self.state = _State(self.state)

    def __getstate__(self) -> dict:
        return {**{k: v for k, v in super().__getstate__().items() if k != "_gathered"}, "impl": self.impl}

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy, pickle and load_state_dict rebuild the optimizer through here; IPEX's
        # load_state_dict also calls it on a live optimizer with only "state" and "param_groups".
        super().__setstate__(state)
        self.impl = state.get("impl") or getattr(self, "impl", "foreach")
        self.state = _State(self.state)  # a new mapping: nothing gathered before holds
        self._gathered = {}
        for group in self.param_groups:  # a state dict from before a setting existed gets its default
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._record_master_versions()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        _check(
            isinstance(lr, (int, float))
            and not isinstance(lr, bool)
            or isinstance(lr, torch.Tensor)
            and lr.numel() == 1,
            f"LARS lr must be a number or a one-element tensor, got {lr!r}",
        )
        _check(float(lr) >= 0, f"LARS lr must be >= 0, got {float(lr)}")
        _check(0.0 <= group["momentum"] < 1.0, f"LARS momentum must be in [0, 1), got {group['momentum']!r}")
        _check(group["weight_decay"] >= 0, f"LARS weight_decay must be >= 0, got {group['weight_decay']!r}")
        _check(
            group["trust_coefficient"] > 0,
            f"LARS trust_coefficient must be > 0 (the paper uses 0.001), got {group['trust_coefficient']!r}",
        )
        _check(group["eps"] >= 0, f"LARS eps must be >= 0, got {group['eps']!r}")
        _check(
            group["momentum_style"] in STYLES,
            f"LARS momentum_style must be one of {', '.join(STYLES)}, got {group['momentum_style']!r}",
        )
        _check(not group["nesterov"] or group["momentum"] > 0, "LARS nesterov=True needs momentum > 0")
        for p in group["params"]:
            _check(
                p.dtype in (torch.float32, torch.bfloat16),
                f"LARS updates float32 or bfloat16 parameters (bf16 through an fp32 master copy); "
                f"got a {p.dtype} parameter of shape {tuple(p.shape)}",
            )

    def _fit_state(self, p: torch.Tensor, state: dict) -> dict:
        """Make ``state`` fit ``p``: fp32 momentum, and an fp32 master exactly when ``p`` is bf16."""
        if p.dtype == torch.bfloat16 and "master_param" not in state:
            state["master_param"] = p.detach().float()  # keeps p's layout (e.g. channels-last)
            self._written_version[p] = p._version
        elif p.dtype != torch.bfloat16 and "master_param" in state:
            del state["master_param"]  # e.g. state saved from a bf16 model, loaded into an fp32 one
            self._written_version.pop(p, None)
        if "momentum_buffer" not in state:
            weight = state.get("master_param", p)
            state["momentum_buffer"] = torch.zeros_like(
                weight, dtype=torch.float32, memory_format=torch.preserve_format
            )
        elif state["momentum_buffer"].shape != p.shape:
            raise ValueError(
                f"LARS state does not fit its parameter: momentum of shape "
                f"{tuple(state['momentum_buffer'].shape)} for a parameter of shape {tuple(p.shape)}; "
                "load the optimizer state saved with this model"
            )
        return state

    def state_dict(self) -> dict:
        """torch's ``state_dict``, with each parameter's state as a plain dict, so that a saved
        checkpoint loads with ``torch.load(weights_only=True)``."""
        saved = super().state_dict()
        saved["state"] = {k: dict(v) if type(v) is _Entry else v for k, v in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` in torch's order (pre-hooks, load, post-hooks), except that
        the momentum and the master of a bf16 parameter stay float32 instead of taking its dtype."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        by_id = {
            pid: p
            for saved, group in zip(saved_groups, self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        state: defaultdict[Any, dict] = defaultdict(dict)
        for pid, value in state_dict["state"].items():
            p = by_id.get(pid)
            if p is None or not isinstance(value, dict):
                state[pid] = value  # not a parameter's state: kept as it is, as torch does
            else:
                state[p] = _Entry((key, _load_value(p, key, v)) for key, v in value.items())
        groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            groups.append(saved)
        self.__setstate__({"state": state, "param_groups": groups})
        # Masters follow this model's dtypes and shapes must match; not in __setstate__, because
        # IPEX calls that with state it re-lays out for its packed weights only afterwards.
        for p, s in self.state.items():
            if isinstance(p, torch.Tensor) and isinstance(s, dict) and s:
                self._fit_state(p, s)
        self._record_master_versions()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _record_master_versions(self) -> None:
        """Take the bf16 parameters as they are now as what their masters hold (after a load)."""
        self._written_version = {
            p: p._version for p, s in self.state.items() if isinstance(s, dict) and "master_param" in s
        }

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
        for group in self.param_groups:
            gathered = self._gathered.get(id(group))
            if gathered is None or not gathered.still_valid(group, self.state) or not self._step_gathered(gathered):
                self._gathered[id(group)] = self._step_group(group, group["params"])
        return loss

    @torch.no_grad()
    def step_params(self, params: Sequence[torch.Tensor]) -> None:
        """Update only ``params``, e.g. one DDP gradient bucket as soon as its allreduce is done.

        Each tensor is updated exactly as ``step()`` updates it: the trust ratio needs
        only that tensor's own norms, and DDP buckets hold whole tensors. So stepping
        every bucket once is one ``step()``. Parameters not in this optimizer are ignored.
        """
        wanted = set(map(id, params))
        for group in self.param_groups:
            subset = [p for p in group["params"] if id(p) in wanted]
            if subset:
                self._step_group(group, subset)

    def _step_gathered(self, gathered: _Gathered) -> bool:
        """Step the tensors gathered last time (checked still valid), each with its gradient as it
        is now (the kernel reads them, and skips a parameter that has none); False when an input
        no longer fits, e.g. a dtype changed through ``.data``, so the caller gathers afresh."""
        try:
            self._step_lists(
                gathered.group, gathered.ps, None, gathered.bufs, gathered.masters if gathered.any_master else None
            )
        except ValueError:  # nothing was written
            return False
        return True

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> _Gathered:
        """Gather (params, grads, momentum, masters) from the state as it is now, step them, and
        return what was gathered for the next step to reuse while it stays valid."""
        ps, grads, bufs, masters, states, idle = [], [], [], [], [], []
        state_of, bf16, any_master = self.state, torch.bfloat16, False
        for p in params:
            g = p.grad
            if g is None:
                idle.append(p)
                continue
            state = state_of[p]
            buf, master = state.get("momentum_buffer"), state.get("master_param")
            if buf is None or (master is None) is (p.dtype is bf16):  # new, or the dtype changed
                self._fit_state(p, state)
                buf, master = state["momentum_buffer"], state.get("master_param")
            any_master = any_master or master is not None
            ps.append(p)
            grads.append(g)
            bufs.append(buf)
            masters.append(master)
            states.append(state)
        changes = _Changes.count  # after the gather's own changes, before the step (which frees the GIL)
        if ps:
            self._step_lists(group, ps, grads, bufs, masters if any_master else None)
        return _Gathered(group, state_of, changes, ps, bufs, masters, states, idle)

    def _step_lists(self, group: dict, ps: list, grads: list | None, bufs: list, masters: list | None) -> None:
        self._sync_masters(ps)
        lars(
            ps,
            grads,
            bufs,
            masters,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            nesterov=group["nesterov"],
            momentum_style=group["momentum_style"],
            clip=group["clip"],
            adapt=group["lars"],
            impl=self.impl,
        )
        if self._written_version:
            for p in ps:
                if p in self._written_version:
                    self._written_version[p] = p._version


def _load_value(p: torch.Tensor, key: Any, value: Any) -> Any:
    """A saved state value for parameter ``p``: momentum and master stay float32 on p's device;
    other floating tensors take p's dtype and device, as torch's optimizers load them."""
    if not isinstance(value, torch.Tensor):
        return value
    if key in _FP32_STATE:
        return value.to(device=p.device, dtype=torch.float32, copy=True)
    if key != "step" and value.is_floating_point() and p.is_floating_point():
        return value.to(device=p.device, dtype=p.dtype)
    return value.to(device=p.device)
