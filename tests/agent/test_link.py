"""The agent's MQTT link against a real Mosquitto: presence, durable results across a broker
SIGKILL, backpressure, and bundle installs over chunked, resumable transfers."""

import queue
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk import protocol as proto
from sdk.errors import BackpressureError


class FleetStandIn:
    """Publishes install commands and answers chunk requests from pre-split chunks; with ``pace``,
    one chunk every ``pace`` seconds (a slow link), tracking how many were asked for and not yet sent."""

    def __init__(self, port, bundle: bytes, chunk_size: int, serve=lambda i: True, pace: float = 0.0) -> None:
        self.chunk_size = chunk_size
        self.chunks = proto.split_bundle(bundle, chunk_size)
        self.payloads = [c.to_payload() for c in self.chunks]  # encoded once, sent to any device
        self.serve = serve
        self.requests = []
        self.served: set[int] = set()
        self.unsent: set[int] = set()  # asked for, not sent yet: a lower bound of what is in flight
        self.max_unsent = 0
        self.pace = pace
        self._queue: "queue.Queue" = queue.Queue()
        self._lock = threading.Lock()
        if pace:
            threading.Thread(target=self._paced, daemon=True).start()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(proto.subscription("up"), 1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        # an install published before the connection is up, or a chunk request sent before the
        # subscription stands, would be lost: the tests start only once both are in place
        if not subscribed.wait(10):
            raise RuntimeError("the fleet stand-in could not subscribe to the broker within 10 s")

    def _on_message(self, client, userdata, msg):
        device, _ = proto.parse_topic(msg.topic)
        m = proto.decode(msg.payload)
        if isinstance(m, proto.ChunkRequest):
            with self._lock:
                self.requests.append((list(m.indices), set(self.served)))
                self.unsent |= set(m.indices)
                self.max_unsent = max(self.max_unsent, len(self.unsent))
            for i in m.indices:
                if self.pace:
                    self._queue.put((device, i))
                else:
                    self._send(device, i)

    def _send(self, device, i):
        with self._lock:
            self.unsent.discard(i)
            if not self.serve(i):
                return
            self.served.add(i)
        self.client.publish(proto.topic(device, "chunk"), self.payloads[i], qos=1)

    def _paced(self):
        while True:
            device, i = self._queue.get()
            time.sleep(self.pace)
            self._send(device, i)

    def asked(self):
        """The indices of every chunk request, in order."""
        with self._lock:
            return [r for r, _ in self.requests]

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
        assert len(fleet.chunks) >= 3 and fleet.asked()[0] == list(range(len(fleet.chunks)))
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
        assert eventually(lambda: len(fleet.asked()) >= 1)
        assert eventually(lambda: len(list((link.agent.config.state_dir / "transfers").rglob("*.part"))) == 2)
        broker.kill()  # the connection drops mid-transfer
        broker.start()
        gate.set()
        assert eventually(lambda: statuses(collector, "dev-t", "SUCCEEDED"), timeout=45)
        later = [r for r in fleet.asked()[1:]]
        assert later and all(0 not in r and 1 not in r for r in later)  # held chunks are never asked again
        assert sorted(set().union(*map(set, later))) == list(range(2, total))
        assert agent.model("digits").version == "1"
    finally:
        fleet.close()


def test_the_window_bounds_the_chunks_in_flight_and_requests_are_pipelined(make_link, broker, collector, eventually,
                                                                           digits_bundle) -> None:
    agent, link = make_link("dev-w")
    bundle = digits_bundle.path.read_bytes()
    fleet = FleetStandIn(broker.port, bundle, 1024, pace=0.005)  # a slow link: one chunk every 5 ms
    try:
        fleet.install("dev-w", bundle, window=4)
        assert eventually(lambda: statuses(collector, "dev-w", "SUCCEEDED"), timeout=60)
        asked, total = fleet.asked(), len(fleet.chunks)
        assert total > 30 and agent.model("digits").version == "1"
        assert fleet.max_unsent <= 4  # never more than the window asked for and not yet received
        assert all(1 <= len(r) <= 4 for r in asked) and len(asked) >= total // 2  # refilled as chunks arrive
        assert asked[0] == [0, 1, 2, 3] and sorted(set().union(*map(set, asked))) == list(range(total))
    finally:
        fleet.close()


def test_a_dropped_chunk_is_asked_for_again_and_the_install_completes(make_link, broker, collector, eventually,
                                                                      digits_bundle) -> None:
    agent, link = make_link("dev-d")
    bundle = digits_bundle.path.read_bytes()
    dropped = []

    def serve(i):  # chunk 5 is lost the first time it is sent (as a broker over its queue limit drops it)
        if i == 5 and not dropped:
            dropped.append(i)
            return False
        return True

    fleet = FleetStandIn(broker.port, bundle, 4096, serve=serve)
    try:
        fleet.install("dev-d", bundle)
        assert eventually(lambda: statuses(collector, "dev-d", "SUCCEEDED"), timeout=60)
        assert dropped == [5] and agent.model("digits").version == "1"
        again = [(r, served) for r, served in fleet.requests if 5 in r][1:]
        assert again, "the lost chunk was never asked for again"
        assert not set(again[0][0]) & again[0][1]  # the re-request asks only for chunks the agent lacks
        assert not statuses(collector, "dev-d", "FAILED")
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
    got = results["job-0"].outputs[0]  # a binary frame: the array itself
    assert got.shape == (3, 10) and np.array_equal(got[:1], expected) and results["job-0"].error == ""
    assert link.outbox.full  # two unacknowledged results fill it
    assert eventually(lambda: collector.work_requests[-1].free == 0)  # so the agent says it takes no work
    extra = proto.Task("job-9", "job", "digits", 30.0, [x[:1]])
    pub.publish(proto.topic("dev-w", "task"), extra.to_payload(), qos=1)
    assert not eventually(lambda: len(collector.of_type(proto.TaskResult)) > 2, timeout=2)  # declined, not lost: the lease re-dispatches it
    pub.disconnect()
    pub.loop_stop()


# --- delta updates: a real Fleet and real agents ------------------------------------------------------
def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fleet_knows(fleet, device, sha):
    return lambda: any(d.id == device and d.online and sha in d.bundles for d in fleet.devices())


def _device_row(fleet, rid, device):
    return next(d for d in fleet.rollout(rid).devices if d["device"] == device)


def test_an_update_sent_as_a_delta_installs_and_serves(make_link, broker, make_fleet, eventually, digits_bundle,
                                                       digits_bundle_v2_same_model, digits) -> None:
    agent, link = make_link("dev-delta", preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    sha1, sha2 = _sha(digits_bundle.path), _sha(digits_bundle_v2_same_model)
    fleet.add_bundle(digits_bundle.path)  # the fleet holds version 1's bytes, the device reports holding it
    assert eventually(_fleet_knows(fleet, "dev-delta", sha1))
    before = agent.predict("digits", [digits.x_test[:1]])[0]
    rid = fleet.deploy(digits_bundle_v2_same_model, devices=["dev-delta"])
    view = fleet.wait_rollout(rid, timeout=60)
    assert view.state == "SUCCEEDED", view
    reason = _device_row(fleet, rid, "dev-delta")["reason"]
    assert "installed from a zstd" in reason and "delta of" in reason
    with fleet.database() as db:
        rows = {r["method"]: dict(r) for r in db.all("SELECT * FROM deltas WHERE base = ? AND target = ?", (sha1, sha2))}
    assert set(rows) == {"zstd-zip", "zstd"}  # both made once; the smaller one travelled
    best = min(rows.values(), key=lambda r: r["size"])
    assert f"a {best['method']} delta of {best['size']} bytes" in reason
    assert best["size"] < 0.9 * best["full_size"] and best["full_size"] == digits_bundle_v2_same_model.stat().st_size
    assert fleet.stats["delta_installs"] == 1 and fleet.stats["delta_fallbacks"] == 0
    # the rebuilt bundle is the bundle, byte for byte, went through the installer and serves
    assert agent.store.bundle_path("digits", "2").read_bytes() == digits_bundle_v2_same_model.read_bytes()
    assert agent.model("digits").version == "2"
    np.testing.assert_array_equal(agent.predict("digits", [digits.x_test[:1]])[0], before)  # version 2 is v1's model
    assert eventually(_fleet_knows(fleet, "dev-delta", sha2))  # the fleet records what the device has now


def test_a_missing_base_or_a_corrupt_delta_falls_back_to_the_full_bundle(make_link, broker, make_fleet, eventually,
                                                                          digits_bundle, digits_bundle_v2_same_model) -> None:
    import hashlib
    import os

    lost, _ = make_link("dev-lost", preinstall=[digits_bundle.path])
    bad, _ = make_link("dev-bad", preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    sha1, sha2 = _sha(digits_bundle.path), _sha(digits_bundle_v2_same_model)
    fleet.add_bundle(digits_bundle.path)
    fleet.add_bundle(digits_bundle_v2_same_model)
    assert eventually(_fleet_knows(fleet, "dev-lost", sha1)) and eventually(_fleet_knows(fleet, "dev-bad", sha1))
    # dev-lost: the fleet believes it holds version 1, but its store lost the file since
    lost.store.bundle_path("digits", "1").unlink()
    # dev-bad: the delta the fleet made is garbage (under its own sha256, so every chunk checks out)
    with fleet.database() as db:
        for method in fleet.deltas.methods:
            fleet.deltas.delta(db, sha1, sha2, 0.0, method)
        garbage = os.urandom(2000)
        gsha = hashlib.sha256(garbage).hexdigest()
        fleet.bundles.put_delta(gsha, garbage)
        db.execute("UPDATE deltas SET sha256 = ?, size = ? WHERE base = ? AND target = ?", (gsha, len(garbage), sha1, sha2))
    rid = fleet.deploy(digits_bundle_v2_same_model, devices=["dev-lost", "dev-bad"], canary=0, batch_percent=100)
    view = fleet.wait_rollout(rid, timeout=90)
    assert view.state == "SUCCEEDED", view
    for agent in (lost, bad):
        assert agent.model("digits").version == "2"
        assert agent.store.bundle_path("digits", "2").read_bytes() == digits_bundle_v2_same_model.read_bytes()
        assert "installed from" not in _device_row(fleet, rid, agent.config.device_id)["reason"]  # arrived whole
    with fleet.database() as db:
        reasons = {r["device"]: r["reason"] for r in db.all("SELECT device, reason FROM delta_fallbacks WHERE target = ?",
                                                          (sha2,))}
    assert "base bundle" in reasons["dev-lost"] and "not on this device" in reasons["dev-lost"]
    assert "does not apply" in reasons["dev-bad"]
    assert fleet.stats["delta_fallbacks"] == 2 and fleet.stats["delta_installs"] == 0


# --- compact task inputs: pieces, fleet-quantised integers, uint8 pixels ---------------------------------
def _outputs(result) -> list:
    """A task result's outputs as arrays (however the protocol frames them)."""
    return [proto.Result.decode_tensor(o) if isinstance(o, dict) else np.asarray(o) for o in result.outputs]


class TaskSender:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, device: str, payload: bytes) -> None:
        self.client.publish(proto.topic(device, "task"), payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_task_in_pieces_runs_and_hostile_pieces_are_dropped_and_counted(make_link, broker, collector, eventually,
                                                                         digits_bundle, digits) -> None:
    agent, link = make_link("dev-pc", preinstall=[digits_bundle.path])
    assert eventually(lambda: link.conn is not None and link.conn.connected.is_set())
    sender = TaskSender(broker.port)
    x = digits.x_test[:4].astype(np.float32)
    frame = proto.Task("pc-1", "pc", "digits", 30.0, [x]).to_payload()
    pieces = proto.split_task(frame, "pc-1", 300)
    assert len(pieces) >= 4
    wrong_sha = [proto.TaskPiece("pc-2", p.index, p.count, p.total, "ab" * 32, p.data) for p in pieces]
    hostile = [
        *wrong_sha,  # complete, but not what its sha256 says: refused when whole
        pieces[0], proto.split_task(frame, "pc-1", 200)[1],  # another cut of the same task: would overlap
        proto.TaskPiece("pc-1", 0, pieces[0].count, pieces[0].total, pieces[0].sha256, b"\0" * len(pieces[0].data)),
        proto.TaskPiece("pc-3", 0, proto.MAX_PIECES, 1025 * proto.MAX_PIECES, "cd" * 32, b"x" * 1025),  # > max_task_bytes
    ]
    for p in hostile:
        sender.send("dev-pc", p.to_payload())
    assert eventually(lambda: agent.dropped["task-piece"] == 4)
    for cap in range(link.pieces.max_tasks + 1):  # too many partial tasks: the oldest are discarded
        sender.send("dev-pc", proto.split_task(frame[:-1], f"junk-{cap}", 300)[0].to_payload())
    assert eventually(lambda: agent.dropped["task-piece"] >= 5)
    for p in reversed(pieces):  # the genuine task, its first piece long held: evicted, so all again
        sender.send("dev-pc", p.to_payload())
    assert eventually(lambda: any(r.task == "pc-1" for r in collector.of_type(proto.TaskResult)))
    result = next(r for r in collector.of_type(proto.TaskResult) if r.task == "pc-1")
    assert result.error == "" and result.samples == 4
    np.testing.assert_array_equal(_outputs(result)[0], np.concatenate([agent.predict("digits", [s[None]])[0] for s in x]))
    assert link.pieces.held_bytes <= agent.config.max_task_bytes
    sender.close()


def test_fleet_quantised_inputs_go_raw_and_uint8_pixels_are_normalised(make_link, broker, collector, eventually,
                                                                       digits_bundle_pixels, digits) -> None:
    from sdk.encoding import Normalization, encode_job_inputs
    from sdk.runtime import dequantize, open_engine

    agent, link = make_link("dev-q", preinstall=[digits_bundle_pixels.path])
    assert eventually(lambda: link.conn is not None and link.conn.connected.is_set())
    model = agent.model("digits")
    spec = model.inputs[0]
    assert spec.dtype == "int8" and spec.quantized and model.normalizations[0] == Normalization(1 / 16, 0.0)
    pixels = np.rint(digits.x_test[:5] * 16).astype(np.uint8)
    floats = Normalization(1 / 16, 0.0).apply(pixels)  # what the device must compute from the pixels
    manifest = model.manifest
    (q,), (quant,), how = encode_job_inputs([floats], manifest)
    assert q.dtype == np.int8 and how == ["quantized-by-fleet"] and quant == [spec.scale, spec.zero_point]
    engine = open_engine(digits_bundle_pixels.model, "cpu")  # the model itself, fed the integers as they are
    want = np.concatenate([dequantize(engine.run([q[i : i + 1]])[0], engine.outputs[0]) for i in range(5)])
    # a raw int8 pattern a re-quantisation would mangle (it would read -128..127 as floats)
    odd = np.random.default_rng(0).integers(-128, 128, size=(2, 8, 8, 1), dtype=np.int8)
    odd_want = np.concatenate([dequantize(engine.run([odd[i : i + 1]])[0], engine.outputs[0]) for i in range(2)])
    other = [spec.scale * 2, 0]  # quantised for another version: the agent re-scales them itself
    sender = TaskSender(broker.port)
    tasks = {"q-1": proto.Task("q-1", "q", "digits", 30.0, [q], quant=[quant]),
             "q-2": proto.Task("q-2", "q", "digits", 30.0, [odd], quant=[quant]),
             "q-3": proto.Task("q-3", "q", "digits", 30.0, [(odd // 2).astype(np.int8)], quant=[other]),
             "q-4": proto.Task("q-4", "q", "digits", 30.0, [pixels]),
             "q-5": proto.Task("q-5", "q", "digits", 30.0, [floats])}
    for i, t in enumerate(tasks.values()):  # a few at a time: the agent queues 4 x its slots at most
        sender.send("dev-q", t.to_payload())
        assert eventually(lambda: len({r.task for r in collector.of_type(proto.TaskResult)} & set(tasks)) > i)
    got = {r.task: _outputs(r)[0] for r in collector.of_type(proto.TaskResult) if r.task in tasks}
    np.testing.assert_array_equal(got["q-1"], want)  # fed as they are: the agent's own quantisation would give the same
    np.testing.assert_array_equal(got["q-5"], want)  # ... as it does here, from the floats
    np.testing.assert_array_equal(got["q-2"], odd_want)
    requantized = agent.predict("digits", [((odd // 2).astype(np.float32) * np.float32(other[0]))[:1]])[0]
    np.testing.assert_allclose(got["q-3"][:1], requantized, atol=1e-6)
    np.testing.assert_array_equal(got["q-4"], want)  # uint8 pixels normalised on the device = the normalised floats
    np.testing.assert_array_equal(agent.predict("digits", [pixels[:1]])[0], want[:1])  # in-process requests too
    sender.close()


def test_a_bundle_rebuilt_from_a_delta_is_verified_like_a_full_one(make_link, broker, make_fleet, eventually,
                                                                    digits_bundle, other_keys, tmp_path,
                                                                    reversioned) -> None:
    agent, _ = make_link("dev-dv", preinstall=[digits_bundle.path])  # trusts signing_keys only
    untrusted = reversioned(digits_bundle.path, "2", other_keys.private, tmp_path / "untrusted.edgebundle")
    fleet = make_fleet(broker.url)
    fleet.add_bundle(digits_bundle.path)
    assert eventually(_fleet_knows(fleet, "dev-dv", _sha(digits_bundle.path)))
    rid = fleet.deploy(untrusted, devices=["dev-dv"])
    view = fleet.wait_rollout(rid, timeout=60)
    row = _device_row(fleet, rid, "dev-dv")
    assert view.state == "ABORTED" and row["state"] == "FAILED", view
    assert "not among the trusted keys" in row["reason"] and "rebuilt from a zstd" in row["reason"]
    assert fleet.stats["delta_fallbacks"] == 0 and agent.model("digits").version == "1"
