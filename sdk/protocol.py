"""The wire protocol between agents and the fleet: every MQTT topic and every message, here only.

Topics are built from one template, ``edgesdk/v1/devices/{device}/{channel}`` (plus the fleet's
own presence, ``edgesdk/v1/fleet/status``); no other module formats a topic string. Channels:

==========  =========  =====================================================================
channel     direction  carries
==========  =========  =====================================================================
status      agent→all  :class:`Status`, retained; the Last-Will publishes ``online=False``
heartbeat   agent→     :class:`Heartbeat` (latency histograms, counters), QoS 0
cmd         fleet→     commands: :class:`InstallCommand`, :class:`RollbackCommand`, :class:`Ack`
chunk       fleet→     :class:`Chunk` (binary): one piece of a bundle, at most 128 KiB of data
task        fleet→     :class:`Task` (binary): a slice of a batch job's inputs, with a lease
up          agent→     durable messages from the outbox (:class:`InstallStatus`,
                       :class:`Result`, :class:`TaskResult`), each acknowledged by the fleet
                       with :class:`Ack`; and, not durable, :class:`ChunkRequest` (re-sent by
                       the agent until chunks arrive) and :class:`WorkRequest` (free slots)
==========  =========  =====================================================================

The fleet publishes a retained :class:`FleetStatus` on ``edgesdk/v1/fleet/status`` (its
Last-Will says offline); an agent that sees a new fleet session replays its outbox at once and
announces its free work slots, so a restarted fleet does not wait for agents' resend timers.

Batch work is pulled, not pushed: an agent announces ``capacity`` and ``free`` slots for the
models it has active (:class:`WorkRequest`) and the fleet never has more of its tasks
outstanding than that, so a fast device gets more work and a slow one is never flooded.

Every message is a small class with ``to_payload()``/``from_payload()`` and validation. JSON
messages carry ``schema`` (:data:`SCHEMA_VERSION`), ``type`` and a message ``id``; the receiver
refuses a newer major schema with :class:`ProtocolError`. Binary messages (chunks) are framed as
``b"ESDK" | u8 schema | u32 header length | JSON header | raw bytes`` so bundle bytes are never
base64-encoded. The protocol uses nothing MQTT 5-only (it must work through MQTT 3.1.1 brokers).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from dataclasses import MISSING as _MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional

from .errors import ProtocolError

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgesdk/v1"
CHANNELS = ("status", "heartbeat", "cmd", "chunk", "task", "up")
FLEET_STATUS_TOPIC = f"{TOPIC_ROOT}/fleet/status"
CHUNK_SIZE = 128 * 1024
_MAGIC = b"ESDK"
_FRAME = struct.Struct("!4sBI")

__all__ = [
    "SCHEMA_VERSION",
    "CHUNK_SIZE",
    "ProtocolError",
    "topic",
    "fleet_topic",
    "parse_topic",
    "subscription",
    "new_id",
    "Message",
    "Status",
    "Heartbeat",
    "InstallCommand",
    "RollbackCommand",
    "Ack",
    "InstallStatus",
    "ChunkRequest",
    "Chunk",
    "Result",
    "FleetStatus",
    "WorkRequest",
    "Task",
    "TaskResult",
    "split_bundle",
    "decode",
]


def topic(device: str, channel: str) -> str:
    """The one topic template: ``edgesdk/v1/devices/{device}/{channel}``."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    if not device or any(c in device for c in "/+#\0"):
        raise ProtocolError(f"device id {device!r} must be non-empty and free of '/', '+', '#'")
    return f"{TOPIC_ROOT}/devices/{device}/{channel}"


def fleet_topic() -> str:
    """The fleet's retained presence topic (:class:`FleetStatus`)."""
    return FLEET_STATUS_TOPIC


