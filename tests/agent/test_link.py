"""The agent's MQTT link against a real Mosquitto: presence, durable results across a broker
SIGKILL, backpressure, and bundle installs over chunked, resumable transfers."""

import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk import protocol as proto
from sdk.errors import BackpressureError


class FleetStandIn:
    """Publishes install commands and answers chunk requests from pre-split chunks."""

    def __init__(self, port, bundle: bytes, chunk_size: int, serve=lambda i: True) -> None:
        self.chunk_size = chunk_size
        self.chunks = proto.split_bundle(bundle, chunk_size)
        self.payloads = [c.to_payload() for c in self.chunks]  # encoded once, sent to any device
        self.serve = serve
        self.requests = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(proto.subscription("up"), 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        device, _ = proto.parse_topic(msg.topic)
        m = proto.decode(msg.payload)
        if isinstance(m, proto.ChunkRequest):
            self.requests.append(list(m.indices))
            for i in m.indices:
                if self.serve(i):
                    client.publish(proto.topic(device, "chunk"), self.payloads[i], qos=1)

    def install(self, device, bundle: bytes, model="digits", version="1", **kw):
        import hashlib

        cmd = proto.InstallCommand(model=model, version=version, bundle_sha256=hashlib.sha256(bundle).hexdigest(),
                                   bundle_size=len(bundle), chunk_size=self.chunk_size, **kw)
        self.client.publish(proto.topic(device, "cmd"), cmd.to_payload(), qos=1)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def statuses(collector, device, state):
    return [m for m in collector.of_type(proto.InstallStatus) if m.device == device and m.state == state]


def test_presence_and_heartbeats(make_link, collector, eventually, digits_bundle) -> None:
    agent, link = make_link("dev-p")
    agent.install(digits_bundle.path)
    link.publish_status()
    assert eventually(lambda: getattr(collector.statuses.get("dev-p"), "models", {}) == {"digits": "1"})
    st = collector.statuses["dev-p"]
    assert st.online and st.agent_version and st.runtime["name"] == "ai_edge_litert" and "cpu" in st.delegates
    for x in range(7):
        agent.predict("digits", [np.zeros((1, 8, 8, 1), np.float32)])
    assert eventually(lambda: any(h.models.get("digits", {}).get("requests") == 7 for h in collector.heartbeats))
    hb = next(h for h in collector.heartbeats if h.models.get("digits", {}).get("requests") == 7)
    assert hb.device == "dev-p" and hb.models["digits"]["version"] == "1" and hb.models["digits"]["p50_ms"] > 0
    assert hb.outbox_pending >= 0 and hb.uptime_s > 0
    link.stop()
    assert eventually(lambda: collector.statuses["dev-p"].online is False)


def test_results_survive_a_broker_sigkill_exactly_once(make_link, broker, collector, eventually, digits_bundle, digits) -> None:
    agent, link = make_link("dev-r")
    agent.install(digits_bundle.path)
    sent = []
    for i, x in enumerate(digits.x_test[:150]):
        out = agent.predict("digits", [x[None]])
        sent.append(link.publish_result("digits", out, key=f"sample-{i}"))
        if i == 60:
            broker.kill()  # results 61.. are produced while the broker is down
        if i == 100:
            broker.start()
    assert eventually(lambda: len(collector.messages) >= len(sent), timeout=60)
    results = collector.of_type(proto.Result)
    assert sorted(r.id for r in results) == sorted(sent)  # every result, each stored once
    assert sorted(r.key for r in results) == sorted(f"sample-{i}" for i in range(150))
    first = next(r for r in results if r.key == "sample-0")
    assert np.argmax(proto.Result.decode_tensor(first.outputs[0])) == int(np.argmax(agent.predict("digits", [digits.x_test[:1]])[0]))
    assert eventually(lambda: len(link.outbox) == 0, timeout=30)  # acks cleared the outbox


def test_full_outbox_refuses_new_work_and_says_why(make_link, broker, digits_bundle, digits) -> None:
    agent, link = make_link("dev-b", outbox_max=5)
    agent.install(digits_bundle.path)
    out = agent.predict("digits", [digits.x_test[:1]])
    for i in range(5):
        link.publish_result("digits", out, key=str(i))  # nobody acknowledges
    with pytest.raises(BackpressureError, match="outbox holds 5 unacknowledged"):
        link.publish_result("digits", out, key="6")
    assert len(link.outbox) == 5
    assert link._status().accepting_work is False


def test_install_over_mqtt_in_chunks(make_link, broker, collector, eventually, digits_bundle, digits) -> None:
    agent, link = make_link("dev-i")
    bundle = digits_bundle.path.read_bytes()
    fleet = FleetStandIn(broker.port, bundle, 16 * 1024)
    try:
        fleet.install("dev-i", bundle)
        assert eventually(lambda: statuses(collector, "dev-i", "SUCCEEDED"), timeout=30)
        assert len(fleet.chunks) >= 3 and fleet.requests[0] == list(range(len(fleet.chunks)))
        assert agent.model("digits").version == "1"
        assert eventually(lambda: getattr(collector.statuses.get("dev-i"), "models", {}) == {"digits": "1"})
        fleet.install("dev-i", bundle)  # the same version again: nothing to transfer
        assert eventually(lambda: any(s.reason == "already active" for s in statuses(collector, "dev-i", "SUCCEEDED")))
    finally:
        fleet.close()


def test_interrupted_transfer_resumes_with_only_the_missing_chunks(make_link, broker, collector, eventually, digits_bundle) -> None:
    agent, link = make_link("dev-t")
    bundle = digits_bundle.path.read_bytes()
    gate = threading.Event()
    fleet = FleetStandIn(broker.port, bundle, 8 * 1024, serve=lambda i: i < 2 or gate.is_set())
    try:
        fleet.install("dev-t", bundle)
        total = len(fleet.chunks)
        assert eventually(lambda: len(fleet.requests) >= 1)
        assert eventually(lambda: len(list((link.agent.config.state_dir / "transfers").rglob("*.part"))) == 2)
        broker.kill()  # the connection drops mid-transfer
        broker.start()
        gate.set()
        assert eventually(lambda: statuses(collector, "dev-t", "SUCCEEDED"), timeout=45)
        later = [r for r in fleet.requests[1:]]
        assert later and all(0 not in r and 1 not in r for r in later)  # held chunks are never asked again
        assert sorted(set().union(*map(set, later))) == list(range(2, total))
        assert agent.model("digits").version == "1"
    finally:
        fleet.close()


def test_bad_bundle_over_mqtt_fails_and_the_old_model_stays(make_link, broker, collector, eventually, digits_bundle,
                                                             digits_bundle_v2, other_keys, tmp_path) -> None:
    from sdk.bundle import Bundle
    from sdk.signing import load_private_key

    agent, link = make_link("dev-f")
    agent.install(digits_bundle.path)
    bad = Bundle.open(digits_bundle_v2.path).sign(load_private_key(other_keys.private), tmp_path / "bad.edgebundle").read_bytes()
    fleet = FleetStandIn(broker.port, bad, 32 * 1024)
    try:
        fleet.install("dev-f", bad, version="2")
        assert eventually(lambda: statuses(collector, "dev-f", "FAILED"), timeout=30)
        (failed,) = statuses(collector, "dev-f", "FAILED")
        assert "not among the trusted keys" in failed.reason
        assert agent.model("digits").version == "1"
        fleet.install("dev-f", bad, version="3", min_runtime_version="99.0")
        assert eventually(lambda: any("incompatible" in s.reason for s in statuses(collector, "dev-f", "FAILED")))
    finally:
        fleet.close()


def test_rollback_command(make_link, broker, collector, eventually, digits_bundle, digits_bundle_v2) -> None:
    agent, link = make_link("dev-rb")
    agent.install(digits_bundle.path)
    agent.install(digits_bundle_v2.path)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(proto.topic("dev-rb", "cmd"), b"\x00 not json", qos=1)  # a malformed command is logged and ignored
    c.publish(proto.topic("dev-rb", "chunk"), b"garbage", qos=1)  # a handler error must not stop the link
    c.publish(proto.topic("dev-rb", "cmd"), proto.RollbackCommand(model="digits", rollout="r1").to_payload(), qos=1)
    assert eventually(lambda: statuses(collector, "dev-rb", "ROLLED_BACK"), timeout=30)
    (rb,) = statuses(collector, "dev-rb", "ROLLED_BACK")
    assert (rb.version, rb.previous_version, rb.rollout) == ("1", "2", "r1")
    assert agent.model("digits").version == "1"
    c.disconnect()
    c.loop_stop()



def test_link_works_through_an_mqtt311_broker(make_link, make_collector, amqtt_broker, eventually, digits_bundle,
                                              digits) -> None:
    """amqtt speaks only MQTT 3.1.1: the link probes, falls back to it, and everything works."""
    collector = make_collector(amqtt_broker.port)
    agent, link = make_link("dev-3", url=amqtt_broker.url, protocol="auto")
    assert eventually(lambda: link.conn.connected.is_set(), timeout=20)
    assert link.conn.protocol == "3.1.1"
    bundle = digits_bundle.path.read_bytes()
    fleet = FleetStandIn(amqtt_broker.port, bundle, 16 * 1024)
    try:
        fleet.install("dev-3", bundle)
        assert eventually(lambda: statuses(collector, "dev-3", "SUCCEEDED"), timeout=60)
        sent = [link.publish_result("digits", agent.predict("digits", [x[None]]), key=str(i))
                for i, x in enumerate(digits.x_test[:30])]
        assert eventually(lambda: {r.id for r in collector.of_type(proto.Result)} == set(sent), timeout=60)
        assert eventually(lambda: len(link.outbox) == 0, timeout=30)
        assert eventually(lambda: getattr(collector.statuses.get("dev-3"), "models", {}) == {"digits": "1"})
    finally:
        fleet.close()


def test_auto_protocol_waits_for_a_broker_that_is_down_at_start(make_link, unstarted_amqtt_broker) -> None:
    """The protocol is probed once the broker answers, so a 3.1.1-only broker that starts after
    the agent still gets a 3.1.1 connection."""
    agent, link = make_link("dev-late", url=unstarted_amqtt_broker.url, protocol="auto")
    assert not link.conn.wait_connected(1.0)
    unstarted_amqtt_broker.start()
    assert link.conn.wait_connected(30)
    assert link.conn.protocol == "3.1.1"


def test_oversized_messages_are_never_published(make_link, broker) -> None:
    from sdk.errors import BrokerError

    agent, link = make_link("dev-o")
    assert link.conn.wait_connected(20)
    with pytest.raises(BrokerError, match="exceeds the broker's maximum packet size"):
        link.conn.publish(proto.topic("dev-o", "up"), b"x" * (link.conn.max_packet + 1))


def test_username_password_auth(make_link, make_broker, eventually) -> None:
    secured = make_broker(users={"dev-u": "s3cret"})
    agent, link = make_link("dev-u", url=secured.url, username="dev-u", password="s3cret")
    assert link.conn.wait_connected(20)
    _, bad = make_link("dev-x", url=secured.url, username="dev-x", password="wrong")
    assert not bad.conn.wait_connected(3)  # refused: the agent keeps retrying and says why in its log


def test_mutual_tls_with_a_client_certificate(make_link, make_broker, tls_material) -> None:
    tls = tls_material
    secured = make_broker(extra=f"cafile {tls['ca']}\ncertfile {tls['server_cert']}\nkeyfile {tls['server_key']}\n"
                                "require_certificate true\nuse_identity_as_username true\n")
    url = f"mqtts://127.0.0.1:{secured.port}"
    agent, link = make_link("dev-tls", url=url, ca_file=str(tls["ca"]), client_cert=str(tls["client_cert"]),
                            client_key=str(tls["client_key"]))
    assert link.conn.wait_connected(20)
    _, anonymous = make_link("dev-anon", url=url, ca_file=str(tls["ca"]))  # no client certificate
    assert not anonymous.conn.wait_connected(3)


def test_batch_tasks_run_and_a_full_outbox_announces_no_free_slots(make_link, broker, make_collector, eventually,
                                                                   digits_bundle, digits) -> None:
    collector = make_collector(broker.port, ack=False)  # results stay in the outbox
    agent, link = make_link("dev-w", outbox_max=2, preinstall=[digits_bundle.path])
    assert eventually(lambda: any(w.device == "dev-w" and w.free == 1 and w.models == {"digits": "1"}
                                  for w in collector.work_requests))
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    x = digits.x_test[:6].astype(np.float32)
    for i in range(2):
        task = proto.Task(f"job-{i}", "job", "digits", 30.0, [x[3 * i : 3 * i + 3]])
        pub.publish(proto.topic("dev-w", "task"), task.to_payload(), qos=1)
    assert eventually(lambda: len(collector.of_type(proto.TaskResult)) == 2)
    results = {r.task: r for r in collector.of_type(proto.TaskResult)}
    expected = agent.predict("digits", [x[:1]])[0]
    got = proto.Result.decode_tensor(results["job-0"].outputs[0])
    assert got.shape == (3, 10) and np.array_equal(got[:1], expected) and results["job-0"].error == ""
    assert link.outbox.full  # two unacknowledged results fill it
    assert eventually(lambda: collector.work_requests[-1].free == 0)  # so the agent says it takes no work
    extra = proto.Task("job-9", "job", "digits", 30.0, [x[:1]])
    pub.publish(proto.topic("dev-w", "task"), extra.to_payload(), qos=1)
    assert not eventually(lambda: len(collector.of_type(proto.TaskResult)) > 2, timeout=2)  # declined, not lost: the lease re-dispatches it
    pub.disconnect()
    pub.loop_stop()
