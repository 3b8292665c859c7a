"""The agent's link under hostile and malformed input, on a real Mosquitto with the real LiteRT
agent: nothing is written, moved or deleted outside the state dir whatever a command says;
bundles over the size limit or the free disk are refused before any chunk is written; one
transfer per bundle (repeated commands join it, also during the install); commands naming what
the device does not have are refused with a reason; every undecodable message on every channel
is dropped and counted, and the messages behind it are processed.

Hostile payloads are built by hand (``json.dumps`` / ``struct``), so they reach the agent even
where :mod:`sdk.protocol`'s encoder would refuse to produce them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk import protocol as proto
from test_link import FleetStandIn, statuses

#: 64 characters of ``./`` and ``../``: ``<state>/transfers/../..`` is the directory that holds the
#: state dir (the sentinel sits there). The original attack: the transfer dir was built from this
#: field, and one bad chunk made the agent ``rmtree`` it.
HOSTILE_SHA = "../../" + "./" * 29
assert len(HOSTILE_SHA) == 64


def raw_install(sha: str, size: int, *, model: str = "digits", version: str = "1", chunk_size: int = 128 * 1024,
                rollout: str = "r-hostile") -> bytes:
    """An install command as JSON by hand: no encoder validation in the way."""
    return json.dumps({"schema": 1, "type": "install", "id": f"cmd-{time.monotonic_ns()}", "ts": time.time(),
                       "model": model, "version": version, "bundle_sha256": sha, "bundle_size": size,
                       "chunk_size": chunk_size, "rollout": rollout, "min_runtime_version": None}).encode()


def raw_frame(header: dict, data: bytes = b"") -> bytes:
    """A binary frame (chunk, task) by hand: ``ESDK | schema | header length | JSON | data``."""
    head = json.dumps(header).encode()
    return struct.pack("!4sBI", b"ESDK", 1, len(head)) + head + data


def raw_chunk(sha: str, data: bytes, index: int = 0, count: int = 1) -> bytes:
    return raw_frame({"type": "chunk", "bundle_sha256": sha, "index": index, "count": count,
                      "sha256": hashlib.sha256(data).hexdigest()}, data)


class Publisher:
    """A plain MQTT client publishing whatever bytes a test gives it, waiting for each PUBACK."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker):
    p = Publisher(broker.port)
    yield p
    p.close()


