"""Desired state: the configuration an operator wants each device to run, and where it differs.

Entries are kept per tag (``site=berlin``: every device whose reported tags include it) and per
device; a device's desired configuration is its tags' entries merged in the order of their tag
(``a=1`` before ``b=2``), then its own entry on top, key by key (``tags`` and ``models`` merge
their keys too). The settings are :data:`sdk.protocol.CONFIG_FIELDS`: ``tags``, ``threads``,
``pool_size``, ``heartbeat_interval``, ``work_slots`` and ``models`` (a model pinned to a
version). Every change takes the next **revision**; a device's desired revision is the highest of
the entries that make it up.

The fleet sends a :class:`~sdk.protocol.ConfigCommand` to a device whose reported
``config_revision`` is behind its desired revision: when the device comes online (so an offline
device converges when it returns), when an entry changes, and again every ``resend_s`` while it
has not caught up. The agent applies what it can without a restart and reports what it runs; the
**drift** is every desired setting whose reported value differs (``fleet devices`` and the
dashboard show it), plus the agent's note on what it could not apply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from sdk import protocol as proto
from sdk.errors import ConfigError, ProtocolError

from .registry import matches, parse_tags
from .storage import FleetDB, dumps, loads

__all__ = ["ConfigEntry", "DesiredConfig", "set_config", "unset_config", "entries", "desired_for", "drift",
           "parse_settings", "ConfigSender", "config_state"]

#: settings that merge key by key across entries (the others: the later entry wins)
_MAPS = ("tags", "models")


@dataclass
class ConfigEntry:
    scope: str  # "device" | "tag"
    target: str  # a device id, or "key=value"
    config: dict[str, Any]
    revision: int
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "target": self.target, "config": self.config, "revision": self.revision,
                "updated": self.updated}


@dataclass
class DesiredConfig:
    """A device's desired configuration (``{}``: nothing desired) and its revision (0: none)."""

    config: dict[str, Any] = field(default_factory=dict)
    revision: int = 0


def parse_settings(pairs: Iterable[str]) -> dict[str, Any]:
    """``["threads=2", "tags.site=berlin", "models.digits=3"]`` → a configuration, checked as the
    protocol checks it (ConfigError naming the setting when it is not one, or not of its type)."""
    import json

    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"setting {pair!r}: use KEY=VALUE (tags.KEY=VALUE and models.MODEL=VERSION for maps)")
        head, dot, sub = key.partition(".")
        if head in _MAPS:
            if not dot or not sub:
                raise ConfigError(f"setting {pair!r}: use {head}.NAME=VALUE")
            config.setdefault(head, {})[sub] = value.strip()
            continue
        if dot:
            raise ConfigError(f"setting {pair!r}: {head} is not a map")
        try:
            config[head] = json.loads(value)
        except ValueError:
            config[head] = value.strip()
    check(config)
    return config


def check(config: Mapping[str, Any]) -> None:
    try:
        proto._config("config", dict(config))
    except ProtocolError as exc:
        raise ConfigError(f"desired configuration: {exc}") from exc


def _scope_target(device: Optional[str], tag: Optional[str]) -> tuple[str, str]:
    if (device is None) == (tag is None):
        raise ConfigError("say whose configuration: --device ID or --tag KEY=VALUE")
    if device is not None:
        if not proto.ID_PATTERN.fullmatch(device):
            raise ConfigError(f"device {device!r} is not a device id")
        return "device", device
    tags = parse_tags(tag)
    if len(tags) != 1:
        raise ConfigError(f"--tag {tag!r}: give one KEY=VALUE")
    (key, value), = tags.items()
    return "tag", f"{key}={value}"


def _next_revision(db: FleetDB) -> int:
    return int(db.scalar("SELECT COALESCE(MAX(revision), 0) FROM desired") or 0) + 1


def set_config(db: FleetDB, *, device: Optional[str] = None, tag: Optional[str] = None,
               settings: Mapping[str, Any], now: float) -> int:
    """Merge ``settings`` into the entry of a device or a tag; returns the new revision."""
    check(settings)
    scope, target = _scope_target(device, tag)
    with db.transaction():
        row = db.one("SELECT config FROM desired WHERE scope = ? AND target = ?", (scope, target))
        config = loads(row["config"]) if row else {}
        for key, value in settings.items():
            config[key] = {**config.get(key, {}), **value} if key in _MAPS else value
        check(config)
        revision = _next_revision(db)
        db.execute("INSERT INTO desired (scope, target, config, revision, updated) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT (scope, target) DO UPDATE SET config = excluded.config, revision = excluded.revision, "
                   "updated = excluded.updated", (scope, target, dumps(config), revision, now))
    return revision


