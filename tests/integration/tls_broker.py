"""Start a real Mosquitto with the broker config that `fedscan provision` rendered.

The only changes to the rendered config: the listener is bound to loopback (on the kit's port
when given, else a free one) and ``user root`` is added when the tests run as root (Mosquitto
drops to the ``mosquitto`` user before reading keys, and pytest's tmp folders are private).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedscan.brokers.mosquitto import Mosquitto
from fedscan.provision import BROKER


def start_broker(prov: Path, workdir: Path, port: int | None = None) -> Mosquitto:
    """Start Mosquitto with DIR/broker/mosquitto.conf, the listener moved to loopback."""
    conf = (prov / "broker" / BROKER.conf).read_text()
    head, sep, listener = conf.partition("\nlistener ")
    assert sep, "the rendered config has no listener block"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "global.conf").write_text(head)
    # keep every TLS option of the block; replace only "listener 8883" (its first line)
    block = "listener {port} 127.0.0.1" + listener[listener.index("\n") :]
    extra = "user root\n" if os.geteuid() == 0 else ""
    return Mosquitto(
        workdir, config=workdir / "global.conf", listener_block=block, port=port, extra=extra
    ).start()
