"""The device registry: who is alive, since when, and what each device runs.

Presence comes from the agents' retained :class:`~sdk.protocol.Status` (online at connect, the
Last-Will ``online=False`` when a device dies) and liveness figures from heartbeats. The
registry keeps the last of each per device in the fleet database.

Who sent a message is what its topic says (the broker's ACL lets a device publish on its own
topics only), never what the message claims: :func:`read_device_message` is the one decoder of
device messages for every fleet path that reads them (the engine and
:meth:`fleet.Fleet.refresh_registry`), and it refuses a message that speaks for another device
or arrives on a channel that does not carry its kind.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from sdk import protocol as proto
from sdk.errors import ConfigError, ProtocolError

from .deltas import held_bundles, record_held
from .storage import FleetDB, dumps, loads

__all__ = ["DeviceInfo", "Registry", "parse_tags", "matches", "read_device_message", "SpoofedMessage",
           "read_retained_statuses"]

log = logging.getLogger("edgesdk.fleet.registry")

#: the channel each kind of device message travels on; every other kind comes on ``up``
_CHANNEL_OF: dict[type, str] = {proto.Status: "status", proto.Heartbeat: "heartbeat"}


class SpoofedMessage(ProtocolError):
    """A well-formed message that speaks for another device than its topic's, or came on the
    wrong channel: dropped (and counted apart from malformed ones)."""


def read_device_message(topic: str, payload: bytes) -> tuple[str, proto.Message]:
    """Decode a message a device published: ``(device of the topic, message)``.

    Raises :class:`~sdk.errors.ProtocolError` for a topic or payload that does not decode, and
    :class:`SpoofedMessage` for one whose ``device`` field is not the topic's device or whose
    kind does not travel on the topic's channel.
    """
    device, channel = proto.parse_topic(topic)
    msg = proto.decode(payload)
    claimed = getattr(msg, "device", device)
    if claimed != device:
        raise SpoofedMessage(f"a {msg.TYPE} on {topic} claims to come from {claimed!r}")
    expected = _CHANNEL_OF.get(type(msg), "up")
    if channel != expected:
        raise SpoofedMessage(f"a {msg.TYPE} on {topic}: it travels on {expected!r}, not {channel!r}")
    return device, msg


@dataclass
class DeviceInfo:
    id: str
    online: bool
    since: Optional[float]
    last_seen: Optional[float]
    agent_version: str = ""
    runtime: dict[str, str] = field(default_factory=dict)
    delegates: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    accepting_work: bool = True
    heartbeat: dict[str, Any] = field(default_factory=dict)  # model -> {version, p50_ms, requests, errors, ...}
    heartbeat_at: Optional[float] = None
    bundles: list[str] = field(default_factory=list)  # sha256 of the bundles it reported holding
    #: the configuration it reports running, the desired revision it applied, and its note on
    #: what it could not apply; the fleet's desired configuration for it and where the two differ
    #: (filled by :meth:`fleet.Fleet.devices`, see :mod:`fleet.desired`)
    config: dict[str, Any] = field(default_factory=dict)
    config_revision: int = 0
    config_note: str = ""
    desired: dict[str, Any] = field(default_factory=dict)
    desired_revision: int = 0
    drift: dict[str, Any] = field(default_factory=dict)
    #: ``-`` (nothing desired), ``in sync``, ``pending`` (not applied yet) or ``drift``
    config_state: str = "-"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_tags(pairs: Any) -> dict[str, str]:
    """``["site=berlin", "hw=coral"]`` or ``"site=berlin,hw=coral"`` → dict (ConfigError when malformed)."""
    if not pairs:
        return {}
    if isinstance(pairs, Mapping):
        return {str(k): str(v) for k, v in pairs.items()}
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(",") if p.strip()]
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"tag {p!r}: use KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def matches(tags: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(tags.get(k) == v for k, v in selector.items())


class Registry:
    """The devices table. With ``cache`` (the engine's registry), it also keeps every device's
    presence and tags in memory (:meth:`presence`), read once and then kept current by the
    statuses it stores, so the dispatcher never reads the whole table."""

    def __init__(self, db: FleetDB, *, cache: bool = False) -> None:
        self.db = db
        self._presence: Optional[dict[str, tuple[bool, dict[str, str]]]] = None
        self._held: dict[str, list[str]] = {}  # (cache) the bundles each device's last status listed
        if cache:
            self._presence = {}
            for r in db.all("SELECT id, online, tags FROM devices"):
                try:
                    self._presence[r["id"]] = (bool(r["online"]), loads(r["tags"]))
                except ValueError:  # a row changed behind the fleet's back: no work for it until its next status
                    log.warning("device %s has unreadable tags in the database", r["id"])

    def presence(self, device: str) -> tuple[bool, dict[str, str]]:
        """``(online, tags)`` of ``device`` ((False, {}) when unknown)."""
        if self._presence is not None:
            return self._presence.get(device, (False, {}))
        row = self.db.one("SELECT online, tags FROM devices WHERE id = ?", (device,))
        return (bool(row["online"]), loads(row["tags"])) if row else (False, {})

    def on_status(self, status: proto.Status, now: float) -> bool:
        """Store a status; return True when the device came online (it was offline or unknown)."""
        if self._presence is not None:  # the engine's registry knows without asking the database
            known = self._presence.get(status.device)
            row = None if known is None else {"online": known[0]}
            self._presence[status.device] = (status.online, dict(status.tags))
        else:
            row = self.db.one("SELECT online FROM devices WHERE id = ?", (status.device,))
        was_online = bool(row and row["online"])
        changed = row is None or was_online != status.online
        since = now if changed else None
        self.db.execute(
            "INSERT INTO devices (id, online, since, last_seen, status, tags) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET online = excluded.online, since = COALESCE(?, devices.since), "
            "last_seen = excluded.last_seen, status = excluded.status, tags = excluded.tags",
            (status.device, int(status.online), now, now, dumps(status.to_dict()), dumps(status.tags), since),
        )
        if status.online and self._held.get(status.device) != status.bundles:
            # (a Last-Will's list is as old as the connection: not news; an unchanged list is not either)
            record_held(self.db, status.device, status.bundles, now, replace=True)
            if self._presence is not None:
                self._held[status.device] = list(status.bundles)
        return status.online and not was_online

    def on_install_status(self, msg: proto.InstallStatus, now: float) -> None:
        """A SUCCEEDED install names the bundle the device holds now."""
        if msg.state == "SUCCEEDED" and msg.bundle_sha256:
            record_held(self.db, msg.device, [msg.bundle_sha256], now, replace=False)
            self._held.pop(msg.device, None)  # the next status's list is news again

    def on_heartbeat(self, hb: proto.Heartbeat, now: float) -> None:
        if self._presence is not None and hb.device not in self._presence:
            self._presence[hb.device] = (True, {})  # as the row it makes: online, tags unknown until its status
        self.db.execute(
            "INSERT INTO devices (id, online, since, last_seen, heartbeat, heartbeat_at) VALUES (?, 1, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, heartbeat = excluded.heartbeat, "
            "heartbeat_at = excluded.heartbeat_at",
            (hb.device, now, now, dumps({"uptime_s": hb.uptime_s, "models": hb.models,
                                          "outbox_pending": hb.outbox_pending}), now),
        )

    def online_ids(self) -> set[str]:
        return {r["id"] for r in self.db.all("SELECT id FROM devices WHERE online = 1")}

    def get(self, device: str) -> Optional[DeviceInfo]:
        row = self.db.one("SELECT * FROM devices WHERE id = ?", (device,))
        return _info(row, held_bundles(self.db, device)) if row else None

    def list(self, selector: Optional[Mapping[str, str]] = None) -> list[DeviceInfo]:
        held: dict[str, list[str]] = {}
        for r in self.db.all("SELECT device, sha256 FROM device_bundles ORDER BY sha256"):
            held.setdefault(r["device"], []).append(r["sha256"])
        devices = [_info(r, held.get(r["id"], [])) for r in self.db.all("SELECT * FROM devices ORDER BY id")]
        return [d for d in devices if matches(d.tags, selector or {})]


def _info(row: Any, bundles: list[str]) -> DeviceInfo:
    status = loads(row["status"])
    hb = loads(row["heartbeat"])
    return DeviceInfo(
        id=row["id"], online=bool(row["online"]), since=row["since"], last_seen=row["last_seen"],
        agent_version=status.get("agent_version", ""), runtime=status.get("runtime", {}),
        delegates=status.get("delegates", []), models=status.get("models", {}), tags=loads(row["tags"]),
        accepting_work=status.get("accepting_work", True), heartbeat=hb.get("models", {}),
        heartbeat_at=row["heartbeat_at"], bundles=bundles, config=status.get("config", {}),
        config_revision=int(status.get("config_revision") or 0), config_note=status.get("config_note", ""),
    )


def read_retained_statuses(settings: Any, seconds: float) -> list[proto.Status]:
    """Connect for ``seconds`` and collect the retained presence of every device (what ``edgesdk
    fleet devices`` reads when no controller keeps the registry current). Statuses that do not
    decode, or speak for another device than their topic's, are left out."""
    import dataclasses
    import logging
    import queue
    import time

    from sdk.errors import BrokerError
    from sdk.mqtt import MqttConnection

    received: "queue.Queue[tuple[str, bytes]]" = queue.Queue()
    probe = dataclasses.replace(settings, client_id="", persistent_session=False)
    conn = MqttConnection(probe, lambda t, p: received.put((t, p)), [(proto.subscription("status"), 1)])
    statuses = []
    try:
        conn.start()
        if not conn.wait_connected(10):
            raise BrokerError(f"cannot connect to the MQTT broker at {probe.host}:{probe.port}")
        time.sleep(seconds)
    finally:
        conn.stop()
    while not received.empty():
        topic, payload = received.get()
        try:
            _, msg = read_device_message(topic, payload)
        except ProtocolError as exc:  # malformed, or speaking for another device than its topic's
            logging.getLogger("edgesdk.fleet").warning("ignored a status on %s: %s", topic, exc)
            continue
        if isinstance(msg, proto.Status):
            statuses.append(msg)
    return statuses