def subscription(channel: str, device: str = "+") -> str:
    """A filter for one channel of one device, or of every device (``+``)."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    return f"{TOPIC_ROOT}/devices/{device}/{channel}"


def parse_topic(name: str) -> tuple[str, str]:
    """``(device, channel)`` of a topic built by :func:`topic`."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{TOPIC_ROOT}/devices" or parts[4] not in CHANNELS:
        raise ProtocolError(f"not an edgesdk topic: {name!r}")
    return parts[3], parts[4]


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """Base of JSON messages. Subclasses declare ``TYPE`` and their fields."""

    TYPE: ClassVar[str] = ""
    id: str = field(default_factory=new_id, kw_only=True)
    ts: float = field(default_factory=time.time, kw_only=True)

    def validate(self) -> None:
        """Raise ProtocolError when a field is out of range (subclasses extend)."""

    def to_dict(self) -> dict[str, Any]:
        self.validate()
        return {"schema": SCHEMA_VERSION, "type": self.TYPE, **asdict(self)}

    def to_payload(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Message":
        if data.get("type") != cls.TYPE:
            raise ProtocolError(f"expected a {cls.TYPE} message, got {data.get('type')!r}")
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is _MISSING and f.default_factory is _MISSING]  # type: ignore[misc]
        if missing:
            raise ProtocolError(f"{cls.TYPE} message lacks {', '.join(missing)}")
        try:
            msg = cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ProtocolError(f"bad {cls.TYPE} message: {exc}") from exc
        msg.validate()
        return msg

    @classmethod
    def from_payload(cls, payload: bytes) -> "Message":
        return cls.from_dict(_load_json(payload))




