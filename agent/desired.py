"""The fleet's desired configuration, on the device: applied without a restart, kept across restarts.

The agent's own configuration file is the base. The fleet's desired configuration
(:class:`sdk.protocol.ConfigCommand`, checked at the protocol boundary) lies on top of it,
setting by setting: ``tags`` (merged over the file's), ``threads`` and ``pool_size`` (every
active model is reloaded with them, and swapped in as an install is: requests keep being
served), ``heartbeat_interval`` (the next heartbeat follows it), ``work_slots`` (the link runs
that many tasks at once from its next task on) and ``models`` (a model pinned to a version: the
stored version is activated, a rollout of another version is refused, a version the device does
not hold is noted). A setting the fleet stops desiring returns to the file's value.

The last command is kept in ``<state_dir>/desired-config.json`` (written atomically) and applied
again at start, before the models load. What the device runs is reported back
(:meth:`DesiredState.reported`), with the revision it applied and a note of what it could not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk import protocol as proto
from sdk.errors import EdgeSdkError, ProtocolError

log = logging.getLogger("edgesdk.agent.desired")

__all__ = ["DesiredState", "FILE_NAME", "SETTINGS"]

FILE_NAME = "desired-config.json"

#: settings whose value the configuration file gives when the fleet does not
_FROM_FILE = ("threads", "pool_size", "heartbeat_interval", "work_slots")
#: the agent configuration's attributes the desired configuration can set
SETTINGS = ("tags", *_FROM_FILE)


@dataclass
class DesiredState:
    """The desired configuration an agent last received, and the file's own values under it."""

    path: Path
    base: dict[str, Any]  # the file's values of the settings, and its tags
    config: dict[str, Any] = field(default_factory=dict)
    revision: int = 0
    note: str = ""

    @classmethod
    def load(cls, state_dir: Path, agent_config: Any) -> "DesiredState":
        """The state kept in ``state_dir`` (nothing desired when there is none, or it is unreadable)."""
        base = {k: getattr(agent_config, k) for k in _FROM_FILE}
        base["tags"] = dict(agent_config.tags)
        state = cls(state_dir / FILE_NAME, base)
        try:
            kept = json.loads(state.path.read_text())
            cmd = proto.ConfigCommand(revision=int(kept["revision"]), config=kept["config"])
            cmd.validate()
        except FileNotFoundError:
            return state
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("ignoring %s: %s", state.path, exc)
            return state
        state.config, state.revision = dict(cmd.config), cmd.revision
        return state

    def effective(self, key: str) -> Any:
        """A setting's value now: the desired one, else the file's (tags: the file's, desired on top)."""
        if key == "tags":
            return {**self.base["tags"], **self.config.get("tags", {})}
        return self.config.get(key, self.base[key])

    @property
    def pins(self) -> dict[str, str]:
        """Models pinned to a version: model -> version."""
        return self.config.get("models", {})

    def accept(self, cmd: proto.ConfigCommand) -> None:
        """Take a newer command and keep it (an older or repeated one changes nothing)."""
        self.config, self.revision = dict(cmd.config), cmd.revision
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"revision": cmd.revision, "config": cmd.config}, sort_keys=True))
        tmp.replace(self.path)

    def apply(self, agent: Any) -> str:
        """Make ``agent`` run the effective settings; returns the note of what could not be applied."""
        cfg = agent.config
        notes = []
        cfg.tags = self.effective("tags")
        cfg.heartbeat_interval = float(self.effective("heartbeat_interval"))
        cfg.work_slots = int(self.effective("work_slots"))
        threads, pool = int(self.effective("threads")), int(self.effective("pool_size"))
        if (threads, pool) != (cfg.threads, cfg.pool_size):
            cfg.threads, cfg.pool_size = threads, pool
            agent.options.num_threads = threads
            try:
                agent.reload_models()
            except EdgeSdkError as exc:
                notes.append(f"threads/pool_size: {exc}")
        for model, version in sorted(self.config.get("models", {}).items()):
            active = agent.active_versions().get(model)
            if active == version:
                continue
            if version not in agent.store.versions(model):
                notes.append(f"models.{model}: version {version} is not on this device (deploy it)")
                continue
            try:
                agent.rollback(model, to_version=version)
            except EdgeSdkError as exc:
                notes.append(f"models.{model}: {exc}")
        self.note = proto.clip_text("; ".join(notes))
        return self.note

    def reported(self, agent: Any) -> dict[str, Any]:
        """What the device runs, as the fleet compares it with what it desires."""
        cfg = agent.config
        return {"tags": dict(cfg.tags), "threads": int(cfg.threads), "pool_size": int(cfg.pool_size),
                "heartbeat_interval": float(cfg.heartbeat_interval), "work_slots": int(cfg.work_slots),
                "models": agent.active_versions()}
