"""The harness itself: a real Mosquitto starts on a free port and relays a retained message."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from fedscan.brokers.mosquitto import Mosquitto


def test_retained_message_roundtrip(mosquitto: Mosquitto) -> None:
    got = threading.Event()
    seen: list[bytes] = []

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pub.publish("fl/t/global/current", b"hello", qos=1, retain=True).wait_for_publish(5)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        seen.append(msg.payload)
        got.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("fl/t/global/#", qos=1)
    sub.loop_start()
    try:
        assert got.wait(5)
        assert seen == [b"hello"]
    finally:
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()
