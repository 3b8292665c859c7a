"""The agent's configuration: a TOML file, every key overridable by ``EDGESDK_<KEY>``.

Example (``edgesdk agent install`` writes one like it)::

    device_id = "pi-berlin-07"            # unique per device; default: the host name
    broker_url = "mqtts://fleet.example:8883"   # mqtt:// or mqtts://; a cluster: mqtts://node1:8883,node2:8883
    username = "pi-berlin-07"             # or client_cert + client_key (mutual TLS)
    password = "..."
    ca_file = "/etc/edgesdk/ca.pem"
    client_cert = ""                      # PEM certificate for mutual TLS
    client_key = ""
    state_dir = "/var/lib/edgesdk"        # model store, outbox, local socket
    trusted_keys = ["/etc/edgesdk/public.pem"]   # bundle signers this device accepts
    threads = 2                           # CPU threads per interpreter
    pool_size = 2                         # interpreters per model (parallel requests)
    delegate = "auto"                     # auto | cpu | gpu | edgetpu
    gpu_delegate_path = ""                # external GPU delegate library, if any
    edgetpu_device = ""                   # usb, usb:0, pci:0 (pycoral's device strings)
    socket_path = ""                      # local API; default: <state_dir>/agent.sock
    metrics_port = 0                      # Prometheus /metrics on 127.0.0.1:PORT; 0 = off
    heartbeat_interval = 30.0             # seconds
    outbox_max = 10000                    # durable messages held while the fleet is unreachable
    work_slots = 0                        # fleet batch tasks run at once; 0 = pool_size
    prefetch = 4                          # fleet batch tasks held queued beyond those running, at least (0..64; 0 = none)
    max_bundle_bytes = 536870912          # larger bundles are refused before any chunk is written (512 MiB)
    max_task_bytes = 67108864             # bytes of large tasks' pieces held for reassembly at once (64 MiB)
    local_api_max_connections = 64        # local API connections at once; more are refused with an error
    [tags]
    site = "berlin"
    hw = "coral"

Environment overrides use the upper-cased key: ``EDGESDK_BROKER_URL``, ``EDGESDK_THREADS``;
lists are ``:``-separated (``EDGESDK_TRUSTED_KEYS=/a.pem:/b.pem``) and tags ``k=v,k=v``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

from sdk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AgentConfig", "load_config", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = "/var/lib/edgesdk"
DELEGATES = ("auto", "cpu", "gpu", "edgetpu")


@dataclass
class AgentConfig:
    device_id: str = field(default_factory=socket.gethostname)
    broker_url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = ""
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    trusted_keys: list[Path] = field(default_factory=list)
    threads: int = 2
    pool_size: int = 2
    delegate: str = "auto"
    gpu_delegate_path: str = ""
    edgetpu_device: str = ""
    socket_path: Optional[Path] = None
    metrics_port: int = 0
    heartbeat_interval: float = 30.0
    outbox_max: int = 10000
    work_slots: int = 0
    prefetch: int = 4
    max_bundle_bytes: int = 512 << 20
    max_task_bytes: int = 64 << 20
    local_api_max_connections: int = 64
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.trusted_keys = [Path(p) for p in self.trusted_keys]
        if self.socket_path in (None, ""):
            self.socket_path = self.state_dir / "agent.sock"
        self.socket_path = Path(self.socket_path)
        self.validate()

    def validate(self) -> None:
        if not self.device_id or any(c in self.device_id for c in "/+#"):
            raise ConfigError(f"device_id {self.device_id!r}: must be non-empty without '/', '+' or '#'")
        from sdk.mqtt import BROKER_URL_USAGE, MqttSettings

        try:
            MqttSettings.from_url(self.broker_url)
        except ConfigError as exc:
            raise ConfigError(f"broker_url {self.broker_url!r}: {BROKER_URL_USAGE}") from exc
        if self.delegate not in DELEGATES:
            raise ConfigError(f"delegate {self.delegate!r}: choose one of {', '.join(DELEGATES)}")
        for name in ("threads", "pool_size", "outbox_max", "max_bundle_bytes", "max_task_bytes",
                     "local_api_max_connections"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if int(self.work_slots) < 0:
            raise ConfigError("work_slots must be 0 (= pool_size) or more")
        if not 0 <= int(self.prefetch) <= 64:
            raise ConfigError("prefetch must be 0..64 (tasks held queued beyond those running)")
        if self.heartbeat_interval <= 0:
            raise ConfigError("heartbeat_interval must be positive (seconds)")
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigError("client_cert and client_key go together (mutual TLS): set both or neither")

    @property
    def tls(self) -> bool:
        return urlparse(self.broker_url).scheme == "mqtts"

    def to_toml(self) -> str:
        """The configuration as TOML (what ``agent install`` writes)."""
        lines = []
        for f in dataclasses.fields(self):
            if f.name == "tags":
                continue
            value = getattr(self, f.name)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("\n[tags]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(self.tags.items())]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}


def _from_env(name: str, raw: str) -> Any:
    kind = _FIELDS[name].type
    if name == "tags":
        pairs = [p for p in raw.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ConfigError(f"EDGESDK_TAGS={raw!r}: use k=v,k=v")
        return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}
    if name == "trusted_keys":
        return [p for p in raw.split(":") if p]
    if kind in ("int", int):
        return int(raw)
    if kind in ("float", float):
        return float(raw)
    return raw


def load_config(path: Optional[os.PathLike | str] = None, env: Optional[Mapping[str, str]] = None,
                **overrides: Any) -> AgentConfig:
    """Read ``path`` (TOML), apply ``EDGESDK_*`` environment overrides, then keyword overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist: create one with edgesdk agent install") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_FIELDS))}")
    env = os.environ if env is None else env
    for name in _FIELDS:
        raw = env.get(f"EDGESDK_{name.upper()}")
        if raw is not None:
            try:
                data[name] = _from_env(name, raw)
            except ValueError as exc:
                raise ConfigError(f"EDGESDK_{name.upper()}={raw!r}: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        for name in ("threads", "pool_size", "metrics_port", "outbox_max", "work_slots", "prefetch", "max_bundle_bytes",
                     "max_task_bytes", "local_api_max_connections"):
            if name in data:
                data[name] = int(data[name])
        if "heartbeat_interval" in data:
            data["heartbeat_interval"] = float(data["heartbeat_interval"])
        if "tags" in data and not isinstance(data["tags"], dict):
            raise ConfigError("tags must be a table: [tags] site = \"berlin\"")
        return AgentConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad configuration value: {exc}") from exc
