from __future__ import annotations

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture(autouse=True)
def _clean_global_state():
    """Each test starts without an initialised Hydra and leaves torch's threads as found."""
    GlobalHydra.instance().clear()
    threads = torch.get_num_threads()
    yield
    GlobalHydra.instance().clear()
    torch.set_num_threads(threads)
