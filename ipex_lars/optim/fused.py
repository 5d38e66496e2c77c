"""The ``fused`` LARS implementation: one C++ call per param group.

The kernel (csrc/lars_fused.cpp) keeps each group's tensors in a ``GroupPlan``
built once and reused while the group's parameters and state stay the same, so
a step costs no per-tensor work in Python.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch

from ipex_lars import ext

SPEC = ext.ExtensionSpec(name="_ipex_lars_fused_lars", sources=("lars_fused.cpp",))

_PLACEHOLDER = torch.empty(0)


def load() -> Any:
    """The compiled kernel module; raises ExtensionBuildError with the fix when it cannot load."""
    return ext.load(SPEC)


class FusedGroups:
    """Per param group kernel plans, rebuilt when a group or the optimizer state changes."""

    def __init__(self) -> None:
        self._plans: dict[Hashable, tuple[list, int, Any]] = {}

    def invalidate(self) -> None:
        self._plans.clear()

    def step(self, optimizer: Any, key: Hashable, params: list, group: dict) -> None:
        """Update ``params`` (all or part of ``group``) with the plan cached under ``key``."""
        cached = self._plans.get(key)
        if cached is None or cached[0] is not params or cached[1] != len(params):
            plan = load().GroupPlan(list(params), *self._state_lists(optimizer, params))
            cached = (params, len(params), plan)
            self._plans[key] = cached
        plan = cached[2]
        args = (group["lr"], group["momentum"], group["weight_decay"], group["trust_coefficient"],
                group["eps"], group["nesterov"], group["momentum_style"] == "paper", group["clip"],
                group["lars"])
        missing = plan.step(*args)
        if missing:  # parameters with their first gradient: create state, then update just those
            fresh = [params[i] for i in missing]
            for i, p in zip(missing, fresh):
                state = optimizer.init_state(p)  # raises if existing state does not fit p
                plan.set_state(i, state.get("master_param", p), state["momentum_buffer"])
            load().GroupPlan(fresh, *self._state_lists(optimizer, fresh)).step(*args)

    @staticmethod
    def _state_lists(optimizer: Any, params: list) -> tuple[list, list]:
        weights, bufs = [], []
        for p in params:
            state = optimizer.state.get(p)
            if state and "momentum_buffer" in state:
                weights.append(state.get("master_param", p))
                bufs.append(state["momentum_buffer"])
            else:
                weights.append(_PLACEHOLDER)
                bufs.append(_PLACEHOLDER)
        return weights, bufs