def tree(root: Path, skip: Path) -> dict[str, tuple]:
    """Every file and directory under ``root`` except ``skip``: path -> (kind, size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == skip:
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def test_a_path_as_bundle_sha256_changes_nothing_outside_the_state_dir(make_link, broker, collector, publisher,
                                                                        eventually, digits_bundle, digits,
                                                                        tmp_path) -> None:
    agent, link = make_link("dev-h")
    state = agent.config.state_dir
    assert state.parent == tmp_path  # so <state>/transfers/../.. is tmp_path, where the sentinel is
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("must survive")
    before = tree(tmp_path, skip=state)
    assert eventually(lambda: link.conn.connected.is_set(), timeout=20)

    bad = b"not the bundle at all"
    publisher.send(proto.topic("dev-h", "cmd"), raw_install(HOSTILE_SHA, len(bad)))
    publisher.send(proto.topic("dev-h", "chunk"), raw_chunk(HOSTILE_SHA, bad))
    bundle = digits_bundle.path.read_bytes()  # then a real install: processed after the hostile messages
    fleet = FleetStandIn(broker.port, bundle, 16 * 1024)
    try:
        fleet.install("dev-h", bundle, rollout="r-good")
        installed = eventually(lambda: any(s.rollout == "r-good" for s in statuses(collector, "dev-h", "SUCCEEDED")))
    finally:
        fleet.close()
    assert sentinel.is_dir() and (sentinel / "keep.txt").read_text() == "must survive"
    assert tree(tmp_path, skip=state) == before  # nothing outside the state dir was created, changed or removed
    assert installed  # the agent still works
    # the command was refused (by the decoder, or by the agent's confined paths), the chunk dropped
    assert link.dropped["cmd"] == 1
    assert link.dropped["chunk"] + link.dropped["chunk-no-transfer"] == 1
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.tmp"))
    assert not [s for s in collector.of_type(proto.InstallStatus)
                if s.rollout == "r-hostile" and s.state in ("DOWNLOADING", "SUCCEEDED")]
    x = digits.x_test[:1]
    assert np.argmax(agent.predict("digits", [x])[0]) == np.argmax(agent.predict("digits", [x[0]])[0])
    assert not list((state / "transfers").iterdir())  # the good transfer cleaned up after itself


def test_undecodable_messages_on_every_channel_are_counted_and_stall_nothing(make_link, broker, collector, publisher,
                                                                              eventually, digits_bundle) -> None:
    agent, link = make_link("dev-m")
    assert eventually(lambda: link.conn.connected.is_set(), timeout=20)
    sha = "ab" * 32
    hostile = {
        "cmd": [b"\x00 not json", b"[1, 2]", b'{"schema": 99, "type": "install"}',
                json.dumps({"schema": 1, "type": "install", "model": 5, "version": [], "bundle_sha256": {},
                            "bundle_size": "many"}).encode(),
                json.dumps({"schema": 1, "type": "no-such-type"}).encode(),
                proto.Status(device="dev-m").to_payload()],  # well-formed, but not a command
        "chunk": [b"garbage", b"ESDK\x01\xff\xff\xff\xff{", raw_frame({"type": "chunk"}),
                  raw_frame({"type": "chunk", "bundle_sha256": sha, "index": "x", "count": 1, "sha256": sha}),
                  raw_frame({"type": "chunk", "bundle_sha256": sha, "index": 5, "count": 2, "sha256": sha})],
        "task": [b"", b"ESDK", raw_frame({"type": "task", "id": "t", "job": "j", "model": "digits", "lease_s": 1,
                                          "inputs": [{"dtype": "float32", "shape": [1000000000, 1000000]}]}),
                 raw_frame({"type": "task", "id": "t", "job": "j", "model": "digits", "lease_s": 1,
                            "inputs": [{"dtype": "no-dtype", "shape": [1]}]}, b"\0" * 4)],
    }
    for channel, payloads in hostile.items():
        for payload in payloads:
            publisher.send(proto.topic("dev-m", channel), payload)
    publisher.send(proto.fleet_topic(), b"{not the fleet")  # not retained: other tests never see it
    expected = {"cmd": 6, "chunk": 5, "task": 4, "fleet": 1}
    assert eventually(lambda: {k: link.dropped[k] for k in expected} == expected), dict(link.dropped)

    bundle = digits_bundle.path.read_bytes()  # and what comes after is processed as usual
    fleet = FleetStandIn(broker.port, bundle, 32 * 1024)
    try:
        fleet.install("dev-m", bundle)
        assert eventually(lambda: statuses(collector, "dev-m", "SUCCEEDED"), timeout=30)
    finally:
        fleet.close()
    assert {k: link.dropped[k] for k in expected} == expected
    text = agent.metrics_text()
    assert 'edgesdk_dropped_messages_total{channel="cmd"} 6' in text
    assert 'edgesdk_dropped_messages_total{channel="task"} 4' in text


def test_chunks_for_no_running_transfer_are_dropped_and_counted(make_link, publisher, eventually) -> None:
    agent, link = make_link("dev-s")
    assert eventually(lambda: link.conn.connected.is_set(), timeout=20)
    (chunk,) = proto.split_bundle(b"a bundle nobody asked for")
    publisher.send(proto.topic("dev-s", "chunk"), chunk.to_payload())
    assert eventually(lambda: link.dropped["chunk-no-transfer"] == 1)
    transfers = agent.config.state_dir / "transfers"
    assert not transfers.exists() or not list(transfers.iterdir())


def test_a_bundle_over_max_bundle_bytes_is_refused_before_any_chunk(make_link, broker, collector, eventually,
                                                                     digits_bundle) -> None:
    agent, link = make_link("dev-l")
    bundle = digits_bundle.path.read_bytes()
    agent.config.max_bundle_bytes = len(bundle) - 1
    fleet = FleetStandIn(broker.port, bundle, 16 * 1024)
    try:
        fleet.install("dev-l", bundle, rollout="r1")
        assert eventually(lambda: statuses(collector, "dev-l", "FAILED"), timeout=20)
        (failed,) = statuses(collector, "dev-l", "FAILED")
        assert f"exceeds this agent's max_bundle_bytes ({len(bundle) - 1})" in failed.reason
        assert "raise max_bundle_bytes" in failed.reason and failed.rollout == "r1"
        assert fleet.requests == [] and not (agent.config.state_dir / "transfers" / hashlib.sha256(bundle).hexdigest()).exists()
        agent.config.max_bundle_bytes = len(bundle)  # exactly the limit is fine
        fleet.install("dev-l", bundle, rollout="r2")
        assert eventually(lambda: statuses(collector, "dev-l", "SUCCEEDED"), timeout=30)
    finally:
        fleet.close()


def test_a_bundle_the_free_disk_cannot_hold_is_refused_before_any_chunk(make_link, broker, collector, eventually,
                                                                         digits_bundle, monkeypatch) -> None:
    agent, link = make_link("dev-d")
    bundle = digits_bundle.path.read_bytes()
    real = shutil.disk_usage
    # free space is the one thing a test cannot take away from a real disk: report 8 MiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=8 << 20))
    fleet = FleetStandIn(broker.port, bundle, 16 * 1024)
    try:
        fleet.install("dev-d", bundle, rollout="r1")
        assert eventually(lambda: statuses(collector, "dev-d", "FAILED"), timeout=20)
        (failed,) = statuses(collector, "dev-d", "FAILED")
        assert f"not enough disk: {8 << 20} bytes free" in failed.reason and "free up space" in failed.reason
        assert fleet.requests == [] and not (agent.config.state_dir / "transfers").exists()
        monkeypatch.undo()
        fleet.install("dev-d", bundle, rollout="r2")
        assert eventually(lambda: statuses(collector, "dev-d", "SUCCEEDED"), timeout=30)
    finally:
        fleet.close()


def test_a_repeated_install_command_joins_the_running_transfer_and_install(make_link, broker, collector, eventually,
                                                                          digits_bundle, monkeypatch) -> None:
    import agent.link as link_module

    agent, link = make_link("dev-j")
    made = []

    class CountedTransfer(link_module.Transfer):
        def __init__(self, *args, **kw):
            made.append(self)
            super().__init__(*args, **kw)

    monkeypatch.setattr(link_module, "Transfer", CountedTransfer)
    installing, release, installs = threading.Event(), threading.Event(), []
    real_install = agent.install

    def held_install(*args, **kw):  # the install waits until the test has re-sent its commands
        installs.append(args)
        installing.set()
        assert release.wait(60)
        return real_install(*args, **kw)

    agent.install = held_install
    bundle = digits_bundle.path.read_bytes()
    serving = threading.Event()
    fleet = FleetStandIn(broker.port, bundle, 8 * 1024, serve=lambda i: i == 0 or serving.is_set())
    try:
        for _ in range(5):  # while transferring
            fleet.install("dev-j", bundle, rollout="r1")
        fleet.install("dev-j", bundle, rollout="r2")
        joined = lambda: [s for s in statuses(collector, "dev-j", "DOWNLOADING") if "joined" in s.reason]  # noqa: E731
        assert eventually(lambda: len(joined()) == 5, timeout=30)
        serving.set()
        assert installing.wait(30)
        for _ in range(3):  # while installing
            fleet.install("dev-j", bundle, rollout="r1")
        assert eventually(lambda: len(statuses(collector, "dev-j", "VERIFYING")) == 3, timeout=30)
        release.set()
        assert eventually(lambda: {s.rollout for s in statuses(collector, "dev-j", "SUCCEEDED")} == {"r1", "r2"},
                          timeout=30)
        link._installs.submit(lambda: None).result(30)  # anything queued behind the install has run
    finally:
        release.set()
        fleet.close()
    assert len(made) == 1 and len(installs) == 1  # one Transfer object, one install
    assert sorted(s.rollout for s in statuses(collector, "dev-j", "SUCCEEDED")) == ["r1", "r2"]
    assert not statuses(collector, "dev-j", "FAILED")
    assert agent.model("digits").version == "1" and not list((agent.config.state_dir / "transfers").iterdir())


def test_an_install_command_naming_another_version_than_its_bundle_is_refused(make_link, broker, collector, eventually,
                                                                              digits_bundle) -> None:
    agent, link = make_link("dev-v")
    bundle = digits_bundle.path.read_bytes()
    fleet = FleetStandIn(broker.port, bundle, 32 * 1024)
    try:
        fleet.install("dev-v", bundle, version="9")
        assert eventually(lambda: statuses(collector, "dev-v", "FAILED"), timeout=30)
    finally:
        fleet.close()
    (failed,) = statuses(collector, "dev-v", "FAILED")
    assert "the bundle is digits@1, the install command named digits@9" in failed.reason
    assert agent.store.names() == []


def test_rollback_to_what_the_device_does_not_have_is_refused_with_what_it_has(make_link, broker, collector, publisher,
                                                                               eventually, digits_bundle) -> None:
    agent, link = make_link("dev-rb", preinstall=[digits_bundle.path])
    assert eventually(lambda: link.conn.connected.is_set(), timeout=20)
    for model, version, rollout in (("digits", "7", "r-version"), ("nope", "3", "r-model")):
        publisher.send(proto.topic("dev-rb", "cmd"),
                       proto.RollbackCommand(model=model, to_version=version, rollout=rollout).to_payload())
    assert eventually(lambda: len(statuses(collector, "dev-rb", "FAILED")) == 2, timeout=30)
    reasons = {s.rollout: s.reason for s in statuses(collector, "dev-rb", "FAILED")}
    assert "digits@7 is not stored on this device (stored: 1)" in reasons["r-version"]
    assert "no model named 'nope' on this device (models: digits)" in reasons["r-model"]
    assert agent.model("digits").version == "1" and agent.store.active("digits") == "1"
