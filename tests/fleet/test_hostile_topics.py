"""Who a message comes from is its topic's device, on every fleet path that reads device
messages; chunks go only to a device that a running rollout is sending that bundle to.
Real Mosquitto, bare paho clients as rogue devices, simulated devices as honest ones."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt

from fleet import Fleet
from sdk import protocol as proto


class Client:
    """A bare paho client (a device that is not an edgesdk agent) that records what it receives."""

    def __init__(self, port: int, *subscriptions: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        if subscriptions:
            self.client.subscribe([(s, 1) for s in subscriptions])
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.received.append((msg.topic, msg.payload))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def status(device: str) -> bytes:
    return proto.Status(device=device, online=True, agent_version="0-test", models={"m": "1"}).to_payload()


def test_refresh_registry_takes_a_status_only_for_its_topics_device(broker, tmp_path) -> None:
    c = Client(broker.port)
    try:
        c.publish(proto.topic("honest", "status"), status("honest"), retain=True)
        c.publish(proto.topic("liar", "status"), status("victim"), retain=True)  # speaks for another device
        fleet = Fleet(tmp_path / "fleet", broker.url)
        fleet.refresh_registry(1.0)
        assert [d.id for d in fleet.devices()] == ["honest"]
    finally:
        c.close()


def test_the_engine_takes_a_status_only_for_its_topics_device_and_channel(broker, make_fleet, eventually) -> None:
    fleet = make_fleet(broker.url)
    c = Client(broker.port)
    try:
        c.publish(proto.topic("liar", "status"), status("victim"))
        c.publish(proto.topic("sneaky", "up"), status("sneaky"))  # a status, but not on the status channel
        c.publish(proto.topic("honest", "status"), status("honest"))
        assert eventually(lambda: [d.id for d in fleet.devices()] == ["honest"])
        assert eventually(lambda: fleet.stats["spoofed"] == 2)
    finally:
        c.close()


def test_chunks_go_only_to_a_device_a_running_rollout_is_sending_that_bundle_to(broker, make_fleet, make_sims,
                                                                                eventually, digits_bundle_v2) -> None:
    fleet = make_fleet(broker.url)
    fleet.deploy(digits_bundle_v2.path, devices=["offline-device"])  # a running rollout, sending to nobody yet
    sha = fleet.add_bundle(digits_bundle_v2.path)[0]  # the bundle is in the fleet's store
    rogue = Client(broker.port, proto.topic("rogue", "chunk"))
    try:
        rogue.publish(proto.topic("rogue", "up"), proto.ChunkRequest(device="rogue", bundle_sha256=sha,
                                                                     indices=[0, 1]).to_payload())
        traversal = {"schema": 1, "type": "chunk_request", "id": proto.new_id(), "ts": 1.0, "device": "rogue",
                     "bundle_sha256": "./" * 31 + "..", "indices": [0]}  # by hand: the protocol refuses it too
        rogue.publish(proto.topic("rogue", "up"), json.dumps(traversal).encode())
        assert eventually(lambda: fleet.stats["rejected_chunk_requests"] + fleet.stats["malformed"] == 2)
        assert fleet.stats["rejected_chunk_requests"] >= 1

        sims = make_sims(1, broker.url, models={"digits": "1"})  # an honest target: its rollout gets every chunk
        rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids)
        assert fleet.wait_rollout(rid, timeout=60).state == "SUCCEEDED"
        assert fleet.stats["chunks_sent"] >= 1
        # the rogue asks again, now that a rollout sent that bundle to someone else: still nothing
        rogue.publish(proto.topic("rogue", "up"), proto.ChunkRequest(device="rogue", bundle_sha256=sha,
                                                                     indices=[0]).to_payload())
        assert eventually(lambda: fleet.stats["rejected_chunk_requests"] + fleet.stats["malformed"] == 3)
        assert rogue.received == []
    finally:
        rogue.close()


def test_fleet_rollouts_works_after_start(broker, make_fleet, digits_bundle_v2) -> None:
    fleet = make_fleet(broker.url)
    assert fleet.running and fleet.rollouts() == []
    rid = fleet.deploy(digits_bundle_v2.path, devices=["somewhere"])
    assert [v.id for v in fleet.rollouts()] == [rid]
    assert fleet.jobs_list() == []
