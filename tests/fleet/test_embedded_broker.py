"""The demo's embedded broker: mosquitto when installed, else amqtt in-process; loopback only."""

import socket

import numpy as np
import pytest

from fleet.broker import EmbeddedBroker


@pytest.mark.parametrize("kind, protocol", [("mosquitto", "5"), ("amqtt", "3.1.1")])
def test_embedded_broker_carries_a_job_and_stops(kind, protocol, make_fleet, make_sims, eventually, tmp_path) -> None:
    broker = EmbeddedBroker(kind).start()
    try:
        assert broker.url.startswith("mqtt://127.0.0.1:")
        make_sims(2, broker.url, models={"noop": "1"})
        fleet = make_fleet(broker.url)
        assert fleet.conn.protocol == protocol
        assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
        x = np.arange(40, dtype=np.float32).reshape(10, 4)
        np.testing.assert_array_equal(fleet.run("noop", x, batch_size=3, timeout=60).outputs[0], x)
        fleet.stop()
    finally:
        broker.stop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", broker.port))
        s.listen()
