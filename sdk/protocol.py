"""The wire protocol between agents and the fleet: every MQTT topic and every message, here only.

Topics are built from one template, ``edgesdk/v1/devices/{device}/{channel}`` (plus the fleet's
own presence, ``edgesdk/v1/fleet/status``); no other module formats a topic string. Channels:

==========  =========  =====================================================================
channel     direction  carries
==========  =========  =====================================================================
status      agent→all  :class:`Status`, retained; the Last-Will publishes ``online=False``
heartbeat   agent→     :class:`Heartbeat` (latency histograms, counters), QoS 0
cmd         fleet→     commands: :class:`InstallCommand`, :class:`RollbackCommand`,
                       :class:`ConfigCommand` (desired configuration), :class:`Ack`
chunk       fleet→     :class:`Chunk` (binary): one piece of a bundle, at most 128 KiB of data
task        fleet→     :class:`Task` (binary): a slice of a batch job's inputs, with a lease;
                       or a :class:`TaskPiece` of one too large for the broker's packet limit
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

Every field is checked when a message is decoded, and again when one is encoded, by the checks
each class declares in ``CHECKS`` (one per field; ``tests/sdk/test_protocol.py`` fails when a
class or a field has none), so the code behind this module can trust what it is handed:

* ids (device, model, version, job, task, rollout, message, session) match :data:`ID_PATTERN`
  (that is :data:`sdk.paths.SAFE_NAME`: letters, digits, ``.``, ``_``, ``-``, at most 128,
  starting with a letter or digit), so one can name a topic level or a file and nothing more;
* sha256 values are 64 lowercase hex characters;
* numbers are JSON numbers (never booleans, strings, ``NaN`` or ``Infinity``) within the bounds
  stated beside each field; free text is valid Unicode within :data:`MAX_TEXT` characters;
* tensors have a numeric dtype (:data:`TENSOR_DTYPES`), a rank of at most :data:`MAX_RANK`, at
  most :data:`MAX_TENSOR_BYTES` of data, and exactly as many bytes as their shape needs.

A decode failure is always a :class:`~sdk.errors.ProtocolError` naming the message and field;
no other exception leaves :func:`decode` or a ``from_payload`` (deep nesting, 5,000-digit
integers and the like included). The receiver drops and counts such a message.
"""


from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import math
import re
import struct
import time
import uuid
from dataclasses import MISSING as _MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Optional, Sequence

