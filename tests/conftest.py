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
