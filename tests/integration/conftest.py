from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedscan.brokers.mosquitto import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto with broker_config/dev.conf on a free loopback port."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker
