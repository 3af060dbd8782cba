"""PahoTransport against a real Mosquitto (broker_config/dev.conf): the scenarios the daemons
rely on, including a broker restart, a 1 MiB chunk and the last will."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.mosquitto import Mosquitto
from tests.integration.transport_scenarios import SCENARIOS, BrokerLike

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_paho_transport_on_mosquitto(
    mosquitto: Mosquitto, scenario: Callable[[BrokerLike], None]
) -> None:
    scenario(mosquitto)
