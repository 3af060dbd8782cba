from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """The test machine has 2 cores shared by everyone: torch uses one."""
    torch.set_num_threads(1)