def unset_config(db: FleetDB, *, device: Optional[str] = None, tag: Optional[str] = None,
                 keys: Iterable[str] = (), now: float) -> int:
    """Remove settings (``threads``, ``tags.site``, ``models.digits``; none: the whole entry)."""
    scope, target = _scope_target(device, tag)
    keys = list(keys)
    with db.transaction():
        row = db.one("SELECT config FROM desired WHERE scope = ? AND target = ?", (scope, target))
        if row is None:
            raise ConfigError(f"no desired configuration for {scope} {target}")
        config = loads(row["config"])
        for key in keys:
            head, _, sub = key.partition(".")
            if sub and head in _MAPS:
                config.get(head, {}).pop(sub, None)
            else:
                config.pop(head, None)
        revision = _next_revision(db)
        if not keys or not config:
            # a removed entry still moves the revision on, so devices hear that it is gone
            db.execute("UPDATE desired SET config = '{}', revision = ?, updated = ? WHERE scope = ? AND target = ?",
                       (revision, now, scope, target))
        else:
            db.execute("UPDATE desired SET config = ?, revision = ?, updated = ? WHERE scope = ? AND target = ?",
                       (dumps(config), revision, now, scope, target))
    return revision


def entries(db: FleetDB) -> list[ConfigEntry]:
    return [ConfigEntry(r["scope"], r["target"], loads(r["config"]), int(r["revision"]), float(r["updated"]))
            for r in db.all("SELECT * FROM desired ORDER BY scope DESC, target")]


def desired_for(all_entries: Iterable[ConfigEntry], device: str, tags: Mapping[str, str]) -> DesiredConfig:
    """The device's desired configuration: its tags' entries in tag order, then its own."""
    config: dict[str, Any] = {}
    revision = 0
    ordered = sorted((e for e in all_entries if e.scope == "tag"), key=lambda e: e.target)
    ordered += [e for e in all_entries if e.scope == "device" and e.target == device]
    for e in ordered:
        if e.scope == "tag" and not matches(tags, parse_tags(e.target)):
            continue
        revision = max(revision, e.revision)
        for key, value in e.config.items():
            config[key] = {**config.get(key, {}), **value} if key in _MAPS else value
    return DesiredConfig(config, revision)


def drift(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every desired setting whose reported value differs: ``{setting: {"desired", "reported"}}``."""
    out = {}
    for key, want in desired.items():
        have = reported.get(key)
        if key in _MAPS:
            for sub, v in want.items():
                h = (have or {}).get(sub)
                if h != v:
                    out[f"{key}.{sub}"] = {"desired": v, "reported": h}
        elif have != want:
            out[key] = {"desired": want, "reported": have}
    return out


def config_state(device: Any) -> str:
    """``-`` (nothing desired), ``in sync``, ``pending`` (not applied yet) or ``drift`` (applied,
    but what it runs differs, or it noted what it could not apply) for a DeviceInfo."""
    if not device.desired_revision:
        return "-"
    if device.config_revision < device.desired_revision:
        return "pending"
    return "drift" if device.drift or device.config_note else "in sync"


class ConfigSender:
    """The engine's part: send each device that is behind its desired revision a ConfigCommand
    (on its status, when entries change, and every ``resend_s`` until it catches up)."""

    def __init__(self, db: FleetDB, send: Callable[[str, proto.ConfigCommand], None], *,
                 clock: Callable[[], float] = time.monotonic, resend_s: float = 30.0) -> None:
        self.db = db
        self.send = send
        self.clock = clock
        self.resend_s = resend_s
        self._entries: Optional[list[ConfigEntry]] = None
        self._revision = -1
        self._sent: dict[str, tuple[int, float]] = {}  # device -> (revision sent, when)

    def _current(self) -> list[ConfigEntry]:
        revision = int(self.db.scalar("SELECT COALESCE(MAX(revision), 0) FROM desired") or 0)
        if revision != self._revision or self._entries is None:
            self._entries, self._revision = entries(self.db), revision
        return self._entries

    def on_status(self, status: proto.Status) -> None:
        """A device's status: send it its configuration when it is behind (against the entries the
        last tick read: no query per status; an entry changed since is sent by the next tick)."""
        if status.online and self._entries:
            self._offer(status.device, status.tags, status.config_revision)

    def tick(self) -> None:
        """Entries changed, or a device did not catch up: (re)send to the online devices that are behind."""
        before = self._revision
        current = self._current()
        if not current:
            return
        changed = self._revision != before
        due = self.clock() - self.resend_s
        if not changed and not any(when < due for _, when in self._sent.values()):
            return
        for r in self.db.all("SELECT id, tags, status FROM devices WHERE online = 1"):
            try:
                reported = int(loads(r["status"]).get("config_revision") or 0)
                tags = loads(r["tags"])
            except (ValueError, TypeError, AttributeError):
                continue  # an unreadable row: its next status puts it right
            self._offer(r["id"], tags, reported)

    def _offer(self, device: str, tags: Mapping[str, str], reported: int) -> None:
        wanted = desired_for(self._entries or [], device, tags)
        if wanted.revision <= reported:
            self._sent.pop(device, None)
            return
        sent = self._sent.get(device)
        if sent is not None and sent[0] == wanted.revision and self.clock() - sent[1] < self.resend_s:
            return
        self._sent[device] = (wanted.revision, self.clock())
        self.send(device, proto.ConfigCommand(revision=wanted.revision, config=wanted.config))