from .errors import ProtocolError
from .paths import SAFE_NAME

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgesdk/v1"
CHANNELS = ("status", "heartbeat", "cmd", "chunk", "task", "up")
FLEET_STATUS_TOPIC = f"{TOPIC_ROOT}/fleet/status"
CHUNK_SIZE = 128 * 1024
#: chunks per bundle at most (8 GiB in 128 KiB chunks): bounds an agent's transfer bookkeeping
MAX_CHUNKS = 1 << 16
#: chunks a device keeps requested and not yet received, unless the install command says otherwise:
#: 1 MiB per device, so 100 simulated devices sharing a connection stay under Mosquitto's default
#: ``max_queued_messages`` (1000) and chunks are never dropped by the broker
CHUNK_WINDOW = 8
#: the largest window an install command may set (8 MiB in 128 KiB chunks), and the most chunks the
#: fleet sends for one chunk request
MAX_WINDOW = 64
#: the pattern every id matches (device, model, version, job, task, rollout, message, session)
ID_PATTERN = SAFE_NAME
#: characters of free text (reasons, errors, result keys) at most
MAX_TEXT = 4096
#: dtypes a tensor on the wire may have: numeric (and boolean masks), nothing numpy would
#: interpret as objects, strings or records
TENSOR_DTYPES = frozenset({"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                           "float16", "float32", "float64"})
MAX_RANK = 8
#: bytes of one tensor at most: MQTT's own packet limit (256 MiB)
MAX_TENSOR_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 64  # inputs or outputs of one message
MAX_ITEMS = 4096  # entries of a list or map field (ids acked, models, task ids, ...)
MAX_PREFETCH = 64  # tasks a device may ask to hold queued beyond those it runs
MAX_TS = 2.0 ** 40  # seconds since the epoch (year 36812): any ts beyond is malformed
#: how a bundle delta may be made (:data:`sdk.delta.METHODS`)
DELTA_METHODS = ("zstd-zip", "zstd", "bsdiff4")
#: bundles one status may list as held (active and previous of every model)
MAX_HELD_BUNDLES = 256
_MAGIC = b"ESDK"
_FRAME = struct.Struct("!4sBI")
_MAX_HEADER = 1 << 20

__all__ = [
    "SCHEMA_VERSION",
    "CHUNK_SIZE",
    "MAX_CHUNKS",
    "CHUNK_WINDOW",
    "MAX_WINDOW",
    "ID_PATTERN",
    "MAX_TEXT",
    "TENSOR_DTYPES",
    "ProtocolError",
    "topic",
    "fleet_topic",
    "parse_topic",
    "subscription",
    "topic_pattern",
    "new_id",
    "clip_text",
    "Message",
    "Status",
    "Heartbeat",
    "InstallCommand",
    "RollbackCommand",
    "ConfigCommand",
    "CONFIG_FIELDS",
    "Ack",
    "InstallStatus",
    "ChunkRequest",
    "Chunk",
    "Result",
    "FleetStatus",
    "WorkRequest",
    "Task",
    "TaskPiece",
    "split_task",
    "decode_task_channel",
    "TaskResult",
    "MESSAGE_CLASSES",
    "split_bundle",
    "decode",
]


# --- field checks ---------------------------------------------------------------------------------
# A check takes (where, value) and raises ProtocolError naming ``where`` when the value is wrong.
Check = Callable[[str, Any], None]


def _fail(where: str, what: str, value: Any) -> None:
    shown = repr(value)
    raise ProtocolError(f"{where} {what}, got {shown[:80] + '...' if len(shown) > 80 else shown}")


def _ident(where: str, value: Any) -> None:
    if type(value) is not str or not ID_PATTERN.fullmatch(value):
        _fail(where, "must be an id (letters, digits, '.', '_', '-'; at most 128, starting with a letter or digit)",
              value)


def _optional(check: Check) -> Check:
    def optional(where: str, value: Any) -> None:
        if value is not None:
            check(where, value)
    return optional


def _ident_or_empty(where: str, value: Any) -> None:
    if value != "":
        _ident(where, value)


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _sha256(where: str, value: Any) -> None:
    if type(value) is not str or not _HEX64.fullmatch(value):
        _fail(where, "must be a sha256: 64 lowercase hex characters", value)


def _integer(lo: int, hi: int) -> Check:
    def integer(where: str, value: Any) -> None:
        if type(value) is not int or not lo <= value <= hi:
            _fail(where, f"must be an integer in {lo}..{hi}", value)
    return integer


def _number(lo: float, hi: float) -> Check:
    def number(where: str, value: Any) -> None:
        if type(value) not in (int, float) or not (math.isfinite(value) and lo <= value <= hi):
            _fail(where, f"must be a number in {lo:g}..{hi:g}", value)
    return number


def _boolean(where: str, value: Any) -> None:
    if type(value) is not bool:
        _fail(where, "must be true or false", value)


def _text(limit: int = MAX_TEXT) -> Check:
    def text(where: str, value: Any) -> None:
        if type(value) is not str or len(value) > limit:
            _fail(where, f"must be a string of at most {limit} characters", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            _fail(where, "must be valid Unicode (no lone surrogates)", value)
    return text


def _one_of(*allowed: str) -> Check:
    def one_of(where: str, value: Any) -> None:
        if value not in allowed or type(value) is not str:
            _fail(where, f"must be one of {', '.join(allowed)}", value)
    return one_of


def _list_of(item: Check, limit: int = MAX_ITEMS) -> Check:
    def list_of(where: str, value: Any) -> None:
        if type(value) is not list or len(value) > limit:
            _fail(where, f"must be a list of at most {limit} items", value)
        for i, v in enumerate(value):
            item(f"{where}[{i}]", v)
    return list_of


def _map_of(key: Check, val: Check, limit: int = MAX_ITEMS) -> Check:
    def map_of(where: str, value: Any) -> None:
        if type(value) is not dict or len(value) > limit:
            _fail(where, f"must be an object of at most {limit} entries", value)
        for k, v in value.items():
            key(f"{where} key", k)
            val(f"{where}[{k!r}]", v)
    return map_of


_STAT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_COUNT = _integer(0, 2 ** 63 - 1)
_SECONDS = _number(0.0, 1e9)


def _model_stats(where: str, value: Any) -> None:
    """A heartbeat's figures for one model: ``version`` and named non-negative numbers."""
    if type(value) is not dict or len(value) > 32:
        _fail(where, "must be an object of at most 32 figures", value)
    for k, v in value.items():
        if type(k) is not str or not _STAT_NAME.fullmatch(k):
            _fail(f"{where} key", "must be a lowercase figure name", k)
        (_ident if k == "version" else _number(0.0, 1e18))(f"{where}[{k!r}]", v)


def _scalar(where: str, value: Any) -> None:
    """A metadata value: null, a boolean, a finite number or a short string."""
    if value is None or type(value) is bool:
        return
    if type(value) in (int, float):
        _number(-1e300, 1e300)(where, value)
    else:
        _text(1024)(where, value)


def tensor_nbytes(where: str, dtype: Any, shape: Any, *, min_rank: int = 0) -> int:
    """The byte size of a tensor of ``dtype`` and ``shape`` as they came from the network, after
    checking both: a numeric dtype, a rank of ``min_rank``..``MAX_RANK``, at most
    ``MAX_TENSOR_BYTES``. Raises ProtocolError naming ``where``."""
    if type(dtype) is not str or dtype not in TENSOR_DTYPES:
        _fail(f"{where}.dtype", f"must be one of {', '.join(sorted(TENSOR_DTYPES))}", dtype)
    if type(shape) is not list or not min_rank <= len(shape) <= MAX_RANK:
        _fail(f"{where}.shape", f"must be a list of {min_rank}..{MAX_RANK} dimensions", shape)
    n = _ITEMSIZE[dtype]
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_TENSOR_BYTES:
            _fail(f"{where}.shape", f"must hold integers in 0..{MAX_TENSOR_BYTES}", shape)
        n *= d
    if n > MAX_TENSOR_BYTES:
        _fail(where, f"must hold at most {MAX_TENSOR_BYTES} bytes", f"{dtype}{shape}")
    return n


_ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8,
             "uint64": 8, "float16": 2, "float32": 4, "float64": 8}
_B64_BODY = re.compile(r"[A-Za-z0-9+/]*")


def _tensor(where: str, value: Any) -> None:
    """An encoded tensor, ``{"dtype", "shape", "b64"}``: checked spec, and base64 of exactly the
    bytes that spec needs."""
    if type(value) is not dict or set(value) != {"dtype", "shape", "b64"}:
        _fail(where, "must be an object with exactly dtype, shape and b64", value)
    n = tensor_nbytes(where, value["dtype"], value["shape"])
    b64 = value["b64"]
    pad = (3 - n % 3) % 3
    if (type(b64) is not str or len(b64) != 4 * ((n + 2) // 3) or b64[len(b64) - pad:] != "=" * pad
            or not _B64_BODY.fullmatch(b64, 0, len(b64) - pad)):
        _fail(f"{where}.b64", f"must be the base64 of exactly {n} bytes", b64)


_TENSORS = _list_of(_tensor, MAX_TENSORS)


def clip_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to what a message's free-text field takes (a reason, an error)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- topics -----------------------------------------------------------------------------------------
def topic(device: str, channel: str) -> str:
    """The one topic template: ``edgesdk/v1/devices/{device}/{channel}``; ``device`` must be an id."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    _ident("device id", device)
    return f"{TOPIC_ROOT}/devices/{device}/{channel}"


def topic_pattern(channel: str, placeholder: str) -> str:
    """The template with a broker's placeholder (Mosquitto's ``%u``, EMQX's ``${username}``) in
    the device level: for writing broker ACLs, never for publishing."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    return f"{TOPIC_ROOT}/devices/{placeholder}/{channel}"


def fleet_topic() -> str:
    """The fleet's retained presence topic (:class:`FleetStatus`)."""
    return FLEET_STATUS_TOPIC


def subscription(channel: str, device: str = "+") -> str:
    """A filter for one channel of one device, or of every device (``+``)."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    if device != "+":
        _ident("device id", device)
    return f"{TOPIC_ROOT}/devices/{device}/{channel}"


def parse_topic(name: str) -> tuple[str, str]:
    """``(device, channel)`` of a topic built by :func:`topic`; the device level is a checked id."""
    parts = name.split("/") if type(name) is str else []
    if len(parts) != 5 or "/".join(parts[:3]) != f"{TOPIC_ROOT}/devices" or parts[4] not in CHANNELS:
        raise ProtocolError(f"not an edgesdk topic: {str(name)[:200]!r}")
    _ident("topic device level", parts[3])
    return parts[3], parts[4]


def new_id() -> str:
    return uuid.uuid4().hex


# --- decoding JSON safely -------------------------------------------------------------------------
def _no_constants(name: str) -> Any:
    raise ProtocolError(f"message holds {name}, which is not a number JSON allows")


def _parse_json(raw: Any, what: str) -> Any:
    """``json.loads`` with every failure as ProtocolError: bad UTF-8, bad JSON, NaN/Infinity,
    nesting too deep for the parser, integers past Python's digit limit."""
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except ProtocolError:
        raise
    except RecursionError as exc:
        raise ProtocolError(f"{what} is nested too deeply") from exc
    except (UnicodeDecodeError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{what} is not JSON: {str(exc)[:200]}") from exc


def _load_json(payload: bytes) -> dict[str, Any]:
    data = _parse_json(payload, "message")
    if type(data) is not dict:
        raise ProtocolError("message is not a JSON object")
    schema = data.get("schema")
    if type(schema) is not int or schema > SCHEMA_VERSION or schema < 1:
        raise ProtocolError(f"message schema {str(schema)[:20]!r} not understood (this edgesdk speaks "
                            f"{SCHEMA_VERSION}): upgrade edgesdk")
    return data


def _check_all(kind: str, checks: dict[str, Check], values: dict[str, Any]) -> None:
    for name, check in checks.items():
        check(f"{kind}.{name}", values[name])


# --- messages --------------------------------------------------------------------------------------
@dataclass
class Message:
    """Base of JSON messages. Subclasses declare ``TYPE``, their fields, and one check per field
    in ``CHECKS`` (the base's ``id`` and ``ts`` included); :meth:`validate` applies them."""

    TYPE: ClassVar[str] = ""
    CHECKS: ClassVar[dict[str, Check]] = {"id": _ident, "ts": _number(0.0, MAX_TS)}
    id: str = field(default_factory=new_id, kw_only=True)
    ts: float = field(default_factory=time.time, kw_only=True)

    def validate(self) -> None:
        """Raise ProtocolError naming the first field that fails its check."""
        _check_all(self.TYPE, self.CHECKS, self.__dict__)
        self.check_fields_together()

    def check_fields_together(self) -> None:
        """Checks across fields (subclasses extend)."""

    def to_dict(self) -> dict[str, Any]:
        self.validate()
        return {"schema": SCHEMA_VERSION, "type": self.TYPE, **asdict(self)}

    def to_payload(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Message":
        """The message in ``data`` (a decoded JSON object), every field checked. Fields this
        version does not know are ignored, so a newer minor schema still decodes."""
        if type(data) is not dict or data.get("type") != cls.TYPE:
            raise ProtocolError(f"expected a {cls.TYPE} message, got {str(data.get('type') if type(data) is dict else data)[:40]!r}")
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = data[f.name]
            elif f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
                raise ProtocolError(f"{cls.TYPE} message lacks {f.name}")
        msg = cls(**kwargs)
        msg.validate()
        return msg

    @classmethod
    def from_payload(cls, payload: bytes) -> "Message":
        return cls.from_dict(_load_json(payload))


#: what the fleet's desired configuration of a device may set (:class:`ConfigCommand`), and what
#: a device reports it runs (:attr:`Status.config`): each key with its check
CONFIG_FIELDS: dict[str, Check] = {
    "tags": _map_of(_text(64), _text(256), 64),
    "threads": _integer(1, 64),
    "pool_size": _integer(1, 64),
    "heartbeat_interval": _number(0.5, 86400.0),
    "work_slots": _integer(0, 64),
    "models": _map_of(_ident, _ident),  # model -> the version it is pinned to
}


def _config(where: str, value: Any) -> None:
    """A device configuration: an object of :data:`CONFIG_FIELDS` keys, each value checked."""
    if type(value) is not dict:
        _fail(where, "must be an object", value)
    unknown = sorted(set(value) - set(CONFIG_FIELDS))
    if unknown:
        _fail(where, f"has no setting {unknown[0]!r} (settings: {', '.join(CONFIG_FIELDS)})", unknown[0])
    for key, item in value.items():
        CONFIG_FIELDS[key](f"{where}.{key}", item)


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
    bundles: list[str] = field(default_factory=list)  # sha256 of every bundle the device holds (delta bases)
    #: the configuration it runs (:data:`CONFIG_FIELDS`), the revision of the fleet's desired
    #: configuration it last applied (0: none), and what of it could not be applied, and why
    config: dict[str, Any] = field(default_factory=dict)
    config_revision: int = 0
    config_note: str = ""

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "online": _boolean, "agent_version": _text(64),
        "runtime": _map_of(_text(64), _text(256), 32), "delegates": _list_of(_text(64), 16),
        "models": _map_of(_ident, _ident), "tags": _map_of(_text(64), _text(256), 64),
        "free_disk_bytes": _COUNT, "accepting_work": _boolean, "bundles": _list_of(_sha256, MAX_HELD_BUNDLES),
        "config": _config, "config_revision": _integer(0, 2 ** 53), "config_note": _text(),
    }


@dataclass
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    device: str = ""
    uptime_s: float = 0.0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {version, p50_ms, ..., requests, errors}
    outbox_pending: int = 0

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "uptime_s": _SECONDS, "models": _map_of(_ident, _model_stats),
        "outbox_pending": _COUNT,
    }


_DELTA_KEYS = frozenset({"method", "base_sha256", "sha256", "size"})


def _delta(where: str, value: Any) -> None:
    """An install command's delta: ``{"method", "base_sha256", "sha256", "size"}``, exactly."""
    if type(value) is not dict or set(value) != _DELTA_KEYS:
        _fail(where, f"must be an object with exactly {', '.join(sorted(_DELTA_KEYS))}", value)
    _one_of(*DELTA_METHODS)(f"{where}.method", value["method"])
    _sha256(f"{where}.base_sha256", value["base_sha256"])
    _sha256(f"{where}.sha256", value["sha256"])
    _integer(1, MAX_CHUNKS * CHUNK_SIZE)(f"{where}.size", value["size"])


@dataclass
class InstallCommand(Message):
    """Install a bundle: its identity and size; the agent then requests the chunks it lacks.

    ``delta`` (optional): the bundle can also be rebuilt from a bundle the device holds,
    ``base_sha256``, and a smaller delta blob (``sha256``, ``size``) made with ``method``. The
    agent then fetches the delta's chunks instead (:meth:`delta_blob`), looks the base up in its
    own store, rebuilds the bundle and checks it like a full one; without the base, or when
    the rebuild fails, it fetches the full bundle this command describes.

    ``window``: how many chunks the device keeps requested and not yet received (see
    :mod:`sdk.chunkflow`); 1 to :data:`MAX_WINDOW`."""

    TYPE: ClassVar[str] = "install"
    model: str = ""
    version: str = ""
    bundle_sha256: str = ""
    bundle_size: int = 0
    chunk_size: int = CHUNK_SIZE
    rollout: Optional[str] = None
    min_runtime_version: Optional[str] = None

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "model": _ident, "version": _ident, "bundle_sha256": _sha256,
        "bundle_size": _integer(1, MAX_CHUNKS * CHUNK_SIZE), "chunk_size": _integer(1, CHUNK_SIZE),
        "rollout": _optional(_ident), "min_runtime_version": _optional(_text(64)), "delta": _optional(_delta),
        "window": _integer(1, MAX_WINDOW),
    }
    delta: Optional[dict[str, Any]] = None
    window: int = CHUNK_WINDOW

    @property
    def chunks(self) -> int:
        return max(1, -(-self.bundle_size // self.chunk_size))

    def check_fields_together(self) -> None:
        if self.chunks > MAX_CHUNKS:
            raise ProtocolError(f"install.chunk_size {self.chunk_size} cuts {self.bundle_size} bytes into "
                                f"{self.chunks} chunks, more than {MAX_CHUNKS}")
        d = self.delta
        if d is not None:
            if d["size"] >= self.bundle_size:
                raise ProtocolError(f"install.delta.size {d['size']} must be below the bundle's {self.bundle_size} "
                                    "bytes (a delta no smaller than its bundle is never sent)")
            if len({d["base_sha256"], d["sha256"], self.bundle_sha256}) != 3:
                raise ProtocolError("install.delta: the base, the delta and the bundle must be three different sha256s")

    def delta_blob(self) -> "InstallCommand":
        """The command for the delta's own chunks: same model, version, rollout and chunk size,
        the delta's sha256 and size, no delta (what the agent's transfer fetches)."""
        if self.delta is None:
            raise ProtocolError("install command has no delta")
        return dataclasses.replace(self, bundle_sha256=self.delta["sha256"], bundle_size=self.delta["size"], delta=None)

    def without_delta(self) -> "InstallCommand":
        return dataclasses.replace(self, delta=None)


@dataclass
class RollbackCommand(Message):
    TYPE: ClassVar[str] = "rollback"
    model: str = ""
    to_version: Optional[str] = None  # None: the previous version
    rollout: Optional[str] = None

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "model": _ident, "to_version": _optional(_ident), "rollout": _optional(_ident),
    }


@dataclass
class ConfigCommand(Message):
    """The fleet's desired configuration of a device (its tags' entries merged, then its own):
    the agent applies what it can without a restart, keeps it across restarts, and reports what
    it runs in its :class:`Status` (``config``, ``config_revision``, ``config_note``)."""

    TYPE: ClassVar[str] = "config"
    revision: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    CHECKS: ClassVar[dict[str, Check]] = {**Message.CHECKS, "revision": _integer(1, 2 ** 53), "config": _config}


@dataclass
class Ack(Message):
    """The fleet has stored the agent's messages ``ack_ids``: the agent may drop them from its outbox."""

    TYPE: ClassVar[str] = "ack"
    ack_ids: list[str] = field(default_factory=list)

    CHECKS: ClassVar[dict[str, Check]] = {**Message.CHECKS, "ack_ids": _list_of(_ident)}


@dataclass
class InstallStatus(Message):
    """Progress and outcome of an install or rollback (SUCCEEDED / FAILED with the reason). The
    version is empty for a rollback that failed before it knew which version it would reach."""

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
    bundle_sha256: Optional[str] = None  # the bundle it is about (SUCCEEDED: now held by the device)
    via: Optional[str] = None  # how the bundle travels or travelled: "full" or "delta"
    fallback: bool = False  # a delta was not used (the reason says why): the full bundle is fetched instead

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "model": _ident, "version": _ident_or_empty,
        "state": _one_of(*STATES), "reason": _text(), "rollout": _optional(_ident),
        "previous_version": _optional(_ident), "p50_ms": _optional(_SECONDS),
        "previous_p50_ms": _optional(_SECONDS), "bundle_sha256": _optional(_sha256),
        "via": _optional(_one_of("full", "delta")), "fallback": _boolean,
    }

    def check_fields_together(self) -> None:
        if self.fallback and self.via != "full":
            raise ProtocolError("install_status.fallback means the full bundle is fetched: via must be 'full'")


@dataclass
class ChunkRequest(Message):
    """The agent asks for chunks of a blob it does not hold yet: the next ones its window allows
    (:mod:`sdk.chunkflow`), at most :data:`MAX_WINDOW` in one request."""

    TYPE: ClassVar[str] = "chunk_request"
    device: str = ""
    bundle_sha256: str = ""
    indices: list[int] = field(default_factory=list)

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "bundle_sha256": _sha256,
        "indices": _list_of(_integer(0, MAX_CHUNKS - 1), MAX_WINDOW),
    }


# --- binary frames ---------------------------------------------------------------------------------
def _frame(header: dict[str, Any], data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(_MAGIC, SCHEMA_VERSION, len(head)) + head + data


def _split_frame(payload: bytes, kind: str) -> tuple[bytes, memoryview]:
    """The raw JSON header and the raw bytes of a binary frame of ``kind`` (the header unparsed)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)) or len(payload) < _FRAME.size:
        raise ProtocolError(f"{kind} message too short")
    magic, schema, hlen = _FRAME.unpack_from(payload)
    if magic != _MAGIC or not 1 <= schema <= SCHEMA_VERSION:
        raise ProtocolError("not an edgesdk binary frame of a known schema")
    if hlen > min(_MAX_HEADER, len(payload) - _FRAME.size):
        raise ProtocolError(f"{kind} frame header length {hlen} runs past the message")
    view = memoryview(payload)
    return bytes(view[_FRAME.size : _FRAME.size + hlen]), view[_FRAME.size + hlen :]


def _parse_header(raw: bytes, kind: str) -> dict[str, Any]:
    head = _parse_json(raw, f"{kind} header")
    if type(head) is not dict or head.get("type") != kind:
        raise ProtocolError(f"expected a {kind} frame")
    return head


def _unframe(payload: bytes, kind: str) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the raw bytes of a binary frame of ``kind``."""
    raw, data = _split_frame(payload, kind)
    return _parse_header(raw, kind), data


def _header_fields(kind: str, head: dict[str, Any], checks: dict[str, Check],
                   defaults: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a frame header: each present (or defaulted) and passing its check."""
    values = {}
    for name in checks:
        if name in head:
            values[name] = head[name]
        elif name in defaults:
            values[name] = defaults[name]
        else:
            raise ProtocolError(f"{kind} frame lacks {name}")
    _check_all(kind, checks, values)
    return values


@dataclass
class Chunk:
    """One piece of a bundle, framed in binary: the data is never re-encoded. A decoded chunk's
    ``data`` is a read-only view into the received payload, not a copy (a 128 KiB copy per chunk
    per device is a measurable part of a rollout's cost): use it as bytes-like."""

    bundle_sha256: str
    index: int
    count: int
    sha256: str
    data: bytes

    TYPE: ClassVar[str] = "chunk"
    CHECKS: ClassVar[dict[str, Check]] = {
        "bundle_sha256": _sha256, "index": _integer(0, MAX_CHUNKS - 1), "count": _integer(1, MAX_CHUNKS),
        "sha256": _sha256, "data": lambda where, v: None if len(v) <= CHUNK_SIZE else _fail(
            where, f"must be at most {CHUNK_SIZE} bytes", f"{len(v)} bytes"),
    }

    def to_payload(self) -> bytes:
        _check_all(self.TYPE, self.CHECKS, self.__dict__)
        return _frame({"type": self.TYPE, "bundle_sha256": self.bundle_sha256, "index": self.index,
                       "count": self.count, "sha256": self.sha256}, self.data)

    @classmethod
    def from_payload(cls, payload: bytes) -> "Chunk":
        raw, data = _split_frame(payload, cls.TYPE)
        # one chunk frame goes to every device: a process simulating many decodes the same header
        # many times, so small headers are parsed and checked once (a failure is never cached)
        values = _chunk_header(raw) if len(raw) <= 1024 else _chunk_header.__wrapped__(raw)
        cls.CHECKS["data"]("chunk.data", data)
        return cls(data=data if isinstance(payload, bytes) else bytes(data), **values)


@functools.lru_cache(maxsize=256)
def _chunk_header(raw: bytes) -> "_FrozenHeader":
    """The checked fields of a chunk frame's raw header (ProtocolError when they do not pass)."""
    head = _parse_header(raw, Chunk.TYPE)
    values = _header_fields(Chunk.TYPE, head, {k: v for k, v in Chunk.CHECKS.items() if k != "data"}, {})
    if values["index"] >= values["count"]:
        raise ProtocolError(f"chunk.index {values['index']} must be below chunk.count {values['count']}")
    return _FrozenHeader(values)


class _FrozenHeader(dict):
    """A cached header's fields: read-only, so one caller cannot change what the next one gets."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a cached frame header is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]


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
    ``meta`` is the application's: at most 32 entries of null, booleans, numbers and short strings.
    """

    TYPE: ClassVar[str] = "result"
    device: str = ""
    model: str = ""
    version: str = ""
    key: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "model": _ident, "version": _ident, "key": _text(256),
        "outputs": _TENSORS, "meta": _map_of(_text(64), _scalar, 32),
    }

    @staticmethod
    def encode_tensor(array: "Any") -> dict[str, Any]:
        import numpy as np

        a = np.asarray(array)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn a scalar into shape (1,))
        return {"dtype": a.dtype.name, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}

    @staticmethod
    def decode_tensor(obj: dict[str, Any]) -> "Any":
        """The array in an encoded tensor, checked again (it may come from a store, not a message)."""
        import numpy as np

        _tensor("tensor", obj)
        return np.frombuffer(base64.b64decode(obj["b64"]), dtype=obj["dtype"]).reshape(tuple(obj["shape"]))


@dataclass
class FleetStatus(Message):
    """The fleet's presence, retained; its Last-Will is ``online=False``. ``session`` changes on
    every fleet start, which tells agents to replay their outboxes."""

    TYPE: ClassVar[str] = "fleet_status"
    online: bool = True
    session: str = ""

    CHECKS: ClassVar[dict[str, Check]] = {**Message.CHECKS, "online": _boolean, "session": _ident_or_empty}


@dataclass
class WorkRequest(Message):
    """An agent's free work slots: the fleet keeps at most ``capacity + prefetch`` of its tasks
    outstanding (``capacity`` running, ``prefetch`` more queued on the device, so the next task
    is there when one ends) and sends none while ``free`` is 0 (outbox full, shutting down, or
    that many tasks held). ``free`` never exceeds ``capacity``, so a fleet that does not know
    ``prefetch`` (older, or an agent that announces 0) keeps to ``capacity`` as before."""

    TYPE: ClassVar[str] = "work_request"
    device: str = ""
    models: dict[str, str] = field(default_factory=dict)  # name -> active version
    capacity: int = 0
    free: int = 0
    running: list[str] = field(default_factory=list)  # task ids held: running or queued
    prefetch: int = 0
    #: task ids whose results wait in the device's outbox for the fleet's ack (None: not reported).
    #: With ``running`` it is every task the device has: the fleet puts a task it leased to the
    #: device long enough ago and that is in neither list back in the queue (lost on the way)
    done: Optional[list[str]] = None

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "models": _map_of(_ident, _ident), "capacity": _integer(0, MAX_ITEMS),
        "free": _integer(0, MAX_ITEMS), "running": _list_of(_ident), "prefetch": _integer(0, MAX_PREFETCH),
        "done": _optional(_list_of(_ident)),
    }

    def check_fields_together(self) -> None:
        if self.free > self.capacity:
            raise ProtocolError(f"work_request.free {self.free} must not exceed its capacity {self.capacity}")

    @classmethod
    def of_device(cls, device: str, models: dict[str, str], capacity: int, prefetch: int, held: Sequence[str],
                  accepting: bool = True, done: Optional[Sequence[str]] = None) -> "WorkRequest":
        """What a device announces (the agent and the simulator alike): ``held`` the tasks it has
        (running or queued), ``done`` those whose results await the fleet's ack; free = room left
        within ``capacity + prefetch``, at most ``capacity``, 0 when it runs no model or does not
        accept work. Lists longer than the protocol carries are cut, and ``done`` is then not
        reported (the fleet must not take a cut list for the whole)."""
        room = capacity + prefetch - len(held) if models and accepting else 0
        complete = done is not None and len(held) < MAX_ITEMS and len(done) < MAX_ITEMS
        return cls(device=device, models=dict(models), capacity=capacity, free=max(0, min(capacity, room)),
                   running=sorted(held)[:MAX_ITEMS], prefetch=prefetch,
                   done=sorted(done) if complete else None)

    @staticmethod
    def holds_too_many(held: int, capacity: int, prefetch: int) -> bool:
        """Whether a device holding ``held`` tasks declines another: past ``capacity + prefetch``,
        with as much again for the tasks a re-dispatch can send early (a result racing its lease)."""
        return held >= 2 * (capacity + prefetch)


def _quant_pair(where: str, value: Any) -> None:
    """How an integer task input was quantised by the fleet: ``[scale, zero_point]``."""
    if type(value) is not list or len(value) != 2:
        _fail(where, "must be [scale, zero_point]", value)
    _number(1e-30, 1e30)(f"{where}[0]", value[0])
    _integer(-(2 ** 31), 2 ** 31 - 1)(f"{where}[1]", value[1])


#: dtypes a fleet-quantised task input may have (and their zero point's range)
QUANT_DTYPES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


@dataclass
class Task:
    """A slice of a batch job, framed in binary: ``count`` samples of every model input, raw.

    ``quant`` says, per input, whether the fleet already quantised it (``[scale, zero_point]``,
    an integer dtype of :data:`QUANT_DTYPES`: the agent feeds it to the model as it is when
    they are the model's own, see :mod:`sdk.encoding`) or not (``None``: values, which the
    agent converts as it would a request's). Empty means ``None`` for every input."""

    id: str
    job: str
    model: str
    lease_s: float
    inputs: list[Any]  # numpy arrays, batch first
    attempt: int = 1
    quant: list[Optional[list[Any]]] = field(default_factory=list)

    TYPE: ClassVar[str] = "task"
    CHECKS: ClassVar[dict[str, Check]] = {
        "id": _ident, "job": _ident, "model": _ident, "lease_s": _number(0.001, 7 * 86400.0),
        "attempt": _integer(1, 1_000_000),
        "inputs": _list_of(lambda where, spec: None if type(spec) is dict else _fail(where, "must be a tensor spec", spec),
                           MAX_TENSORS),
        "quant": _list_of(_optional(_quant_pair), MAX_TENSORS),
    }

    @property
    def count(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0

    def quant_of(self, i: int) -> Optional[tuple[float, int]]:
        """``(scale, zero_point)`` input ``i`` was quantised with by the fleet, or None."""
        q = self.quant[i] if i < len(self.quant) else None
        return None if q is None else (float(q[0]), int(q[1]))

    def to_payload(self) -> bytes:
        import numpy as np

        arrays = [np.ascontiguousarray(x) for x in self.inputs]
        if self.quant and len(self.quant) != len(arrays):
            raise ProtocolError(f"task.quant has {len(self.quant)} entries for {len(arrays)} inputs")
        specs = []
        for i, a in enumerate(arrays):
            spec: dict[str, Any] = {"dtype": a.dtype.name, "shape": list(a.shape)}
            q = self.quant_of(i)
            if q is not None:
                spec["quant"] = [q[0], q[1]]
            specs.append(spec)
        head = {"type": self.TYPE, "id": self.id, "job": self.job, "model": self.model, "lease_s": self.lease_s,
                "attempt": self.attempt, "inputs": specs}
        _check_all(self.TYPE, self.CHECKS, {**head, "quant": [s.get("quant") for s in specs]})
        for i, spec in enumerate(specs):
            _check_quant(f"task.inputs[{i}]", spec)
        return _frame(head, b"".join(a.tobytes() for a in arrays))

    @classmethod
    def from_payload(cls, payload: bytes) -> "Task":
        """The task in a frame; every input spec checked (numeric dtype, rank 1..8, a common batch
        size of at least one; a ``quant`` pair only on an integer input, its zero point within
        the dtype) and the raw bytes exactly what the specs need."""
        import numpy as np

        head, data = _unframe(payload, cls.TYPE)
        specs = head.get("inputs")
        quant = [s.get("quant") if type(s) is dict else None for s in specs] if type(specs) is list else []
        values = _header_fields(cls.TYPE, {**head, "quant": quant}, cls.CHECKS, {"attempt": 1})
        specs = values.pop("inputs")
        if not specs:
            raise ProtocolError("task.inputs must hold at least one tensor")
        arrays, offset = [], 0
        for i, spec in enumerate(specs):
            where = f"task.inputs[{i}]"
            if set(spec) - {"dtype", "shape", "quant"}:
                _fail(where, "must hold only dtype, shape and quant", sorted(spec))
            n = tensor_nbytes(where, spec.get("dtype"), spec.get("shape"), min_rank=1)
            _check_quant(where, spec)
            if offset + n > len(data):
                raise ProtocolError(f"{where} needs {n} bytes, the frame holds {len(data) - offset} more")
            shape = tuple(spec["shape"])
            arrays.append(np.frombuffer(data, dtype=spec["dtype"], count=n // _ITEMSIZE[spec["dtype"]],
                                        offset=offset).reshape(shape))
            offset += n
        if offset != len(data):
            raise ProtocolError(f"task frame holds {len(data) - offset} bytes beyond its inputs")
        if len({a.shape[0] for a in arrays}) != 1 or arrays[0].shape[0] < 1:
            raise ProtocolError("task.inputs must share one batch size of at least 1, got "
                                f"{[a.shape[0] for a in arrays]}")
        if not any(q is not None for q in values["quant"]):
            values["quant"] = []
        return cls(inputs=arrays, **values)


def _check_quant(where: str, spec: dict[str, Any]) -> None:
    """A task input's ``quant`` pair fits its dtype: an integer dtype of :data:`QUANT_DTYPES` and
    a zero point within its range."""
    q = spec.get("quant")
    if q is None:
        return
    dtype = spec.get("dtype")
    if dtype not in QUANT_DTYPES:
        _fail(f"{where}.quant", f"is allowed only on a {', '.join(QUANT_DTYPES)} input", dtype)
    lo, hi = QUANT_DTYPES[dtype]
    if not lo <= q[1] <= hi:
        _fail(f"{where}.quant[1]", f"(the zero point) must be in {lo}..{hi} for {dtype}", q[1])


#: pieces one task may be cut into at most, and the bytes of a whole task frame at most
MAX_PIECES = MAX_CHUNKS
MAX_TASK_BYTES = MAX_TENSOR_BYTES + _MAX_HEADER


def piece_span(index: int, count: int, total: int) -> tuple[int, int]:
    """Where piece ``index`` of ``count`` lies in a whole of ``total`` bytes: ``(offset, length)``.
    Pieces are equal (``ceil(total / count)`` bytes) but the last, so two pieces never overlap."""
    step = -(-total // count)
    offset = index * step
    return offset, max(0, min(step, total - offset))


@dataclass
class TaskPiece:
    """One piece of a :class:`Task` frame too large for the broker's packet limit, framed in
    binary. The agent holds the pieces of ``(task, sha256)`` until all ``count`` are there, checks
    the whole against ``sha256`` and decodes it as a task (:mod:`sdk.pieces`). ``total`` is the
    whole frame's size; piece ``index`` holds exactly the bytes :func:`piece_span` gives it, so
    index, count, total and the data's length are checked together."""

    task: str
    index: int
    count: int
    total: int
    sha256: str
    data: bytes

    TYPE: ClassVar[str] = "task_piece"
    CHECKS: ClassVar[dict[str, Check]] = {
        "task": _ident, "index": _integer(0, MAX_PIECES - 1), "count": _integer(1, MAX_PIECES),
        "total": _integer(1, MAX_TASK_BYTES), "sha256": _sha256,
        "data": lambda where, v: None if isinstance(v, (bytes, bytearray, memoryview)) and len(v) <= MAX_TASK_BYTES
        else _fail(where, f"must be at most {MAX_TASK_BYTES} bytes", f"{type(v).__name__}"),
    }

    def check_fields_together(self) -> None:
        if self.index >= self.count:
            raise ProtocolError(f"task_piece.index {self.index} must be below task_piece.count {self.count}")
        if self.count > self.total:
            raise ProtocolError(f"task_piece.count {self.count} cuts {self.total} bytes into empty pieces")
        offset, length = piece_span(self.index, self.count, self.total)
        if length == 0:
            raise ProtocolError(f"task_piece.count {self.count} leaves piece {self.index} of {self.total} bytes empty")
        if len(self.data) != length:
            raise ProtocolError(f"task_piece.data holds {len(self.data)} bytes; piece {self.index} of {self.count} of "
                                f"{self.total} bytes holds {length}")

    def to_payload(self) -> bytes:
        _check_all(self.TYPE, self.CHECKS, self.__dict__)
        self.check_fields_together()
        return _frame({"type": self.TYPE, "task": self.task, "index": self.index, "count": self.count,
                       "total": self.total, "sha256": self.sha256}, bytes(self.data))

    @classmethod
    def from_payload(cls, payload: bytes) -> "TaskPiece":
        head, data = _unframe(payload, cls.TYPE)
        values = _header_fields(cls.TYPE, head, {k: v for k, v in cls.CHECKS.items() if k != "data"}, {})
        cls.CHECKS["data"]("task_piece.data", data)
        piece = cls(data=bytes(data), **values)
        piece.check_fields_together()
        return piece


def split_task(frame: bytes, task_id: str, max_piece: int) -> list[TaskPiece]:
    """Cut an encoded :class:`Task` frame into pieces of at most ``max_piece`` data bytes each."""
    if max_piece < 1:
        raise ProtocolError("task pieces need at least 1 byte of data each")
    count = -(-len(frame) // max_piece)
    if not 1 <= count <= MAX_PIECES:
        raise ProtocolError(f"a task of {len(frame)} bytes in pieces of {max_piece} needs {count} pieces; at most "
                            f"{MAX_PIECES} are allowed: raise the broker's packet limit")
    sha = hashlib.sha256(frame).hexdigest()
    view = memoryview(frame)
    pieces = []
    for i in range(count):
        offset, length = piece_span(i, count, len(frame))
        pieces.append(TaskPiece(task_id, i, count, len(frame), sha, bytes(view[offset : offset + length])))
    return pieces


def decode_task_channel(payload: bytes) -> "Task | TaskPiece":
    """A message on a device's ``task`` channel: a whole :class:`Task` or a :class:`TaskPiece`
    (told apart by the frame header's ``type``; anything else is a ProtocolError)."""
    if isinstance(payload, (bytes, bytearray, memoryview)) and len(payload) >= _FRAME.size:
        hlen = _FRAME.unpack_from(payload)[2]
        head = bytes(memoryview(payload)[_FRAME.size : _FRAME.size + min(hlen, _MAX_HEADER)])
        if head.startswith(b'{"type":"task_piece"'):  # how _frame writes it; a reordered header fails as a task
            return TaskPiece.from_payload(payload)
    return Task.from_payload(payload)


def _array(where: str, value: Any) -> None:
    """A numpy array a message carries raw: numeric dtype, rank and size within the bounds."""
    import numpy as np

    if not isinstance(value, np.ndarray):
        _fail(where, "must be a numpy array", type(value).__name__)
    tensor_nbytes(where, value.dtype.name, list(value.shape))


def _tensor_to_array(where: str, obj: Any) -> Any:
    """The array in an encoded tensor (``{"dtype", "shape", "b64"}``), checked as :func:`_tensor`."""
    import numpy as np

    _tensor(where, obj)
    return np.frombuffer(base64.b64decode(obj["b64"]), dtype=obj["dtype"]).reshape(tuple(obj["shape"]))


@dataclass
class TaskResult(Message):
    """The outputs of one :class:`Task` (batch first), or the error that stopped it. Durable. The
    version is empty when the task failed before a model was found.

    ``outputs`` are numpy arrays. On the wire the message is a binary frame, like a task: the
    JSON header holds every other field (``id`` and ``ts`` included) and ``outputs`` as
    ``{"dtype", "shape"}`` specs, and the raw bytes of the outputs follow, in order, exactly as
    many as the specs need: no base64. The JSON form (outputs as ``Result.encode_tensor``
    objects: what agents before binary results send) still decodes, through :func:`decode`,
    with every tensor checked the same way; constructed with such objects, the message holds
    their arrays."""

    TYPE: ClassVar[str] = "task_result"
    device: str = ""
    job: str = ""
    task: str = ""
    model: str = ""
    version: str = ""
    outputs: list[Any] = field(default_factory=list)  # numpy arrays, batch first
    error: str = ""
    elapsed_s: float = 0.0
    samples: int = 0

    CHECKS: ClassVar[dict[str, Check]] = {
        **Message.CHECKS, "device": _ident, "job": _ident, "task": _ident, "model": _ident,
        "version": _ident_or_empty, "outputs": _list_of(_array, MAX_TENSORS), "error": _text(),
        "elapsed_s": _SECONDS, "samples": _integer(0, MAX_TENSOR_BYTES),
    }

    def __post_init__(self) -> None:
        import numpy as np

        if type(self.outputs) is list and len(self.outputs) <= MAX_TENSORS:  # (else validate() refuses it)
            self.outputs = [o if isinstance(o, np.ndarray) else _tensor_to_array(f"{self.TYPE}.outputs[{i}]", o)
                            for i, o in enumerate(self.outputs)]

    def __eq__(self, other: object) -> bool:
        """Equal fields, and outputs of the same dtype, shape and bytes (numpy's ``==`` compares
        element-wise, so the dataclass's own comparison cannot be used)."""
        if type(other) is not type(self):
            return NotImplemented
        same = all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name != "outputs")
        return same and len(self.outputs) == len(other.outputs) and all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(self.outputs, other.outputs))

    __hash__ = None  # type: ignore[assignment]  # mutable, like every message

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (outputs base64-encoded): for stores and tools, not what agents send."""
        self.validate()
        return {"schema": SCHEMA_VERSION, "type": self.TYPE,
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "outputs"},
                "outputs": [Result.encode_tensor(a) for a in self.outputs]}

    def to_payload(self) -> bytes:
        import numpy as np

        self.validate()
        arrays = [np.ascontiguousarray(a) if a.ndim else a.copy(order="C") for a in self.outputs]
        head = {"type": self.TYPE, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "outputs"},
                "outputs": [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]}
        return _frame(head, b"".join(a.tobytes() for a in arrays))

    @classmethod
    def from_payload(cls, payload: bytes) -> "TaskResult":
        """The result in a binary frame (or, not framed, in the JSON form): every header field
        checked, each output spec numeric and bounded (rank 0..8), and the raw bytes exactly what
        the specs need together."""
        import numpy as np

        if not (isinstance(payload, (bytes, bytearray, memoryview)) and bytes(payload[:4]) == _MAGIC):
            msg = cls.from_dict(_load_json(payload))
            assert isinstance(msg, TaskResult)
            return msg
        head, data = _unframe(payload, cls.TYPE)
        specs = head.get("outputs")
        if type(specs) is not list or len(specs) > MAX_TENSORS:
            _fail(f"{cls.TYPE}.outputs", f"must be a list of at most {MAX_TENSORS} tensor specs", specs)
        arrays, offset = [], 0
        for i, spec in enumerate(specs):
            where = f"{cls.TYPE}.outputs[{i}]"
            if type(spec) is not dict or set(spec) != {"dtype", "shape"}:
                _fail(where, "must be a tensor spec with exactly dtype and shape", spec)
            n = tensor_nbytes(where, spec["dtype"], spec["shape"])
            if offset + n > len(data):
                raise ProtocolError(f"{where} needs {n} bytes, the frame holds {len(data) - offset} more")
            arrays.append(np.frombuffer(data, dtype=spec["dtype"], count=n // _ITEMSIZE[spec["dtype"]],
                                        offset=offset).reshape(tuple(spec["shape"])))
            offset += n
        if offset != len(data):
            raise ProtocolError(f"{cls.TYPE} frame holds {len(data) - offset} bytes beyond its outputs")
        checks = {k: v for k, v in cls.CHECKS.items() if k != "outputs"}
        values = _header_fields(cls.TYPE, head, checks, {})
        msg = cls(outputs=arrays, **values)
        msg.validate()
        return msg


#: every message class, JSON and binary: each declares one check per field
MESSAGE_CLASSES: tuple[type, ...] = (Status, Heartbeat, InstallCommand, RollbackCommand, ConfigCommand, Ack, InstallStatus,
                                     ChunkRequest, Chunk, Result, FleetStatus, WorkRequest, Task, TaskPiece,
                                     TaskResult)

_TYPES: dict[str, type[Message]] = {c.TYPE: c for c in MESSAGE_CLASSES if issubclass(c, Message)}


def decode(payload: bytes) -> Message:
    """Decode any JSON message by its ``type``, and the binary frame of a :class:`TaskResult`
    (the one binary message that travels on a device's ``up`` channel)."""
    if isinstance(payload, (bytes, bytearray, memoryview)) and bytes(payload[:4]) == _MAGIC:
        return TaskResult.from_payload(payload)
    data = _load_json(payload)
    kind = data.get("type")
    cls = _TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    return cls.from_dict(data)