def _load_json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("message is not a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA_VERSION or schema < 1:
        raise ProtocolError(f"message schema {schema!r} not understood (this edgesdk speaks {SCHEMA_VERSION}): upgrade edgesdk")
    return data


@dataclass
class Status(Message):
    """Presence, retained: what a device is and runs. The Last-Will is ``Status(online=False)``."""

    TYPE: ClassVar[str] = "status"
    device: str = ""
    online: bool = True
    agent_version: str = ""
    runtime: dict[str, str] = field(default_factory=dict)
    delegates: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # name -> active version
    tags: dict[str, str] = field(default_factory=dict)
    free_disk_bytes: int = 0
    accepting_work: bool = True

    def validate(self) -> None:
        if not self.device:
            raise ProtocolError("status message needs a device id")


@dataclass
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    device: str = ""
    uptime_s: float = 0.0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {version, p50_ms, ..., requests, errors}
    outbox_pending: int = 0


@dataclass
class InstallCommand(Message):
    """Install a bundle: its identity and size; the agent then requests the chunks it lacks."""

    TYPE: ClassVar[str] = "install"
    model: str = ""
    version: str = ""
    bundle_sha256: str = ""
    bundle_size: int = 0
    chunk_size: int = CHUNK_SIZE
    rollout: Optional[str] = None
    min_runtime_version: Optional[str] = None

    @property
    def chunks(self) -> int:
        return max(1, -(-self.bundle_size // self.chunk_size))

    def validate(self) -> None:
        if not (self.model and self.version and len(self.bundle_sha256) == 64 and self.bundle_size > 0):
            raise ProtocolError("install command needs model, version, bundle_sha256 and bundle_size")
        if not 0 < self.chunk_size <= CHUNK_SIZE:
            raise ProtocolError(f"chunk_size must be 1..{CHUNK_SIZE}")


@dataclass
class RollbackCommand(Message):
    TYPE: ClassVar[str] = "rollback"
    model: str = ""
    to_version: Optional[str] = None  # None: the previous version
    rollout: Optional[str] = None


@dataclass
class Ack(Message):
    """The fleet has stored the agent's message ``ack_id``: the agent may drop it from its outbox."""

    TYPE: ClassVar[str] = "ack"
    ack_ids: list[str] = field(default_factory=list)


@dataclass
class InstallStatus(Message):
    """Progress and outcome of an install or rollback (SUCCEEDED / FAILED with the reason)."""

    TYPE: ClassVar[str] = "install_status"
    STATES: ClassVar[tuple[str, ...]] = ("DOWNLOADING", "VERIFYING", "SUCCEEDED", "FAILED", "ROLLED_BACK")
    device: str = ""
    model: str = ""
    version: str = ""
    state: str = ""
    reason: str = ""
    rollout: Optional[str] = None
    previous_version: Optional[str] = None
    p50_ms: Optional[float] = None  # the new version's p50 in the install health check
    previous_p50_ms: Optional[float] = None  # the version it replaced, measured the same way, same moment

    def validate(self) -> None:
        if self.state not in self.STATES:
            raise ProtocolError(f"install status {self.state!r} is not one of {', '.join(self.STATES)}")


@dataclass
class ChunkRequest(Message):
    """The agent asks for the chunks of a bundle it does not hold yet (all, or the missing ones)."""

    TYPE: ClassVar[str] = "chunk_request"
    device: str = ""
    bundle_sha256: str = ""
    indices: list[int] = field(default_factory=list)


def _frame(header: dict[str, Any], data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(_MAGIC, SCHEMA_VERSION, len(head)) + head + data


def _unframe(payload: bytes, kind: str) -> tuple[dict[str, Any], bytes]:
    if len(payload) < _FRAME.size:
        raise ProtocolError(f"{kind} message too short")
    magic, schema, hlen = _FRAME.unpack_from(payload)
    if magic != _MAGIC or schema > SCHEMA_VERSION:
        raise ProtocolError("not an edgesdk binary frame of a known schema")
    try:
        head = json.loads(payload[_FRAME.size : _FRAME.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"bad {kind} header: {exc}") from exc
    if not isinstance(head, dict) or head.get("type") != kind:
        raise ProtocolError(f"expected a {kind} frame")
    return head, bytes(payload[_FRAME.size + hlen :])


@dataclass
class Chunk:
    """One piece of a bundle, framed in binary: the data is never re-encoded."""

    bundle_sha256: str
    index: int
    count: int
    sha256: str
    data: bytes

    TYPE: ClassVar[str] = "chunk"

    def to_payload(self) -> bytes:
        return _frame({"type": self.TYPE, "bundle_sha256": self.bundle_sha256, "index": self.index,
                       "count": self.count, "sha256": self.sha256}, self.data)

    @classmethod
    def from_payload(cls, payload: bytes) -> "Chunk":
        head, data = _unframe(payload, cls.TYPE)
        try:
            chunk = cls(head["bundle_sha256"], int(head["index"]), int(head["count"]), head["sha256"], data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"bad chunk header: {exc}") from exc
        if not 0 <= chunk.index < chunk.count or len(chunk.data) > CHUNK_SIZE:
            raise ProtocolError("chunk index or size out of range")
        return chunk


def split_bundle(bundle: bytes, chunk_size: int = CHUNK_SIZE) -> list[Chunk]:
    """Cut a bundle into chunks once; every device's transfer reuses the same encoded bytes."""
    if not 0 < chunk_size <= CHUNK_SIZE:
        raise ProtocolError(f"chunk_size must be 1..{CHUNK_SIZE}")
    sha = hashlib.sha256(bundle).hexdigest()
    parts = [bundle[i : i + chunk_size] for i in range(0, max(1, len(bundle)), chunk_size)]
    return [Chunk(sha, i, len(parts), hashlib.sha256(part).hexdigest(), part) for i, part in enumerate(parts)]


@dataclass
class Result(Message):
    """An inference result the agent publishes durably (through its outbox).

    Tensors travel as ``{"dtype", "shape", "b64"}``: results are small (class scores, boxes).
    """

    TYPE: ClassVar[str] = "result"
    device: str = ""
    model: str = ""
    version: str = ""
    key: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def encode_tensor(array: "Any") -> dict[str, Any]:
        import numpy as np

        a = np.ascontiguousarray(array)
        return {"dtype": a.dtype.name, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}

    @staticmethod
    def decode_tensor(obj: dict[str, Any]) -> "Any":
        import numpy as np

        return np.frombuffer(base64.b64decode(obj["b64"]), dtype=obj["dtype"]).reshape(obj["shape"])


@dataclass
class FleetStatus(Message):
    """The fleet's presence, retained; its Last-Will is ``online=False``. ``session`` changes on
    every fleet start, which tells agents to replay their outboxes."""

    TYPE: ClassVar[str] = "fleet_status"
    online: bool = True
    session: str = ""


@dataclass
class WorkRequest(Message):
    """An agent's free work slots: the fleet keeps at most ``capacity`` of its tasks outstanding
    and sends none while ``free`` is 0 (outbox full, shutting down)."""

    TYPE: ClassVar[str] = "work_request"
    device: str = ""
    models: dict[str, str] = field(default_factory=dict)  # name -> active version
    capacity: int = 0
    free: int = 0
    running: list[str] = field(default_factory=list)  # task ids in progress

    def validate(self) -> None:
        if not self.device or self.capacity < 0 or self.free < 0:
            raise ProtocolError("work request needs a device id and non-negative slot counts")


@dataclass
class Task:
    """A slice of a batch job, framed in binary: ``count`` samples of every model input, raw."""

    id: str
    job: str
    model: str
    lease_s: float
    inputs: list[Any]  # numpy arrays, batch first
    attempt: int = 1

    TYPE: ClassVar[str] = "task"

    @property
    def count(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0

    def to_payload(self) -> bytes:
        import numpy as np

        arrays = [np.ascontiguousarray(x) for x in self.inputs]
        head = {"type": self.TYPE, "id": self.id, "job": self.job, "model": self.model, "lease_s": self.lease_s,
                "attempt": self.attempt, "inputs": [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]}
        return _frame(head, b"".join(a.tobytes() for a in arrays))

    @classmethod
    def from_payload(cls, payload: bytes) -> "Task":
        import numpy as np

        head, data = _unframe(payload, cls.TYPE)
        try:
            arrays, offset = [], 0
            for spec in head["inputs"]:
                dtype, shape = np.dtype(spec["dtype"]), tuple(int(d) for d in spec["shape"])
                n = int(np.prod(shape)) * dtype.itemsize
                if offset + n > len(data):
                    raise ValueError("tensor data shorter than its shape")
                arrays.append(np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape))
                offset += n
            if offset != len(data) or not arrays or len({a.shape[0] for a in arrays}) != 1:
                raise ValueError("tensor sizes do not add up")
            return cls(str(head["id"]), str(head["job"]), str(head["model"]), float(head["lease_s"]), arrays,
                       int(head.get("attempt", 1)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"bad task frame: {exc}") from exc


@dataclass
class TaskResult(Message):
    """The outputs of one :class:`Task` (batch first), or the error that stopped it. Durable."""

    TYPE: ClassVar[str] = "task_result"
    device: str = ""
    job: str = ""
    task: str = ""
    model: str = ""
    version: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)  # Result.encode_tensor
    error: str = ""
    elapsed_s: float = 0.0
    samples: int = 0

    def validate(self) -> None:
        if not (self.device and self.job and self.task):
            raise ProtocolError("task result needs device, job and task")


_TYPES: dict[str, type[Message]] = {
    c.TYPE: c
    for c in (Status, Heartbeat, InstallCommand, RollbackCommand, Ack, InstallStatus, ChunkRequest, Result,
              FleetStatus, WorkRequest, TaskResult)
}


def decode(payload: bytes) -> Message:
    """Decode any JSON message by its ``type``."""
    data = _load_json(payload)
    cls = _TYPES.get(str(data.get("type")))
    if cls is None:
        raise ProtocolError(f"unknown message type {data.get('type')!r}")
    return cls.from_dict(data)
