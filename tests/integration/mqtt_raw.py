"""A raw MQTT client over a socket (hand-built packets) for broker tests."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from tests.helpers.wait import eventually


class Raw:
    """A plain paho client recording what it receives."""

    def __init__(self, port: int, client_id: str, clean: bool = True, **will: object) -> None:
        self.got: list[mqtt.MQTTMessage] = []
        self.cv = threading.Condition()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean
        )
        self.c.on_message = self._on_message
        self.subacks: list[list[int]] = []
        self.c.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.append(
            [c.value for c in codes]
        )
        if will:
            self.c.will_set(**will)  # type: ignore[arg-type]
        assert self.c.connect("127.0.0.1", port, keepalive=10) == mqtt.MQTT_ERR_SUCCESS
        self.c.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cv:
            self.got.append(msg)
            self.cv.notify_all()

    def sub(self, topic_filter: str, qos: int = 1) -> None:
        n = len(self.subacks)
        self.c.subscribe(topic_filter, qos)
        assert eventually(lambda: len(self.subacks) > n, 10)

    def wait(self, n: int, timeout: float = 10) -> list[mqtt.MQTTMessage]:
        with self.cv:
            self.cv.wait_for(lambda: len(self.got) >= n, timeout)
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
