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
