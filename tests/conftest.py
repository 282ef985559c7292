"""Fixtures shared across the test packages."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters


@pytest.fixture
def fresh_dynamo():
    """A clean ``torch.compile`` state (caches and counters) before and after a test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test skipped for want of CUDA is a ``cuda`` test too, so that
    ``pytest -m cuda`` (the GPU check) runs all of them, marked or not."""
    for item in items:
        if any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
