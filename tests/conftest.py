"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Training runs set torch's thread count; give every test the count it started with."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    if torch and before:
        torch.set_num_threads(before)


def _kernel_isas() -> list[str]:
    from affinity.machine import this_machine

    return this_machine().cpu.isas()


@pytest.fixture(params=["reference", "foreach"] + [f"fused-{isa}" for isa in _kernel_isas()])
def impl_isa(request, monkeypatch) -> str:
    """A LARS impl to test; the fused kernel once for every vector ISA this CPU can execute
    (``IPEX_LARS_ISA``), so the AVX2 and scalar paths are tested on an AVX-512 machine too."""
    impl, _, isa = request.param.partition("-")
    if isa:
        monkeypatch.setenv("IPEX_LARS_ISA", isa)
    return impl
