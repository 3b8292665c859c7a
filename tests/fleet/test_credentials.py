"""Per-device credentials on a real Mosquitto started from exactly the files ``edgesdk fleet
credentials init`` writes: the ACL matrix (one test per cell, so ``pytest -v`` lists it), refused
connections (no certificate, another CA, a revoked device), and a real agent and a real
:class:`fleet.Fleet` working through the locked-down broker.

How a cell is checked: Mosquitto 2.0.11 answers a denied QoS-1 publish with PUBACK reason 0x87
(MQTT 5; MQTT 3.1.1 has no reason codes and drops it silently) and grants every subscription,
then withholds each message the subscriber may not read. So every cell checks delivery: after the
probe message, a legitimate publisher sends a sentinel that must reach the same receiver; the
broker handles messages in order, so a probe that was let through would have arrived first.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import stat
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from fleet.credentials import DEVICE_READS, DEVICE_WRITES, FLEET_IDENTITY, CredentialsStore, check_device_id
from sdk import protocol as proto
from sdk.errors import ConfigError, NotFoundError

DEVICE, OTHER = "dev-a", "dev-b"
FLEET = FLEET_IDENTITY
#: the directions the protocol gives the channels (sdk/protocol.py's docstring), written out here
#: rather than taken from fleet.credentials, so the matrix checks the ACL against the protocol
AGENT_SENDS = ("status", "heartbeat", "up")
FLEET_SENDS = ("cmd", "chunk", "task")
NOT_AUTHORIZED = 0x87


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a client with one identity's credentials ----------------------------------------------------
class Peer:
    """A paho client that records what it receives and what the broker answered. It does not
    reconnect within a test (a connection the broker closed stays closed and is counted)."""

    def __init__(self, port: int, ca: Path, cert: Path | None, key: Path | None, *, protocol: str = "5",
                 client_id: str = "") -> None:
        self.port = port
        self.v5 = protocol == "5"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)
        self.client.reconnect_delay_set(60, 60)
        self.answers: "queue.Queue[tuple[str, object]]" = queue.Queue()
        self.acks: dict[int, int] = {}
        self.granted: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.disconnects = 0
        self.changed = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self.answers.put(("connack", rc))
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = lambda c, u, mid, rc, p: self._record(self.acks, mid, rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._record(self.granted, mid, [r.value for r in rcs])

    def _on_disconnect(self, client, userdata, flags, rc, properties) -> None:
        self.disconnects += 1
        self.answers.put(("disconnect", rc))

    def _on_message(self, client, userdata, msg) -> None:
        self._record(None, None, (msg.topic, msg.payload))

    def _record(self, table: dict | None, key: object, value: object) -> None:
        with self.changed:
            if table is None:
                self.messages.append(value)  # type: ignore[arg-type]
            else:
                table[key] = value
            self.changed.notify_all()

    def _wait(self, predicate, timeout: float = 10.0):
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def connect(self, timeout: float = 10.0) -> str:
        """``"connected"``, ``"refused: why"``, or ``"no answer"`` (a broker that neither accepts nor refuses)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:  # TLS 1.2: the handshake itself fails
            return f"refused: {exc}"
        self.client.loop_start()
        try:
            kind, rc = self.answers.get(timeout=timeout)
        except queue.Empty:
            return "no answer"
        if kind == "connack" and not rc.is_failure:
            return "connected"
        return f"refused: {kind} {rc}"  # TLS 1.3: the server's alert arrives after the handshake

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1; the PUBACK's reason code (always 0 for MQTT 3.1.1)."""
        mid = self.client.publish(topic, payload, qos=1).mid
        assert self._wait(lambda: mid in self.acks), f"no PUBACK for {topic}"
        return self.acks[mid]

    def subscribe(self, topic: str) -> list[int]:
        """QoS 1; the SUBACK's codes."""
        mid = self.client.subscribe(topic, qos=1)[1]
        assert self._wait(lambda: mid in self.granted), f"no SUBACK for {topic}"
        return self.granted[mid]

    def payloads(self, topic: str) -> list[bytes]:
        with self.changed:
            return [p for t, p in self.messages if t == topic]

    def wait_for(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        return self._wait(lambda: (topic, payload) in self.messages, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the locked-down broker ------------------------------------------------------------------------
@dataclass
class Lockdown:
    store: CredentialsStore
    broker: object  # tests/conftest.py MosquittoBroker
    files: dict[str, tuple[Path, Path, Path]]  # identity -> (ca, cert, key)


def _identity_files(store: CredentialsStore, devices) -> dict[str, tuple[Path, Path, Path]]:
    fleet = store.fleet()
    files = {FLEET: (fleet.ca_file, fleet.client_cert, fleet.client_key)}
    files.update({c.device: (c.ca_file, c.client_cert, c.client_key) for c in devices})
    return files


def _locked_down(root: Path, make, *devices: str) -> Lockdown:
    """A credentials directory with ``devices`` issued and a Mosquitto run from its broker/ files."""
    port = _free_port()
    store = CredentialsStore(root / "credentials")
    files = store.init(port=port, bind="127.0.0.1")
    issued = store.issue(*devices)
    broker = make(include_dir=files.directory, port=port)
    return Lockdown(store, broker, _identity_files(store, issued))


@pytest.fixture(scope="module")
def lockdown(tmp_path_factory, make_module_broker) -> Lockdown:
    return _locked_down(tmp_path_factory.mktemp("lockdown"), make_module_broker, DEVICE, OTHER)


class Peers:
    """One connected :class:`Peer` per identity, made when first used, closed after the test."""

    def __init__(self, lock: Lockdown, protocol: str = "5") -> None:
        self.lock, self.protocol = lock, protocol
        self.made: dict[str, Peer] = {}

    def __getitem__(self, identity: str) -> Peer:
        if identity not in self.made:
            peer = Peer(self.lock.broker.port, *self.lock.files[identity], protocol=self.protocol)
            assert peer.connect() == "connected", identity
            self.made[identity] = peer
        return self.made[identity]

    def close(self) -> None:
        for peer in self.made.values():
            peer.close()


@pytest.fixture
def peers(lockdown):
    p = Peers(lockdown)
    yield p
    p.close()


def _unique() -> bytes:
    return uuid.uuid4().hex.encode()


# --- the matrix ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    actor: str  # DEVICE or FLEET
    action: str  # "publish" | "subscribe"
    owner: str  # a device id, "+" (every device) or "fleet" (the fleet's presence topic)
    channel: str
    allowed: bool

    @property
    def topic(self) -> str:
        if self.owner == "fleet":
            return proto.fleet_topic()
        return proto.subscription(self.channel, self.owner)

    @property
    def concrete_topic(self) -> str:
        """The topic a message is published on: for ``+``, another device's (the fleet's: dev-a's)."""
        if self.owner != "+":
            return self.topic
        return proto.topic(DEVICE if self.actor == FLEET else OTHER, self.channel)

    def __str__(self) -> str:
        where = "fleet/status" if self.owner == "fleet" else f"devices/{self.owner}/{self.channel}"
        if self.owner == "+":
            where += f" ({proto.parse_topic(self.concrete_topic)[0]}'s messages)"
        return f"{self.actor} {self.action} {where}: {'allowed' if self.allowed else 'denied'}"


def _cells() -> list[Cell]:
    device_pub = [Cell(DEVICE, "publish", owner, ch, owner == DEVICE and ch in AGENT_SENDS)
                  for ch in (*AGENT_SENDS, *FLEET_SENDS) for owner in (DEVICE, OTHER)]
    device_pub.append(Cell(DEVICE, "publish", "fleet", "status", False))
    device_sub = [Cell(DEVICE, "subscribe", owner, ch, owner == DEVICE)
                  for ch in FLEET_SENDS for owner in (DEVICE, OTHER, "+")]
    device_sub += [Cell(DEVICE, "subscribe", OTHER, ch, False) for ch in AGENT_SENDS]
    device_sub.append(Cell(DEVICE, "subscribe", "fleet", "status", True))
    fleet_pub = [Cell(FLEET, "publish", DEVICE, ch, ch in FLEET_SENDS) for ch in (*FLEET_SENDS, *AGENT_SENDS)]
    fleet_pub.append(Cell(FLEET, "publish", "fleet", "status", True))
    fleet_sub = [Cell(FLEET, "subscribe", "+", ch, ch in AGENT_SENDS) for ch in (*AGENT_SENDS, *FLEET_SENDS)]
    fleet_sub.append(Cell(FLEET, "subscribe", "fleet", "status", True))
    return device_pub + device_sub + fleet_pub + fleet_sub


MATRIX = _cells()


def _writer(topic: str) -> str:
    """Who may publish on ``topic``: the device itself for what devices send, else the fleet."""
    if topic == proto.fleet_topic():
        return FLEET
    device, channel = proto.parse_topic(topic)
    return device if channel in AGENT_SENDS else FLEET


def _reader(topic: str, actor: str) -> str:
    """Who may receive ``topic`` (other than ``actor`` where there is such a client)."""
    if topic == proto.fleet_topic():
        return OTHER if actor != FLEET else DEVICE
    device, channel = proto.parse_topic(topic)
    return FLEET if channel in AGENT_SENDS else device


def _sentinel_topic(cell: Cell) -> str:
    """A topic the actor may read, on another channel than the cell's."""
    if cell.actor == FLEET:
        return proto.topic(DEVICE, "up" if cell.channel != "up" else "heartbeat")
    return proto.topic(DEVICE, "cmd" if cell.channel != "cmd" else "chunk")


def _check_publish(cell: Cell, peers: Peers) -> bool:
    topic = cell.concrete_topic
    receiver = peers[_reader(topic, cell.actor)]
    receiver.subscribe(topic)
    probe, sentinel = _unique(), _unique()
    code = peers[cell.actor].publish(topic, probe)
    assert code == (0 if cell.allowed else NOT_AUTHORIZED), f"{cell}: PUBACK reason {code:#x}"
    assert peers[_writer(topic)].publish(topic, sentinel) == 0
    assert receiver.wait_for(topic, sentinel), f"{cell}: the sentinel never arrived"
    return probe in receiver.payloads(topic)


def _check_subscribe(cell: Cell, peers: Peers) -> bool:
    actor = peers[cell.actor]
    actor.subscribe(cell.topic)  # Mosquitto 2.0.11 grants it either way; delivery is what the ACL decides
    topic, probe = cell.concrete_topic, _unique()
    assert peers[_writer(topic)].publish(topic, probe) == 0
    sentinel_topic, sentinel = _sentinel_topic(cell), _unique()
    actor.subscribe(sentinel_topic)
    assert peers[_writer(sentinel_topic)].publish(sentinel_topic, sentinel) == 0
    assert actor.wait_for(sentinel_topic, sentinel), f"{cell}: the sentinel never arrived"
    return probe in actor.payloads(topic)


@pytest.mark.parametrize("cell", MATRIX, ids=str)
def test_acl(cell: Cell, peers: Peers) -> None:
    check = _check_publish if cell.action == "publish" else _check_subscribe
    assert check(cell, peers) == cell.allowed, str(cell)


def test_mqtt_311_clients_are_denied_the_same_publishes_silently(lockdown) -> None:
    """MQTT 3.1.1 has no reason codes: the broker acknowledges a denied publish and drops it."""
    peers = Peers(lockdown, protocol="3.1.1")
    try:
        denied = [c for c in MATRIX if c.action == "publish" and not c.allowed]
        for cell in denied:
            topic = cell.concrete_topic
            receiver = peers[_reader(topic, cell.actor)]
            receiver.subscribe(topic)
            probe, sentinel = _unique(), _unique()
            assert peers[cell.actor].publish(topic, probe) == 0, str(cell)
            assert peers[_writer(topic)].publish(topic, sentinel) == 0
            assert receiver.wait_for(topic, sentinel), f"{cell}: the sentinel never arrived"
            assert probe not in receiver.payloads(topic), str(cell)
        allowed = [c for c in MATRIX if c.action == "publish" and c.allowed]
        assert allowed and all(_check_publish(c, peers) for c in allowed)  # and the allowed ones still pass
    finally:
        peers.close()


def test_the_matrix_covers_every_channel_both_ways() -> None:
    """A new channel in sdk.protocol needs an ACL rule (and cells here) before it can be used."""
    assert set(AGENT_SENDS) | set(FLEET_SENDS) == set(proto.CHANNELS)
    assert (DEVICE_WRITES, DEVICE_READS) == (AGENT_SENDS, FLEET_SENDS)
    for actor in (DEVICE, FLEET):
        for action in ("publish", "subscribe"):
            assert {c.channel for c in MATRIX if c.actor == actor and c.action == action} == set(proto.CHANNELS)


def test_a_device_cannot_take_over_another_clients_session(lockdown) -> None:
    """``use_username_as_clientid``: a device connecting with the fleet's client id does not
    disconnect the fleet (without it, Mosquitto closes the older connection with that id)."""
    fleet = Peer(lockdown.broker.port, *lockdown.files[FLEET], client_id="edgesdk-fleet")
    intruder = Peer(lockdown.broker.port, *lockdown.files[DEVICE], client_id="edgesdk-fleet")
    try:
        assert fleet.connect() == "connected"
        fleet.subscribe(proto.subscription("status"))
        assert intruder.connect() == "connected"
        probe = _unique()
        assert intruder.publish(proto.topic(DEVICE, "status"), probe) == 0
        assert fleet.wait_for(proto.topic(DEVICE, "status"), probe)  # the fleet is still connected
        assert fleet.disconnects == 0
    finally:
        intruder.close()
        fleet.close()


# --- refused connections -------------------------------------------------------------------------
def test_a_client_without_a_certificate_is_refused(lockdown) -> None:
    ca = lockdown.files[DEVICE][0]
    assert Peer(lockdown.broker.port, *lockdown.files[DEVICE]).connect() == "connected"  # the control
    outcome = Peer(lockdown.broker.port, ca, None, None).connect()
    assert outcome.startswith("refused"), outcome


def test_a_certificate_from_another_ca_is_refused(lockdown, tmp_path) -> None:
    foreign = CredentialsStore(tmp_path / "foreign")
    foreign.init()
    (impostor,) = foreign.issue(DEVICE)  # the same CN, another CA
    outcome = Peer(lockdown.broker.port, lockdown.files[DEVICE][0], impostor.client_cert, impostor.client_key).connect()
    assert outcome.startswith("refused"), outcome


def test_the_brokers_own_certificate_is_no_client_certificate(lockdown) -> None:
    files = lockdown.store.broker()
    outcome = Peer(lockdown.broker.port, files.ca_file, files.certfile, files.keyfile).connect()
    assert outcome.startswith("refused"), outcome  # extended key usage: serverAuth only


def test_a_revoked_device_is_refused_after_a_broker_restart(tmp_path, make_broker) -> None:
    lock = _locked_down(tmp_path, make_broker, "lost", "kept")
    live = Peer(lock.broker.port, *lock.files["lost"])
    assert live.connect() == "connected"
    revoked = lock.store.revoke("lost")
    assert [c.identity for c in revoked["lost"]] == ["lost"] and revoked["lost"][0].revoked
    lock.broker.restart()
    outcome = Peer(lock.broker.port, *lock.files["lost"]).connect()
    assert outcome.startswith("refused"), outcome
    assert live.disconnects == 1  # the restart closed the connection it had; it cannot come back
    assert Peer(lock.broker.port, *lock.files["kept"]).connect() == "connected"
    assert Peer(lock.broker.port, *lock.files[FLEET]).connect() == "connected"
    crl = x509.load_pem_x509_crl(lock.store.broker().crlfile.read_bytes())
    assert [r.serial_number for r in crl] == [revoked["lost"][0].serial]
    live.close()


def test_sighup_makes_mosquitto_refuse_new_connections_of_a_revoked_device(tmp_path, make_broker) -> None:
    """What docs/security.md says about reloading: Mosquitto 2.0.11 reads the CRL at start and on
    SIGHUP; a connection already open survives SIGHUP (only a restart closes it)."""
    lock = _locked_down(tmp_path, make_broker, "lost")
    lock.store.revoke("lost")
    live = Peer(lock.broker.port, *lock.files["lost"])
    assert live.connect() == "connected"  # the broker has not re-read the CRL yet
    lock.broker.reload()
    fleet = Peer(lock.broker.port, *lock.files[FLEET])
    assert fleet.connect() == "connected"  # (after the reload: SIGHUP is handled before this connection)
    outcome = Peer(lock.broker.port, *lock.files["lost"]).connect()
    assert outcome.startswith("refused"), outcome
    fleet.subscribe(proto.subscription("status"))
    probe = _unique()
    assert live.publish(proto.topic("lost", "status"), probe) == 0
    assert fleet.wait_for(proto.topic("lost", "status"), probe) and live.disconnects == 0  # still open
    live.close()
    fleet.close()


# --- the store ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [FLEET, "", "../x", "a/b", "+", "#", "%u", ".hidden", "x" * 129, "dev a"])
def test_ids_that_cannot_be_a_device_cn_are_refused(bad: str, tmp_path) -> None:
    with pytest.raises(ConfigError):
        check_device_id(bad)
    store = CredentialsStore(tmp_path / "c")
    store.init()
    with pytest.raises(ConfigError):
        store.issue("fine-1", bad)
    assert not (store.devices_dir / "fine-1").exists()  # every id is checked before anything is written


def test_issue_replace_and_revoke(tmp_path) -> None:
    store = CredentialsStore(tmp_path / "c")
    with pytest.raises(ConfigError, match="credentials init"):
        store.issue("pi-1")
    files = store.init(broker_hosts=["fleet.example", "10.0.0.7"], port=18883)
    server = x509.load_pem_x509_certificate(files.certfile.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fleet.example"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.7"}
    with pytest.raises(ConfigError, match="already holds a fleet CA"):
        store.init()
    (first,) = store.issue("pi-1")
    assert first.broker_url == "mqtts://fleet.example:18883"
    cert = x509.load_pem_x509_certificate(first.client_cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "pi-1"
    with pytest.raises(ConfigError, match="--replace"):
        store.issue("pi-1")
    (second,) = store.issue("pi-1", replace=True)
    assert second.replaced == (first.serial,)
    crl = x509.load_pem_x509_crl(files.crlfile.read_bytes())
    assert [r.serial_number for r in crl] == [first.serial]  # the replaced one is revoked
    assert store.revoke("pi-1") == {"pi-1": [c for c in store.certificates() if c.serial == second.serial]}
    assert store.revoke("pi-1") == {"pi-1": []}  # already revoked: nothing new
    with pytest.raises(NotFoundError):
        store.revoke("never-issued")
    crl = x509.load_pem_x509_crl(files.crlfile.read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted([first.serial, second.serial])


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_cli_writes_private_keys_0600_and_prints_json(edgesdk_cli, tmp_path) -> None:
    state = tmp_path / "fleet"
    base = ["fleet", "--state", state, "credentials"]
    r = edgesdk_cli(*base, "init", "--broker-host", "broker.lan", "--port", "18883", "--json")
    assert r.returncode == 0, r.stderr
    init = json.loads(r.stdout)
    root = state / "credentials"  # the default: under the fleet's state dir
    assert init["directory"] == str(root) and init["broker"]["url"] == "mqtts://broker.lan:18883"
    assert init["fleet"]["cli_options"][:2] == ["--broker", "mqtts://broker.lan:18883"]
    conf = Path(init["broker"]["config"]).read_text()
    for line in ("listener 18883", "require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "tls_version tlsv1.2", "allow_anonymous false",
                 f"acl_file {root / 'broker' / 'acl'}", f"crlfile {root / 'broker' / 'crl.pem'}"):
        assert line + "\n" in conf
    r = edgesdk_cli(*base, "issue", "pi-1", "pi-2", "--install-dir", "/etc/edgesdk", "--json")
    assert r.returncode == 0, r.stderr
    issued = {d["device"]: d for d in json.loads(r.stdout)}
    lines = tomllib.loads(Path(issued["pi-1"]["agent_config"]).read_text())
    assert lines == {"device_id": "pi-1", "broker_url": "mqtts://broker.lan:18883", "ca_file": "/etc/edgesdk/ca.pem",
                     "client_cert": "/etc/edgesdk/client.pem", "client_key": "/etc/edgesdk/client.key"}
    for key in (root / "ca.key", root / "broker" / "server.key", root / "fleet" / "client.key",
                Path(issued["pi-1"]["client_key"]), Path(issued["pi-2"]["client_key"])):
        assert _mode(key) == 0o600, key
    assert _mode(root) == 0o700 and _mode(root / "devices" / "pi-1") == 0o700
    r = edgesdk_cli(*base, "revoke", "pi-2", "--json")
    assert r.returncode == 0, r.stderr
    assert [c["identity"] for c in json.loads(r.stdout)["revoked"]["pi-2"]] == ["pi-2"]
    r = edgesdk_cli(*base, "show", "--json")
    shown = {c["identity"]: c["revoked"] for c in json.loads(r.stdout)["certificates"]}
    assert shown == {"edgesdk-broker": False, FLEET: False, "pi-1": False, "pi-2": True}


@pytest.mark.parametrize("args, code, message", [
    (("issue", FLEET), 2, "the fleet's own identity"),
    (("issue", "ok", "../etc"), 2, "device id '../etc'"),
    (("issue", "pi-1"), 2, "already issued to pi-1"),
    (("revoke", "nobody"), 20, "no certificate was issued to nobody"),
    (("init",), 2, "already holds a fleet CA"),
])
def test_cli_errors_are_one_line(edgesdk_cli, tmp_path, args, code, message) -> None:
    base, d = ["fleet", "credentials"], ["--dir", tmp_path / "c"]
    assert edgesdk_cli(*base, "init", *d).returncode == 0
    assert edgesdk_cli(*base, "issue", "pi-1", *d).returncode == 0
    r = edgesdk_cli(*base, *args, *d)
    assert r.returncode == code and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


# --- end to end ------------------------------------------------------------------------------------------
def test_an_agent_process_and_the_fleet_work_through_the_locked_down_broker(
        tmp_path, make_broker, agent_toml, spawn, make_fleet, edgesdk_cli, eventually, digits_bundle,
        digits_bundle_v2, digits) -> None:
    from agent import Agent
    from agent.config import load_config

    lock = _locked_down(tmp_path, make_broker, "pi-tls")
    creds = lock.store.fleet()
    lines = tomllib.loads((lock.store.devices_dir / "pi-tls" / "agent.toml").read_text())
    device = lines.pop("device_id")
    config = agent_toml(device, **lines)  # the generated lines, in an otherwise ordinary agent.toml
    setup = Agent(load_config(config, env={}))
    setup.install(digits_bundle.path)
    setup.stop()
    spawn("agent", "run", "--config", config, log_name="pi-tls")
    fleet = make_fleet(creds.broker_url, **creds.mqtt_options())
    assert eventually(lambda: [d.id for d in fleet.devices() if d.online] == ["pi-tls"], timeout=60)
    rid = fleet.deploy(digits_bundle_v2.path, devices=["pi-tls"])  # install command and chunks to it
    assert fleet.wait_rollout(rid, timeout=120).state == "SUCCEEDED"
    result = fleet.run("digits", digits.x_test[:40], batch_size=10, timeout=120)  # tasks out, results back
    assert result.outputs[0].shape == (40, 10) and set(result.devices) == {"pi-tls"}
    fleet.stop()
    r = edgesdk_cli("fleet", "--state", tmp_path / "reader", *creds.cli_options(), "devices", "--json")
    assert r.returncode == 0, r.stderr  # the options `credentials init` prints work as they are
    assert [d["id"] for d in json.loads(r.stdout)] == ["pi-tls"]
    assert np.isfinite(result.outputs[0]).all()
