"""Fuzz a live agent and a live fleet on a real Mosquitto, then check that nothing broke.

Everything is real: a Mosquitto started here on a free loopback port, an ``edgesdk agent run``
process (real LiteRT, a signed digits bundle installed), a :class:`fleet.Fleet` in this process,
and a rogue paho client that publishes random and mutated messages on every channel:

* the agent's ``cmd``, ``chunk`` and ``task`` topics and the fleet's status topic (what agents read);
* the ``status``, ``heartbeat`` and ``up`` topics of the real device, of rogue "ghost" devices
  (they announce work and answer the tasks they get with outputs that never fit), of "phantom"
  devices (never asking for work, they answer tasks they were never given) and of device ids
  such as ``..`` (what the fleet reads);
* the agent's local API socket (random bytes, mutated requests, declared 4 GB tensors).

Inputs are random bytes, byte-level mutations and JSON-level mutations of real payloads (made
with :mod:`sdk.protocol` classes or seen on the broker, re-encoded with ``json.dumps`` so they
bypass the encoders' checks), and well-formed messages with hostile field values: ids that are
paths, 64-character ``./``/``../`` sha256 values pointing at sentinel files next to the state
dirs, huge sizes, NaN and negative numbers, wrong types, tasks with huge shapes and non-numeric
dtypes, chunk frames whose header length lies, installs of unknown bundles, rollbacks to
versions that do not exist, task results for tasks the sender does not hold, statuses speaking
for other devices. A job runs on the fleet during the fuzzing.

Afterwards: the agent process still runs and answers through its local API exactly as before,
the fleet's engine thread is alive, no exception escaped a receiver, nothing changed in the
temporary tree around the state dirs (sentinel files and directories, checked by listing,
mtime and content; nothing created next to it either), the fleet served no chunk outside a
rollout, the job run during the fuzzing and one run after it give the outputs of local
inference, and a rollout of version 2 SUCCEEDS. The exit code is 0 only when every check passes.

Safety: the inputs run against code that may still trust them (that is the point), and this
may run as root. So every string that reaches a receiver and contains ``/`` is one of the
vetted hostile paths, each resolving inside the temporary tree; any other candidate input is
dropped before it is sent. The agent process runs under an address-space limit.

    python bench/fuzz.py [--seconds 45] [--seed 1] [--rate 150] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fleet.broker import EmbeddedBroker, free_port  # noqa: E402

DEVICE = "fuzz-dev"
GHOSTS = ("ghost-0", "ghost-1")
PHANTOMS = ("phantom-0", "phantom-1")
#: topic levels the fleet takes as device ids (no '/', '+', '#' or NUL: those cannot be topic levels)
ODD_DEVICES = ("..", ".", "a b", "ünïcødé", "x" * 200, "$share", "%2e%2e", "-", "\u202eved", "CON")
CHANNELS = ("agent cmd", "agent chunk", "agent task", "fleet status topic", "device status", "device heartbeat",
            "device up", "local API socket")
KINDS = ("random bytes", "byte-mutated", "json-mutated", "hostile well-formed", "replayed")
_WEIGHTS = {"agent cmd": 3, "agent chunk": 2, "agent task": 2, "fleet status topic": 1, "device status": 2,
            "device heartbeat": 1, "device up": 3}
AGENT_ADDRESS_SPACE = 10 << 30  # a runaway allocation fails in the agent instead of starving the machine
MEMORY_BOUND = 1 << 30
_FRAME = struct.Struct("!4sBI")
_LOCAL_HDR = struct.Struct("<2sH")
SECRET_MARKER = b"EDGESDK-FUZZ-SECRET-"
log = logging.getLogger("edgesdk.fuzz")


# --- the temporary tree ------------------------------------------------------------------------------------
def pad_path(path: str, length: int = 64) -> Optional[str]:
    """``path`` written with ``./`` (and one ``//``) to exactly ``length`` characters, or None."""
    head, rest = ("/", path[1:]) if path.startswith("/") else ("", path)
    need = length - len(path)
    if need < 0:
        return None
    if need % 2:
        i = rest.find("/")
        if i <= 0:
            return None
        rest = rest[:i] + "/" + rest[i:]
        need -= 1
    return head + "./" * (need // 2) + rest


@dataclass
class Layout:
    """``top/root`` holds the state dirs and the sentinels; nothing may appear in ``top`` or
    change in it outside the state dirs. Logs and the broker's files live in ``aux``."""

    top: Path
    root: Path
    agent_state: Path
    fleet_state: Path
    aux: Path
    run_id: str
    secret: bytes = b""

    @classmethod
    def make(cls) -> "Layout":
        top = Path(tempfile.mkdtemp(prefix="edgesdk-fuzz-")).resolve()
        aux = Path(tempfile.mkdtemp(prefix="edgesdk-fuzz-aux-")).resolve()
        root = top / "root"
        lay = cls(top, root, root / "agent-state", root / "fleet-state", aux, uuid.uuid4().hex[:8])
        lay._plant()
        return lay

    def _plant(self) -> None:
        sentinel = self.root / "sentinel"
        for d in (sentinel / "dir", sentinel / "empty", self.root / "bundles", self.root / "keys", self.top / "cwd",
                  self.agent_state, self.fleet_state):
            d.mkdir(parents=True, exist_ok=True)
        (sentinel / "note.txt").write_text("a file next to the state dirs: it must not change\n")
        (sentinel / "dir" / "inner.txt").write_text("a file in a directory a hostile sha256 points at\n")
        self.secret = SECRET_MARKER + uuid.uuid4().hex.encode()
        (sentinel / "secret.edgebundle").write_bytes(self.secret * 64)
        (self.top / "outside.txt").write_text("next to the temp root\n")

    @property
    def escape_name(self) -> str:
        return f"escape-{self.run_id}"

    def hostile_paths(self) -> list[str]:
        """64-character sha256 values that are paths. Joined where the stores join such values
        (``<state>/transfers/X``, ``<state>/models/X``, ``<state>/bundles/X.edgebundle``) each
        resolves inside ``top``; joined one directory higher, the ``escape`` ones land next to
        ``top``, where :meth:`escapes` looks for them."""
        sentinel = self.root / "sentinel"
        raw = ["../../sentinel/dir", "../../sentinel/secret", "../../sentinel/made-by-fuzz",
               f"../../../{self.escape_name}", str(sentinel / "dir"), str(sentinel / "secret"),
               str(sentinel / "abs-made-by-fuzz"), str(self.top / self.escape_name)]
        return [p for p in (pad_path(r) for r in raw) if p is not None]

    def hostile_short_paths(self) -> list[str]:
        """Paths for id fields (not 64 characters)."""
        return ["../../sentinel/short", f"../../../{self.escape_name}-id", str(self.root / "sentinel" / "abs-id"),
                "./../sentinel"]

    def vetted(self) -> frozenset[str]:
        return frozenset(self.hostile_paths() + self.hostile_short_paths())

    def escapes(self) -> list[str]:
        """Anything a hostile path made next to ``top`` (the one place outside it they could reach
        if some code joined them one directory higher than expected)."""
        return sorted(str(p) for p in self.top.parent.glob(f"{self.escape_name}*"))

    def cleanup(self, keep: bool) -> None:
        for p in self.escapes():
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
        if not keep:
            shutil.rmtree(self.top, ignore_errors=True)
            shutil.rmtree(self.aux, ignore_errors=True)


def snapshot(top: Path, skip: Iterable[Path]) -> dict[str, tuple]:
    """Every entry under ``top`` except the ``skip`` subtrees: kind, size, mtime, content digest."""
    skipped = {Path(p) for p in skip}
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if d / n not in skipped)
        st = os.lstat(d)
        out[str(d.relative_to(top))] = ("dir", st.st_mtime_ns, tuple(sorted(os.listdir(d))))
        for name in filenames:
            p = d / name
            st = os.lstat(p)
            if os.path.islink(p):
                out[str(p.relative_to(top))] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p.relative_to(top))] = ("file", st.st_size, st.st_mtime_ns, digest)
            else:
                out[str(p.relative_to(top))] = ("other", st.st_mode)
    return out


def snapshot_diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    changes = [f"created {p}" for p in sorted(set(after) - set(before))]
    changes += [f"deleted {p}" for p in sorted(set(before) - set(after))]
    for p in sorted(set(before) & set(after)):
        if before[p] != after[p]:
            b, a = before[p], after[p]
            what = "listing" if b[0] == "dir" and b[2] != a[2] else "mtime" if b[0] == "dir" else \
                "content" if b[0] == "file" and b[3] != a[3] else "metadata"
            changes.append(f"changed {p} ({what})")
    return changes


# --- the broker, the bundles, the agent process ------------------------------------------------------------
@dataclass
class Bundles:
    v1: Path
    v2: Path
    public_key: Path


def build_bundles(work: Path) -> Bundles:
    """The digits CNN, trained here, as version 1 (int8) and version 2 (float32), signed."""
    from converter import convert
    from converter.digits import load_digits_split, train_digits_cnn
    from sdk.signing import generate_keys

    work.mkdir(parents=True, exist_ok=True)
    private, public = generate_keys(work / "keys")
    data = load_digits_split()
    model, _ = train_digits_cnn(data, epochs=3)
    model.save(work / "digits.keras")
    np.savez(work / "calib.npz", x=data.x_train[:300])
    v1 = convert(work / "digits.keras", target="cpu", quantize="int8", calibration=work / "calib.npz", key=private,
                 output=work / "digits-1.edgebundle", runs=3).bundle_path
    v2 = convert(work / "digits.keras", target="cpu", quantize="none", version="2", key=private,
                 output=work / "digits-2.edgebundle", runs=3).bundle_path
    return Bundles(Path(v1), Path(v2), Path(public))


def local_predictions(bundle_path: Path, x: np.ndarray) -> np.ndarray:
    """What the agent must answer: the bundle's model run here, one sample at a time."""
    from sdk.bundle import Bundle
    from sdk.runtime import dequantize, open_engine, quantize

    engine = open_engine(Bundle.open(bundle_path).model_bytes(), "cpu")
    spec_in, spec_out = engine.inputs[0], engine.outputs[0]
    out = []
    for s in x:
        xi = s[None].astype(np.float32)
        xi = quantize(xi, spec_in) if spec_in.quantized else xi
        out.append(dequantize(engine.run([xi])[0], spec_out))
    return np.concatenate(out)


def _proc_memory(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmSize", "VmRSS", "VmHWM", "VmPeak"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class AgentProcess:
    """``python -m edgesdk agent run --config ...`` with its state in the layout and its log in aux."""

    def __init__(self, layout: Layout, url: str, public_key: Path) -> None:
        from agent.config import load_config

        self.layout = layout
        self.config = load_config(None, env={}, device_id=DEVICE, broker_url=url, state_dir=layout.agent_state,
                                  trusted_keys=[str(public_key)], threads=1, pool_size=1, heartbeat_interval=1.0,
                                  tags={"fuzz": "real"})
        self.config_path = layout.aux / "agent.toml"
        self.config_path.write_text(self.config.to_toml())
        self.log_path = layout.aux / "agent.log"
        self.proc: Optional[subprocess.Popen] = None

    def preinstall(self, bundle: Path) -> None:
        from agent import Agent

        setup = Agent(self.config)
        setup.install(bundle)
        setup.stop()

    def start(self) -> None:
        def limits() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (AGENT_ADDRESS_SPACE, AGENT_ADDRESS_SPACE))

        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgesdk", "agent", "run", "--config", str(self.config_path)],
                stdout=fh, stderr=subprocess.STDOUT, cwd=self.layout.top / "cwd", preexec_fn=limits,
                env={**os.environ, "EDGESDK_DEBUG": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                     "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})

    @property
    def socket_path(self) -> Path:
        return Path(self.config.socket_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        return _proc_memory(self.proc.pid) if self.alive else {}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# --- what the receivers said -------------------------------------------------------------------------------
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ([\w.]+): (.*)$")
_DROP_WORDS = ("ignored", "discarded", "declined", "dropped", "refused", "malformed", "rejected")


def _exception_line(block: list[str]) -> str:
    """The ``Type: message`` line of a traceback block (the last exception of a chain)."""
    last = ""
    for line in block:
        if line and not line.startswith((" ", "Traceback", "During handling", "The above exception")):
            last = line
    return last[:300]


def parse_agent_log(text: str) -> dict[str, Any]:
    """Tracebacks (grouped by where and what) and warnings that say an input was dropped."""
    drops: Counter = Counter()
    crashes: dict[tuple[str, str], dict[str, Any]] = {}
    context, block = "", None

    def flush() -> None:
        if block:
            key = (re.sub(r"edgesdk/v1/devices/[^ ]+/", "edgesdk/v1/devices/*/", context)[:200], _exception_line(block))
            entry = crashes.setdefault(key, {"where": key[0], "error": key[1], "count": 0, "example": ""})
            entry["count"] += 1
            if not entry["example"]:
                entry["example"] = "\n".join([context] + block[-14:])

    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if line.startswith("Traceback (most recent call last)"):
            if block is None:
                block = []
            block.append(line)
            continue
        if m or line.startswith("Exception in thread"):
            flush()
            block = None
            context = line if not m else f"{m[1]} {m[2]}: {m[3]}"
            if m and m[1] == "WARNING":
                for word in _DROP_WORDS:
                    if word in m[3]:
                        drops[word] += 1
                        break
            continue
        if block is not None:
            block.append(line)
    flush()
    return {"crashes": sorted(crashes.values(), key=lambda e: -e["count"]), "drops": dict(drops),
            "tracebacks": sum(e["count"] for e in crashes.values())}


class LogCapture(logging.Handler):
    """The in-process fleet's warnings and errors (and every traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.drops: Counter = Counter()
        self.crashes: dict[tuple[str, str], dict[str, Any]] = {}  # emit() runs under the handler's own lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format is itself worth seeing
            message = str(record.msg)
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            error = _exception_line(text.splitlines())
            where = re.sub(r"edgesdk/v1/devices/[^ ]+/", "edgesdk/v1/devices/*/", f"{record.name}: {message}")[:200]
            entry = self.crashes.setdefault((where, error), {"where": where, "error": error, "count": 0,
                                                             "example": text[-2500:], "input": _payload_in_flight()})
            entry["count"] += 1
        elif record.levelno >= logging.WARNING:
            for word in _DROP_WORDS:
                if word in message:
                    self.drops[word] += 1
                    break


def _payload_in_flight() -> str:
    """The message the logging thread was processing, from its callers' ``topic`` and ``payload``
    locals (a diagnostic: the fleet's log says which topic, not which bytes)."""
    frame_ = sys._getframe(2)
    for _ in range(40):
        if frame_ is None:
            break
        payload, topic = frame_.f_locals.get("payload"), frame_.f_locals.get("topic")
        if isinstance(payload, (bytes, bytearray)) and isinstance(topic, str):
            data = bytes(payload)
            return f"on {topic}: {data[:400]!r}" + (f"... ({len(data)} bytes)" if len(data) > 400 else "")
        frame_ = frame_.f_back
    return ""


# --- inputs ----------------------------------------------------------------------------------------------
def frame(header: Any, data: bytes = b"", *, magic: bytes = b"ESDK", schema: int = 1, hlen: Optional[int] = None) -> bytes:
    """A binary frame like the protocol's, with whatever header (and header length) we like."""
    head = header if isinstance(header, bytes) else hostile_json(header)
    return _FRAME.pack(magic, schema & 0xFF, (len(head) if hlen is None else hlen) & 0xFFFFFFFF) + head + data


def unframe_header(payload: bytes) -> Any:
    """The header a receiver would parse from a frame (None when it is not JSON)."""
    if len(payload) < _FRAME.size:
        return None
    _, _, hlen = _FRAME.unpack_from(payload)
    return _json_or_none(payload[_FRAME.size : _FRAME.size + hlen])


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError):
        return None


def _strings(value: Any, depth: int = 0) -> Iterable[str]:
    if depth > 200:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, depth + 1)
            yield from _strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, depth + 1)


RAW_TOKENS = {
    "@@DEEP@@": "[" * 30000 + "]" * 30000,
    "@@DEEPOBJ@@": '{"a":' * 5000 + "1" + "}" * 5000,
    "@@DIGITS@@": "1" * 5000,  # more digits than int() converts
    "@@1E999@@": "1e999",
    "@@-1E999@@": "-1e999",
    "@@SURROGATE@@": '"\\ud800x"',
    "@@NUL@@": '"a\\u0000b"',
}


def hostile_json(obj: Any) -> bytes:
    """``json.dumps`` (NaN and Infinity allowed), with the :data:`RAW_TOKENS` markers replaced by
    what no encoder writes: 30,000-deep nesting, 5,000-digit numbers, ``1e999``, lone surrogates."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=True)
    except (ValueError, TypeError, RecursionError):
        text = json.dumps({"schema": 1, "type": "status"})
    for marker, raw in RAW_TOKENS.items():
        text = text.replace(f'"{marker}"', raw)
    return text.encode("utf-8", "surrogatepass")


HOSTILE_NUMBERS = [-1, 0, 1, -(2**63) - 1, 2**31, 2**63, 2**64 + 1, 10**30, -(10**30), 1e308, 0.5, -0.0,
                   float("nan"), float("inf"), float("-inf"), "12", "NaN", True, None, [], {}, "@@DIGITS@@",
                   "@@1E999@@", "@@-1E999@@"]
HOSTILE_IDS = ["..", ".", "", " ", "-rf", "a" * 129, "a" * 5000, "\x00", "id\nnewline", "ünï", "*", "%s%s%n",
               "$(reboot)", "a:b", "\ud800", 5, None, [], {}, True, -1.5, float("nan"), "@@SURROGATE@@", "@@NUL@@",
               "A" * 64, "1" * 63]
HOSTILE_ANY = HOSTILE_NUMBERS + HOSTILE_IDS + [[1, "x", None], {"a": {"b": [1, 2]}}, "x" * 100_000,
                                               "@@DEEP@@", "@@DEEPOBJ@@", ["a"] * 10_000]
NUMBER_FIELDS = {"ts", "bundle_size", "chunk_size", "free_disk_bytes", "uptime_s", "outbox_pending", "capacity",
                 "free", "elapsed_s", "samples", "p50_ms", "previous_p50_ms", "index", "count", "lease_s", "attempt",
                 "schema"}
ID_FIELDS = {"id", "device", "model", "version", "rollout", "job", "task", "session", "key", "to_version",
             "previous_version", "min_runtime_version", "agent_version", "state", "reason", "error"}
SHA_FIELDS = {"bundle_sha256", "sha256"}


def encode_tensor(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def hostile_tensors(rng: random.Random) -> list[Any]:
    """Encoded outputs that never fit a digits task (wrong dtype, shape, count, encoding)."""
    n = rng.randint(1, 8)
    choices = [
        [encode_tensor(np.zeros((n, 10), np.int8))],
        [encode_tensor(np.zeros((n, 11), np.float32))],
        [encode_tensor(np.zeros((n, 10, 1), np.float32))],
        [encode_tensor(np.zeros((n, 10), np.float32)), encode_tensor(np.zeros((n, 10), np.float32))],
        [{"dtype": "float32", "shape": [n, 10], "b64": "!!not base64!!"}],
        [{"dtype": "float32", "shape": [n, 10], "b64": base64.b64encode(b"\0" * 7).decode()}],
        [{"dtype": "object", "shape": [n, 10], "b64": base64.b64encode(b"\0" * 80 * n).decode()}],
        [{"dtype": "<U5", "shape": [n], "b64": base64.b64encode(b"\0" * 20 * n).decode()}],
        [{"dtype": "V8", "shape": [n], "b64": base64.b64encode(b"\0" * 8 * n).decode()}],
        [{"dtype": "complex64", "shape": [n, 10], "b64": base64.b64encode(b"\0" * 80 * n).decode()}],
        [{"dtype": "datetime64[s]", "shape": [n, 10], "b64": base64.b64encode(b"\0" * 80 * n).decode()}],
        [{"dtype": "float32", "shape": [-1, 10], "b64": base64.b64encode(b"\0" * 40).decode()}],
        [{"dtype": "float32", "shape": [2**40, 2**40], "b64": ""}],
        [{"dtype": "float32", "shape": "abc", "b64": ""}],
        [{"dtype": {"x": 1}, "shape": [1], "b64": ""}],
        [{"shape": [n, 10]}],
        [5], ["x"], [None], [], {"a": 1}, "outputs", None,
        [encode_tensor(np.zeros((0, 10), np.float32))],
        [encode_tensor(np.zeros((n + 1000, 10), np.float32))],
    ]
    return rng.choice(choices)


@dataclass
class Input:
    channel: str
    kind: str
    topic: str  # an MQTT topic, or "local" for the local API
    payload: bytes


class Corpus:
    """Real payloads seen on the broker (the genuine ones, not the rogue's), per topic kind."""

    def __init__(self, limit: int = 40) -> None:
        self.limit = limit
        self.by_kind: dict[str, list[bytes]] = defaultdict(list)
        self.lock = threading.Lock()

    def add(self, kind: str, payload: bytes) -> None:
        with self.lock:
            items = self.by_kind[kind]
            if len(items) >= self.limit:
                items.pop(0)
            items.append(payload)

    def pick(self, rng: random.Random, kind: str) -> Optional[bytes]:
        with self.lock:
            items = self.by_kind.get(kind)
            return rng.choice(items) if items else None


@dataclass
class RealTask:
    job: str
    task: str
    count: int
    payload: bytes


class Generator:
    """Makes the inputs for every channel from a seeded RNG and what the broker showed."""

    def __init__(self, rng: random.Random, layout: Layout, corpus: Corpus, v1_sha: str, v1_size: int) -> None:
        from sdk import protocol as proto

        self.proto = proto
        self.rng = rng
        self.layout = layout
        self.corpus = corpus
        self.v1_sha, self.v1_size = v1_sha, v1_size
        self.paths = layout.hostile_paths()
        self.short_paths = layout.hostile_short_paths()
        self.vetted = layout.vetted()
        self.real_tasks: dict[str, RealTask] = {}
        self.tasks_lock = threading.Lock()

    # --- topics --------------------------------------------------------------------------------
    def t(self, device: str, channel: str) -> str:
        return f"edgesdk/v1/devices/{device}/{channel}"

    def any_device(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return DEVICE
        if r < 0.55:
            return self.rng.choice(GHOSTS)
        if r < 0.8:
            return self.rng.choice(PHANTOMS)
        return self.rng.choice(ODD_DEVICES)

    # --- value pools ---------------------------------------------------------------------------
    def rid(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def hex64(self) -> str:
        return f"{self.rng.getrandbits(256):064x}"

    def hostile_sha(self) -> Any:
        return self.rng.choice(self.paths + self.paths + ["A" * 64, "g" * 64, "0" * 63, "0" * 65, self.hex64().upper(),
                                                          " " * 64, "." * 64, self.v1_sha, self.hex64()]
                               + HOSTILE_IDS[:8])

    def hostile_for(self, name: str) -> Any:
        rng = self.rng
        if name in SHA_FIELDS:
            return self.hostile_sha()
        if name in NUMBER_FIELDS:
            return rng.choice(HOSTILE_NUMBERS)
        if name in ID_FIELDS:
            return rng.choice(HOSTILE_IDS + self.short_paths)
        if name in ("indices", "ack_ids", "running", "delegates"):
            return rng.choice([list(range(100_000)), [-1], [2**63], ["0"], [None], [1.5], [float("nan")], "0", {},
                               [[1]], [self.rid() for _ in range(5000)], [rng.choice(self.short_paths)], None])
        if name in ("models", "tags", "runtime", "meta"):
            return rng.choice([{self.short_paths[0]: "1"}, {"digits": 5}, {"digits": {"a": [1]}}, {"a" * 1000: "1"},
                               ["digits"],
                               {str(i): "1" for i in range(3000)}, {"digits": rng.choice(self.short_paths)}, "x", None,
                               {"digits": "1" * 5000}, {"": ""}])
        if name in ("outputs",):
            return hostile_tensors(rng)
        if name in ("online", "accepting_work"):
            return rng.choice(["yes", 0, 1, None, [], "false", 2])
        return rng.choice(HOSTILE_ANY)

    # --- generic mutations -----------------------------------------------------------------------
    def random_bytes(self) -> bytes:
        rng = self.rng
        n = rng.choice([0, 1, 2, 4, 9, 16, 64, 300, 1000, 5000, 70_000])
        if rng.random() < 0.4:  # JSON-ish garbage
            alphabet = b'{}[]":,0123456789.-+eEtruefalsnul \\\n\tabcdefxyz'
            return bytes(rng.choice(alphabet) for _ in range(n))
        if rng.random() < 0.3:
            return b"ESDK\x01" + self.rng.randbytes(n)
        return self.rng.randbytes(n)

    def byte_mutate(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(["flip", "set", "insert", "delete", "dup", "truncate", "splice"])
            if op == "flip" and out:
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
            elif op == "set" and out:
                out[rng.randrange(len(out))] = rng.choice([0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("\\"), ord("-")])
            elif op == "insert":
                i = rng.randint(0, len(out))
                out[i:i] = rng.choice([rng.randbytes(rng.randint(1, 8)), b'"', b"\\u0000", b"-1", b"1e999", b"[", b"}",
                                       b"null", b"NaN"])
            elif op == "delete" and out:
                i = rng.randrange(len(out))
                del out[i : i + rng.randint(1, 16)]
            elif op == "dup" and out:
                i = rng.randrange(len(out))
                out[i:i] = out[i : i + rng.randint(1, 64)]
            elif op == "truncate":
                del out[rng.randint(0, len(out)):]
            elif op == "splice":
                out += self.random_bytes()[:64]
        return bytes(out)

    def json_mutate(self, obj: Any) -> Any:
        """Structural mutations anywhere in a decoded message (type and schema too)."""
        rng = self.rng
        obj = copy.deepcopy(obj)
        for _ in range(rng.randint(1, 3)):
            container, key = self._random_slot(obj)
            if container is None:
                obj = rng.choice(HOSTILE_ANY + [[obj], {"wrapped": obj}])
                continue
            op = rng.choice(["replace", "replace", "delete", "add", "wrap", "type"])
            if op == "replace":
                container[key] = self.hostile_for(str(key)) if isinstance(container, dict) else rng.choice(HOSTILE_ANY)
            elif op == "delete":
                del container[key]
            elif op == "add" and isinstance(container, dict):
                container[rng.choice(["extra", "__proto__", "device", "type", "schema", "id", "a" * 300])] = \
                    rng.choice(HOSTILE_ANY)
            elif op == "wrap":
                container[key] = [container[key]]
            elif op == "type" and isinstance(container, dict):
                container["type"] = rng.choice(["status", "heartbeat", "install", "rollback", "ack", "install_status",
                                                "chunk_request", "result", "fleet_status", "task_result", "task",
                                                "chunk", "nope", "", None, 5, ["status"]])
        return obj

    def _random_slot(self, obj: Any) -> tuple[Any, Any]:
        slots: list[tuple[Any, Any]] = []

        def walk(v: Any, depth: int) -> None:
            if depth > 4:
                return
            if isinstance(v, dict):
                for k in list(v)[:50]:
                    slots.append((v, k))
                    walk(v[k], depth + 1)
            elif isinstance(v, list):
                for i in range(min(len(v), 10)):
                    slots.append((v, i))
                    walk(v[i], depth + 1)

        walk(obj, 0)
        return self.rng.choice(slots) if slots else (None, None)

    def hostile_fields(self, seed: dict[str, Any]) -> dict[str, Any]:
        """A well-formed message (schema and type kept) with 1-3 fields set to hostile values."""
        msg = copy.deepcopy(seed)
        names = [k for k in msg if k not in ("schema", "type")]
        for name in self.rng.sample(names, min(len(names), self.rng.randint(1, 3))):
            msg[name] = self.hostile_for(name)
        return msg

    def dumps(self, obj: Any) -> bytes:
        return hostile_json(obj)

    # --- seeds: valid messages of every kind ----------------------------------------------------
    def seed(self, kind: str, device: str = DEVICE) -> dict[str, Any]:
        p = self.proto
        real_device = device
        device = DEVICE
        n = self.rng.randint(1, 4)
        make: dict[str, Callable[[], Any]] = {
            "install": lambda: p.InstallCommand(model="digits", version=str(self.rng.randint(2, 99)),
                                                bundle_sha256=self.hex64(), bundle_size=self.rng.randint(1, 10**6),
                                                rollout=self.rid()),
            "install-v1": lambda: p.InstallCommand(model="digits", version="1", bundle_sha256=self.v1_sha,
                                                   bundle_size=self.v1_size),
            "rollback": lambda: p.RollbackCommand(model="digits", to_version=self.rng.choice([None, "7", "1x", "2"]),
                                                  rollout=self.rid()),
            "ack": lambda: p.Ack(ack_ids=[self.rid() for _ in range(n)]),
            "status": lambda: p.Status(device=device, online=True, agent_version="0.0.0", runtime={"name": "litert"},
                                       delegates=["cpu"], models={"digits": "1"}, tags={"fuzz": "ghost"},
                                       free_disk_bytes=10**9),
            "heartbeat": lambda: p.Heartbeat(device=device, uptime_s=1.0, outbox_pending=0,
                                             models={"digits": {"version": "1", "p50_ms": 1.0, "requests": 3}}),
            "install_status": lambda: p.InstallStatus(device=device, model="digits", version="2", rollout=self.rid(),
                                                      state=self.rng.choice(p.InstallStatus.STATES)),
            "task_result": lambda: p.TaskResult(device=device, job=self.rid(), task=self.rid(), model="digits", version="1",
                                                outputs=[encode_tensor(np.zeros((n, 10), np.float32))], samples=n),
            "result": lambda: p.Result(device=device, model="digits", version="1", key="k",
                                       outputs=[encode_tensor(np.zeros((1, 10), np.float32))]),
            "chunk_request": lambda: p.ChunkRequest(device=device,
                                                    bundle_sha256=self.rng.choice([self.v1_sha, self.hex64()]),
                                                    indices=[0]),
            "work_request": lambda: p.WorkRequest(device=device, models={"digits": "1"}, capacity=2, free=2),
            "fleet_status": lambda: p.FleetStatus(online=True, session=self.rid()),
        }
        msg = make[kind]().to_dict()
        if "device" in msg:  # built valid (the encoder checks it), then the device the topic says, whatever it is
            msg["device"] = real_device
        return msg

    def task_header(self, count: int, **over: Any) -> dict[str, Any]:
        head = {"type": "task", "id": self.rid(), "job": self.rid(), "model": "digits", "lease_s": 5.0, "attempt": 1,
                "inputs": [{"dtype": "float32", "shape": [count, 8, 8, 1]}]}
        head.update(over)
        return head

    def task_frame(self, count: int) -> bytes:
        data = np.random.default_rng(self.rng.randrange(2**32)).random((count, 8, 8, 1), dtype=np.float32).tobytes()
        return frame(self.task_header(count), data)

    def chunk_frame(self, sha: Any, data: bytes, index: Any = 0, count: Any = 1, chunk_sha: Any = None,
                    **kw: Any) -> bytes:
        head = {"type": "chunk", "bundle_sha256": sha, "index": index, "count": count,
                "sha256": hashlib.sha256(data).hexdigest() if chunk_sha is None else chunk_sha}
        return frame(head, data, **kw)

    # --- per channel ------------------------------------------------------------------------------
    def kind(self, weights: tuple[int, int, int, int, int] = (1, 2, 2, 4, 1)) -> str:
        return self.rng.choices(KINDS, weights=weights)[0]

    def json_input(self, channel: str, topic: str, seeds: list[str], device: str = DEVICE,
                   replay_kind: Optional[str] = None) -> list[Input]:
        kind = self.kind()
        seed = self.seed(self.rng.choice(seeds), device)
        if kind == "random bytes":
            return [Input(channel, kind, topic, self.random_bytes())]
        if kind == "replayed":
            real = self.corpus.pick(self.rng, replay_kind or channel)
            if real is not None:
                return [Input(channel, kind, topic, real)]
            kind = "byte-mutated"
        if kind == "byte-mutated":
            base = self.corpus.pick(self.rng, replay_kind or channel) if self.rng.random() < 0.5 else None
            return [Input(channel, kind, topic, self.byte_mutate(base or self.dumps(seed)))]
        if kind == "json-mutated":
            base = _json_or_none(self.corpus.pick(self.rng, replay_kind or channel) or b"") or seed
            return [Input(channel, kind, topic, self.dumps(self.json_mutate(base)))]
        return [Input(channel, kind, topic, self.dumps(self.hostile_fields(seed)))]

    def agent_cmd(self) -> list[Input]:
        topic = self.t(DEVICE, "cmd")
        r = self.rng.random()
        if r < 0.12:
            return self.traversal_scenario()
        if r < 0.2:  # an install of an unknown bundle, of v1 with a lying size, for a model it does not have
            cmd = self.seed("install")
            cmd.update(self.rng.choice([{}, {"bundle_sha256": self.v1_sha, "version": "5"},
                                        {"bundle_sha256": self.v1_sha, "bundle_size": self.v1_size + 1, "version": "1"},
                                        {"model": "nope"}, {"bundle_size": 1, "chunk_size": 1}]))
            return [Input("agent cmd", "hostile well-formed", topic, self.dumps(cmd))]
        if r < 0.27:  # rollbacks to versions that do not exist, of models that do not exist
            cmd = self.seed("rollback")
            cmd.update(model=self.rng.choice(["digits", "digits", "nope", "..", "../../sentinel/short"]),
                       to_version=self.rng.choice(["7", "0", "..", "../../sentinel/short", "", None, "1" * 200]))
            return [Input("agent cmd", "hostile well-formed", topic, self.dumps(cmd))]
        return self.json_input("agent cmd", topic, ["install", "install", "install-v1", "rollback", "ack"])

    def traversal_scenario(self) -> list[Input]:
        """An install whose bundle_sha256 is a path, then the one chunk it asks for, which fails
        the whole-bundle check: the transfer is discarded (the issue's first finding)."""
        sha = self.rng.choice(self.paths)
        data = bytes(self.rng.randrange(256) for _ in range(self.rng.choice([10, 100])))
        size = len(data) + self.rng.choice([0, 0, 1])  # a size that fits, or one byte more (assemble refuses)
        cmd = self.seed("install")
        cmd.update(bundle_sha256=sha, bundle_size=size, version=str(self.rng.randint(2, 99)))
        chunk = self.chunk_frame(sha, _no_slash(data))
        return [Input("agent cmd", "hostile well-formed", self.t(DEVICE, "cmd"), self.dumps(cmd)),
                Input("agent chunk", "hostile well-formed", self.t(DEVICE, "chunk"), chunk)]

    def agent_chunk(self) -> list[Input]:
        topic = self.t(DEVICE, "chunk")
        rng = self.rng
        kind = self.kind((2, 3, 2, 5, 1))
        data = _no_slash(self.rng.randbytes(rng.choice([0, 10, 1000])))
        if kind == "random bytes":
            return [Input("agent chunk", kind, topic, self.random_bytes())]
        if kind == "replayed" and self.corpus.pick(rng, "agent chunk"):
            return [Input("agent chunk", kind, topic, self.corpus.pick(rng, "agent chunk"))]
        if kind in ("byte-mutated", "replayed"):
            base = self.corpus.pick(rng, "agent chunk") or self.chunk_frame(self.hex64(), data)
            return [Input("agent chunk", "byte-mutated", topic, self.byte_mutate(base))]
        if kind == "json-mutated":
            head = {"type": "chunk", "bundle_sha256": self.hex64(), "index": 0, "count": 1,
                    "sha256": hashlib.sha256(data).hexdigest()}
            return [Input("agent chunk", kind, topic, frame(self.json_mutate(head), data))]
        variant = rng.randrange(8)
        if variant == 0:  # lying header length
            good = self.chunk_frame(self.hex64(), data)
            hlen = rng.choice([0, 1, 2**32 - 1, len(good), 10**6, _FRAME.unpack_from(good)[2] + rng.choice([-5, -1, 1, 7])])
            return [Input("agent chunk", kind, topic, _FRAME.pack(b"ESDK", 1, hlen & 0xFFFFFFFF) + good[_FRAME.size:])]
        if variant == 1:  # wrong magic, schema, header kinds
            return [Input("agent chunk", kind, topic, rng.choice([
                self.chunk_frame(self.hex64(), data, magic=b"EDSK"), self.chunk_frame(self.hex64(), data, schema=0),
                self.chunk_frame(self.hex64(), data, schema=255), frame(b"[1,2]", data), frame(b"null", data),
                frame(b'"chunk"', data), frame({"type": "task"}, data), frame({}, data),
                frame(b'{"type":"chunk","bundle_sha256":' + RAW_TOKENS["@@DEEP@@"].encode() + b"}", data)]))]
        if variant == 2:  # too much data
            big = _no_slash(self.rng.randbytes(rng.choice([128 * 1024 + 1, 200_000])))
            return [Input("agent chunk", kind, topic, self.chunk_frame(rng.choice([self.hex64(), self.v1_sha]), big))]
        head = {"type": "chunk", "bundle_sha256": rng.choice([self.hex64(), self.v1_sha]), "index": 0, "count": 1,
                "sha256": hashlib.sha256(data).hexdigest()}
        return [Input("agent chunk", kind, topic, frame(self.hostile_fields(head), data))]

    def agent_task(self) -> list[Input]:
        topic = self.t(DEVICE, "task")
        rng = self.rng
        kind = self.kind((2, 3, 2, 5, 1))
        if kind == "random bytes":
            return [Input("agent task", kind, topic, self.random_bytes())]
        if kind == "replayed":
            with self.tasks_lock:
                real = rng.choice(list(self.real_tasks.values())) if self.real_tasks else None
            if real is not None:  # byte for byte: the device answers it as it did the first time
                return [Input("agent task", kind, topic, real.payload)]
            kind = "byte-mutated"
        if kind == "byte-mutated":
            return [Input("agent task", kind, topic, self.byte_mutate(self.task_frame(rng.randint(1, 3))))]
        count = rng.randint(0, 3)
        data = np.random.default_rng(rng.randrange(2**32)).random((count, 8, 8, 1), dtype=np.float32).tobytes()
        if kind == "json-mutated":
            return [Input("agent task", kind, topic, frame(self.json_mutate(self.task_header(count)), data))]
        variant = rng.randrange(6)
        if variant == 0:  # huge shapes, little data
            shape = rng.choice([[10**12, 8, 8, 1], [2**31, 2**31], [2**32, 2**32, 0], [2**62, 4], [1] * 64,
                                [-1, 8, 8, 1], [0, 8, 8, 1], [1, 8, 8], [], [count, 8, 8, 1, 1]])
            head = self.task_header(count, inputs=[{"dtype": "float32", "shape": shape}])
        elif variant == 1:  # non-numeric and odd dtypes
            dtype = rng.choice(["object", "O", "U8", "<U2", "S3", "V4", "V256", "complex64", "datetime64[s]",
                                "timedelta64", "float16", ">f4", "float128", "bool", "int64", 5, None, {}, "",
                                "f4,f4", "(2,)f4", "M8"])
            head = self.task_header(count, inputs=[{"dtype": dtype, "shape": [count, 8, 8, 1]}])
        elif variant == 2:  # inputs that do not add up
            head = self.task_header(count, inputs=rng.choice([[], [{"dtype": "float32", "shape": [count, 8, 8, 1]}] * 2,
                                                              [{"dtype": "float32"}], [{"shape": [1]}], "x", None,
                                                              [{"dtype": "float32", "shape": [count, 8, 8, 1]}] * 100]))
            data = data + _no_slash(self.rng.randbytes(rng.choice([0, 1, 255])))
        else:  # ids that are paths, NaN leases, unknown models...
            head = self.hostile_fields(self.task_header(count))
        return [Input("agent task", kind, topic, frame(head, data))]

    def fleet_status(self) -> list[Input]:
        return self.json_input("fleet status topic", "edgesdk/v1/fleet/status", ["fleet_status"])

    def device_status(self) -> list[Input]:
        device = self.any_device()
        topic = self.t(device, "status")
        if self.rng.random() < 0.25:  # a well-formed status that speaks for another device
            seed = self.seed("status", self.rng.choice([d for d in (DEVICE, *GHOSTS, *PHANTOMS, "", "x") if d != device]))
            seed.update(online=self.rng.choice([True, False]), models=self.rng.choice([{}, {"digits": "9"}]))
            return [Input("device status", "hostile well-formed", topic, self.dumps(seed))]
        return self.json_input("device status", topic, ["status"], device, replay_kind="device status")

    def device_heartbeat(self) -> list[Input]:
        device = self.any_device()
        return self.json_input("device heartbeat", self.t(device, "heartbeat"), ["heartbeat"], device,
                               replay_kind="device heartbeat")

    def device_up(self) -> list[Input]:
        device = self.any_device()
        topic = self.t(device, "up")
        rng = self.rng
        r = rng.random()
        with self.tasks_lock:
            real = rng.choice(list(self.real_tasks.values())) if self.real_tasks else None
        if r < 0.12 and real is not None:
            # a result for a real task from a device that does not hold it: outputs of the right
            # shape from a phantom (never given work), unfit ones from anyone else
            sender = rng.choice(PHANTOMS) if rng.random() < 0.6 else device
            outputs = encode_tensor(np.random.default_rng(1).random((real.count, 10), dtype=np.float32))
            msg = self.seed("task_result", sender)
            msg.update(job=real.job, task=real.task, samples=real.count,
                       outputs=[outputs] if sender in PHANTOMS else hostile_tensors(rng),
                       version=rng.choice(["1", "1", "2", "../../sentinel/short"]))
            return [Input("device up", "hostile well-formed", self.t(sender, "up"), self.dumps(msg))]
        if r < 0.22:  # chunk requests for a bundle no rollout sends, and for files outside the fleet's store
            msg = self.seed("chunk_request", device)
            msg.update(bundle_sha256=rng.choice([self.v1_sha, *self.paths]),
                       indices=rng.choice([[0], list(range(8)), [-1, 0, 2**63], list(range(50_000))]))
            return [Input("device up", "hostile well-formed", topic, self.dumps(msg))]
        seeds = ["install_status", "task_result", "result", "chunk_request", "ack", "status"]
        if device not in PHANTOMS:
            seeds.append("work_request")
        return self.json_input("device up", topic, seeds, device, replay_kind="device up")

    def ghost_presence(self) -> list[Input]:
        """The ghosts announce themselves and ask for work (so the fleet sends them tasks)."""
        out = []
        for ghost in GHOSTS:
            status = self.dumps(self.seed("status", ghost))
            out.append(Input("device status", "hostile well-formed", self.t(ghost, "status"), status))
            out.append(Input("device up", "hostile well-formed", self.t(ghost, "up"),
                             self.dumps(self.seed("work_request", ghost))))
        return out

    def ghost_answer(self, ghost: str, task_payload: bytes) -> Optional[Input]:
        """A ghost answers a task it was given, always with outputs that do not fit."""
        head = unframe_header(task_payload)
        if not isinstance(head, dict):
            return None
        msg = self.seed("task_result", ghost)
        count = _task_count(head)
        msg.update(job=head.get("job"), task=head.get("id"), outputs=hostile_tensors(self.rng), samples=count)
        if self.rng.random() < 0.2:  # or right-shaped outputs from a version the task was not sent for
            msg.update(version="2", outputs=[encode_tensor(np.zeros((count, 10), np.float32))])
        return Input("device up", "hostile well-formed", self.t(ghost, "up"), self.dumps(msg))

    def next_inputs(self) -> list[Input]:
        channel = self.rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
        make = {"agent cmd": self.agent_cmd, "agent chunk": self.agent_chunk, "agent task": self.agent_task,
                "fleet status topic": self.fleet_status, "device status": self.device_status,
                "device heartbeat": self.device_heartbeat, "device up": self.device_up}[channel]
        return make()

    # --- what may be sent ------------------------------------------------------------------------
    def admissible(self, item: Input) -> bool:
        """Path safety (every string containing '/' is a vetted hostile path) and the rules that
        keep the checks meaningful on an open broker (see :func:`_channel_rules`)."""
        payload = item.payload
        binary = payload[:4] == b"ESDK"
        decoded = unframe_header(payload) if binary else _json_or_none(payload)
        if decoded is None and binary:
            decoded = _json_or_none(payload[_FRAME.size:])
        if decoded is not None and any("/" in s and s not in self.vetted for s in _strings(decoded)):
            return False
        return _channel_rules(self, item, decoded)


def _no_slash(data: bytes) -> bytes:
    """Random bytes without '/' and '\\' (frame data a lying header length may make part of the header)."""
    return data.replace(b"/", b"_").replace(b"\\", b"_")


def _task_count(head: dict[str, Any]) -> int:
    try:
        return int(head["inputs"][0]["shape"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return 1


def _fits(outputs: Any, count: int) -> bool:
    """Would a fleet accept these outputs for a digits task of ``count`` samples? (float32 [count, 10])"""
    from sdk import protocol as proto

    if not isinstance(outputs, list) or len(outputs) != 1:
        return False
    try:
        a = proto.Result.decode_tensor(outputs[0])
    except Exception:
        return False
    return a.dtype == np.float32 and a.shape == (count, 10)


def _channel_rules(gen: Generator, item: Input, decoded: Any) -> bool:
    """What the rogue may not do, because on a broker without ACLs it would be legitimate:

    * speak as the real device in a way that changes what it is (a valid status of its own);
    * give a phantom work (phantoms must never hold a lease), or a task with the id of a real
      one unless byte for byte the same (the device would answer it, rightly);
    * answer a real task with outputs that fit from any device that could hold its lease."""
    device = item.topic.split("/")[3] if item.topic.startswith("edgesdk/v1/devices/") else ""
    if not isinstance(decoded, dict):
        return True
    kind = decoded.get("type")
    if device == DEVICE and item.topic.endswith("/status") and kind == "status" and decoded.get("device") == DEVICE:
        try:
            gen.proto.decode(item.payload)
        except Exception:
            return True
        return False
    if device in PHANTOMS and kind == "work_request":
        return False
    if item.topic.endswith("/task"):
        with gen.tasks_lock:
            real = gen.real_tasks.get(str(decoded.get("id")))
        return real is None or real.payload == item.payload
    if kind == "task_result" and device not in PHANTOMS:
        with gen.tasks_lock:
            real = gen.real_tasks.get(str(decoded.get("task")))
        if real is not None and _fits(decoded.get("outputs"), real.count):
            return False
    return True


def decoder_for(topic: str) -> Callable[[bytes], Any]:
    from sdk import protocol as proto

    if topic == "edgesdk/v1/fleet/status":
        return proto.FleetStatus.from_payload
    if topic.endswith("/chunk"):
        return proto.Chunk.from_payload
    if topic.endswith("/task"):
        return proto.Task.from_payload
    return proto.decode


# --- the wire: the rogue and its observer ------------------------------------------------------------------
class Wire:
    """The rogue publisher, and an observer of every edgesdk topic that keeps the genuine
    payloads (corpus, the real device's status, the tasks the fleet sends, chunks it serves)."""

    def __init__(self, port: int, gen: Generator, layout: Layout) -> None:
        import paho.mqtt.client as mqtt

        self.gen = gen
        self.layout = layout
        self.sent: set[bytes] = set()
        self.lock = threading.Lock()
        self.genuine_status: Optional[bytes] = None
        self.phase = "setup"
        self.chunks_served: Counter = Counter()  # (phase, bundle) -> chunk frames the fleet published
        self.secret_leaks = 0
        self.ghost_answers = 0
        self.answer_ghosts = False
        self.pending: list[Input] = []
        self.errors: list[str] = []
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-rogue-{layout.run_id}",
                               protocol=mqtt.MQTTv5)
        self.pub.max_inflight_messages_set(200)
        self.pub.max_queued_messages_set(0)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()
        self.obs = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-observer-{layout.run_id}",
                               protocol=mqtt.MQTTv5)
        self.obs.on_message = self._on_message
        self.obs.on_connect = lambda c, u, f, rc, p: c.subscribe("edgesdk/v1/#", qos=1)
        self.obs.connect("127.0.0.1", port)
        self.obs.loop_start()

    @staticmethod
    def _key(topic: str, payload: bytes) -> bytes:
        return hashlib.sha1(topic.encode("utf-8", "surrogatepass") + b"\0" + payload).digest()

    def publish(self, item: Input, qos: int = 1) -> None:
        with self.lock:
            self.sent.add(self._key(item.topic, item.payload))
        self.pub.publish(item.topic, item.payload, qos=qos)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            self._observe(msg.topic, bytes(msg.payload))
        except Exception as exc:  # the observer must not die; the report shows it
            self.errors.append(f"observer: {type(exc).__name__}: {exc}")

    def _observe(self, topic: str, payload: bytes) -> None:
        if self.layout.secret[:32] in payload:
            self.secret_leaks += 1
        with self.lock:
            if self._key(topic, payload) in self.sent:
                return  # the rogue's own
        parts = topic.split("/")
        channel = parts[-1]
        device = parts[3] if len(parts) == 5 else ""
        if channel == "chunk":
            head = unframe_header(payload)
            sha = head.get("bundle_sha256") if isinstance(head, dict) else "?"
            self.chunks_served[(self.phase, str(sha)[:16], device)] += 1
            self.gen.corpus.add("agent chunk", payload)
        elif channel == "task":
            head = unframe_header(payload)
            if isinstance(head, dict) and isinstance(head.get("id"), str):
                with self.gen.tasks_lock:
                    task = RealTask(str(head.get("job")), head["id"], _task_count(head), payload)
                    self.gen.real_tasks[task.task] = task
            if device in GHOSTS and self.answer_ghosts and self.gen.rng.random() < 0.8:
                answer = self.gen.ghost_answer(device, payload)
                if answer is not None and self.gen.admissible(answer):
                    with self.lock:
                        self.pending.append(answer)
        elif channel == "status" and device == DEVICE:
            self.genuine_status = payload
            self.gen.corpus.add("device status", payload)
        elif channel == "heartbeat":
            self.gen.corpus.add("device heartbeat", payload)
        elif channel == "up":
            self.gen.corpus.add("device up", payload)
        elif channel == "cmd":
            self.gen.corpus.add("agent cmd", payload)
        elif topic == "edgesdk/v1/fleet/status":
            self.gen.corpus.add("fleet status topic", payload)

    def take_pending(self) -> list[Input]:
        with self.lock:
            out, self.pending = self.pending, []
        return out

    def close(self) -> None:
        for c in (self.pub, self.obs):
            try:
                c.disconnect()
                c.loop_stop()
            except Exception:
                pass


# --- the local API -----------------------------------------------------------------------------------------
class LocalApiFuzz:
    """Random bytes, mutated requests and declared 4 GB tensors on the agent's socket, one
    connection at a time; every reply must be well-formed, and EOF must end every connection."""

    def __init__(self, path: Path, rng: random.Random, agent_pid: Callable[[], Optional[int]]) -> None:
        self.path = str(path)
        self.rng = rng
        self.agent_pid = agent_pid
        self.counts: Counter = Counter()
        self.kinds: Counter = Counter()
        self.problems: list[str] = []
        self.max_growth = 0
        self.huge_left = 3

    def requests(self) -> list[bytes]:
        from agent.localapi import Op, request_head, tensor_headers

        x = np.random.default_rng(self.rng.randrange(2**32)).random((1, 8, 8, 1), dtype=np.float32)
        q = np.zeros((1, 8, 8, 1), np.int8)
        return [request_head(Op.PREDICT, b"digits", tensor_headers([x]), 1) + x.tobytes(),
                request_head(Op.PREDICT, b"digits", tensor_headers([q]), 1, 1) + q.tobytes(),
                request_head(Op.PREDICT, b"digits", tensor_headers([x], [(0, 0)]), 1),
                request_head(Op.PREDICT, b"digits\0key", tensor_headers([x]), 1, 2) + x.tobytes(),
                request_head(Op.MODELS, b""), request_head(Op.PING, b""), request_head(Op.ROLLBACK, b"nope"),
                request_head(Op.ATTACH, b"0 4096"), request_head(Op.ATTACH, b"99 -1"), request_head(77, b"digits")]

    def one(self) -> None:
        rng = self.rng
        if self.huge_left and rng.random() < 0.02:
            self.huge_left -= 1
            self.kinds["hostile well-formed"] += 1
            self._huge()
            return
        r = rng.random()
        if r < 0.3:
            self.kinds["random bytes"] += 1
            data = self.rng.randbytes(rng.choice([0, 1, 4, 16, 100, 2000])) if rng.random() < 0.5 else \
                b"EQ" + self.rng.randbytes(rng.choice([2, 10, 100]))
        elif r < 0.45:
            self.kinds["replayed"] += 1
            data = rng.choice(self.requests())
        else:
            self.kinds["byte-mutated"] += 1
            base = bytearray(rng.choice(self.requests()))
            for _ in range(rng.randint(1, 4)):
                op = rng.randrange(5)
                if op == 0 and base:
                    i = rng.randrange(min(len(base), 40))
                    base[i] = rng.choice([0, 1, 2, 5, 0x7F, 0x80, 0xFF])
                elif op == 1 and base:
                    i = rng.randrange(len(base))
                    base[i] ^= 1 << rng.randrange(8)
                elif op == 2:
                    del base[rng.randint(0, len(base)):]
                elif op == 3:
                    base += self.rng.randbytes(rng.randint(1, 64))
                else:
                    i = rng.randint(0, len(base))
                    base[i:i] = self.rng.randbytes(rng.randint(1, 8))
            data = bytes(base)
        self._exchange(data)

    def _exchange(self, data: bytes) -> None:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(self.path)
        except OSError as exc:
            self.counts["connect failed"] += 1
            self._problem(f"cannot connect to the local API ({exc})", data)
            return
        with sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            received = b""
            deadline = time.monotonic() + 5
            while True:
                try:
                    sock.settimeout(max(0.05, deadline - time.monotonic()))
                    chunk = sock.recv(1 << 16)
                except socket.timeout:
                    self.counts["hung (no reply, no close)"] += 1
                    self._problem("the agent neither answered nor closed after EOF", data)
                    return
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                received += chunk
        statuses = parse_local_replies(received)
        if statuses is None:
            self.counts["malformed reply"] += 1
            self._problem(f"malformed reply {received[:60]!r}", data)
            return
        if not statuses:
            self.counts["closed without reply"] += 1
        for s in statuses:
            self.counts["error reply" if s == 1 else "answered"] += 1

    def _huge(self) -> None:
        """A consistent header declaring 4 GB, a few bytes, then wait: the agent's address space must not grow."""
        from agent.localapi import Op, request_head

        dims = (1, 65535, 65535)
        head = struct.pack("<BB3II", 3, 3, *dims, math.prod(dims))
        data = request_head(Op.PREDICT, b"digits", head, 1) + b"\x01" * 100
        pid = self.agent_pid()
        before = _proc_memory(pid).get("VmSize", 0) if pid else 0
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.1)
                sock.connect(self.path)
                sock.sendall(data)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    if pid:
                        self.max_growth = max(self.max_growth, _proc_memory(pid).get("VmSize", 0) - before)
                    try:
                        if sock.recv(4096) == b"":
                            break
                    except socket.timeout:
                        continue
                    except ConnectionResetError:
                        break
        except OSError as exc:
            self.counts["connect failed"] += 1
            self._problem(f"declared 4 GB: {exc}", data)
        self.counts["declared 4 GB tensors"] += 1

    def _problem(self, what: str, data: bytes) -> None:
        if len(self.problems) < 5:
            self.problems.append(f"{what}; input {data[:80]!r}")


def parse_local_replies(data: bytes) -> Optional[list[int]]:
    """The statuses of the well-formed reply frames in ``data``; None when anything is malformed."""
    statuses, pos = [], 0
    try:
        from agent.localapi import parse_tensor_headers

        while pos < len(data):
            magic, head_len = _LOCAL_HDR.unpack_from(data, pos)
            pos += _LOCAL_HDR.size
            head = data[pos : pos + head_len]
            if magic != b"ER" or len(head) != head_len or head_len < 2:
                return None
            pos += head_len
            status, count = head[0], head[1]
            if count == 0 and head_len == 6:
                pos += struct.unpack_from("<I", head, 2)[0]
                if pos > len(data) or status not in (0, 1):
                    return None
            else:
                if status != 0:
                    return None
                pos += sum(s.nbytes for s in parse_tensor_headers(head, 2, count))
                if pos > len(data):
                    return None
            statuses.append(status)
    except Exception:
        return None
    return statuses


# --- the run -------------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class FuzzReport:
    seed: int
    seconds: float
    inputs: dict[str, dict[str, int]] = field(default_factory=dict)
    decoder_escapes: list[dict[str, Any]] = field(default_factory=list)
    local_api: dict[str, Any] = field(default_factory=dict)
    agent_log: dict[str, Any] = field(default_factory=dict)
    fleet_log: dict[str, Any] = field(default_factory=dict)
    fleet_stats: dict[str, int] = field(default_factory=dict)
    chunks_served: dict[str, int] = field(default_factory=dict)
    files_touched: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    work_dir: str = ""
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def crashes(self) -> dict[str, int]:
        return {"agent": self.agent_log.get("tracebacks", 0),
                "fleet": sum(e["count"] for e in self.fleet_log.get("crashes", [])),
                "decoders (in-process)": sum(e["count"] for e in self.decoder_escapes)}

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": self.seconds, "wall_s": round(self.wall_s, 1), "passed": self.passed,
                "inputs": self.inputs, "crashes": self.crashes(), "decoder_escapes": self.decoder_escapes,
                "local_api": self.local_api, "agent_log": self.agent_log, "fleet_log": self.fleet_log,
                "fleet_stats": self.fleet_stats, "chunks_served": self.chunks_served,
                "files_touched": self.files_touched, "work_dir": self.work_dir,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]}

    def table(self) -> str:
        lines = [f"# edgesdk fuzz: seed {self.seed}, {self.seconds:g} s of fuzzing ({self.wall_s:.0f} s in all), "
                 f"{os.cpu_count()} cores", "",
                 "| channel | inputs | " + " | ".join(KINDS) + " |", "|---|---:|" + "---:|" * len(KINDS)]
        total = Counter()
        for ch in CHANNELS:
            row = self.inputs.get(ch, {})
            total.update(row)
            lines.append(f"| {ch} | {sum(row.values())} | " + " | ".join(str(row.get(k, 0)) for k in KINDS) + " |")
        lines.append(f"| **all** | **{sum(total.values())}** | " + " | ".join(str(total.get(k, 0)) for k in KINDS) + " |")
        crashes = self.crashes()
        lines += ["", "| receiver | crashes (exceptions escaping) | dropped / counted |", "|---|---:|---|",
                  f"| agent process (log) | {crashes['agent']} | {_fmt(self.agent_log.get('drops', {}))} |",
                  f"| fleet (in-process) | {crashes['fleet']} | stats: {_fmt(self.fleet_stats)}; "
                  f"log: {_fmt(self.fleet_log.get('drops', {}))} |",
                  f"| local API | {self.local_api.get('counts', {}).get('hung (no reply, no close)', 0)} hung, "
                  f"{self.local_api.get('counts', {}).get('malformed reply', 0)} malformed | "
                  f"{_fmt(self.local_api.get('counts', {}))} |",
                  f"| sdk.protocol decoders, same inputs in-process | {crashes['decoders (in-process)']} | |"]
        lines += ["", f"Files touched outside the state dirs: {len(self.files_touched)}"
                  + ("" if not self.files_touched else "\n" + "\n".join(f"  - {f}" for f in self.files_touched[:30]))]
        served = {k: v for k, v in self.chunks_served.items() if not k.startswith("after")}
        lines += [f"Chunks the fleet served outside a rollout: {sum(served.values())}"
                  + (f" ({_fmt(served)})" if served else "")]
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail.splitlines()[0][:160] if c.detail else ''} |")
        findings = self._findings()
        if findings:
            lines += ["", "## Findings", "", *findings]
        lines += ["", f"{'PASSED' if self.passed else 'FAILED'}: {sum(c.ok for c in self.checks)} of "
                      f"{len(self.checks)} checks" + (f"; files in {self.work_dir}" if self.work_dir else "")]
        return "\n".join(lines).encode("utf-8", "backslashreplace").decode()  # inputs carry lone surrogates

    def _findings(self) -> list[str]:
        out = []
        for c in self.failures():
            if c.detail and "\n" in c.detail:
                out += [f"### {c.name}", "```", c.detail[:4000], "```"]
        for where, entries in (("agent", self.agent_log.get("crashes", [])), ("fleet", self.fleet_log.get("crashes", []))):
            for e in entries[:8]:
                out += [f"### {where}: {e['count']} x {e['error']}", f"at: {e['where']}"]
                if e.get("input"):
                    out.append(f"input (one of them): {e['input']}")
                out += ["```", e["example"][-1500:], "```"]
        for e in self.decoder_escapes[:8]:
            out += [f"### decoder {e['decoder']}: {e['count']} x {e['error']}", f"input on {e['topic']}: {e['input']}"]
        for p in self.local_api.get("problems", []):
            out.append(f"- local API: {p}")
        return out


def _fmt(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "-"


class DecoderCheck:
    """Runs each input through the decoder its receiver uses, in this process: anything but a
    ProtocolError (or a decoded message) is a decoder that lets a foreign exception out."""

    def __init__(self) -> None:
        from sdk.errors import ProtocolError

        self.protocol_error = ProtocolError
        self.escapes: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, item: Input) -> None:
        decoder = decoder_for(item.topic)
        try:
            decoder(item.payload)
        except self.protocol_error:
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:160]}"
            name = getattr(decoder, "__qualname__", str(decoder))
            entry = self.escapes.setdefault((name, type(exc).__name__), {
                "decoder": name, "error": error, "count": 0, "topic": item.topic,
                "input": repr(item.payload[:300]) + (f"... ({len(item.payload)} bytes)" if len(item.payload) > 300 else "")})
            entry["count"] += 1


def run_fuzz(*, seconds: float = 45.0, seed: int = 1, rate: float = 150.0, bundles: Optional[Bundles] = None,
             keep: bool = False, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> FuzzReport:
    """Set everything up, fuzz for ``seconds``, check, tear down; the report says what happened."""
    t_start = time.monotonic()
    report = FuzzReport(seed, seconds)
    layout = Layout.make()
    report.work_dir = str(layout.aux) if keep else ""
    rng = random.Random(seed)
    np.random.seed(seed % 2**32)
    broker = agent = fleet = wire = None
    capture = LogCapture()
    fleet_logger = logging.getLogger("edgesdk")
    saved_logging = (fleet_logger.propagate, fleet_logger.level)
    file_handler = logging.FileHandler(layout.aux / "fleet.log", encoding="utf-8", errors="backslashreplace")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    thread_errors: list[str] = []
    saved_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        thread_errors.append(f"{args.thread.name if args.thread else '?'}: "
                             + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))[-2000:])

    try:
        fleet_logger.addHandler(capture)
        fleet_logger.addHandler(file_handler)
        fleet_logger.propagate = False
        fleet_logger.setLevel(logging.INFO)
        threading.excepthook = hook
        if bundles is None:
            echo("building the digits bundles (train, convert v1 int8 and v2 float32, sign)")
            bundles = build_bundles(layout.aux / "build")
        bundles = _copy_bundles(bundles, layout)
        broker = EmbeddedBroker("mosquitto").start()
        echo(f"mosquitto on {broker.url}; state dirs under {layout.root}")
        agent = AgentProcess(layout, broker.url, bundles.public_key)
        agent.preinstall(bundles.v1)
        agent.start()
        from agent import AgentClient
        from fleet import Fleet

        fleet = Fleet(layout.fleet_state, broker.url, tick=0.1).start()
        v1_sha, _ = fleet.add_bundle(bundles.v1)
        samples = _samples()
        expected_v1 = local_predictions(bundles.v1, samples)
        _wait(lambda: any(d.id == DEVICE and d.online and d.models.get("digits") == "1" for d in fleet.devices())
              and agent.socket_path.exists(), 90, lambda: agent.alive, "the agent did not come online")
        with AgentClient(agent.socket_path) as client:
            baseline = [client.predict("digits", [x[None]])[0] for x in samples[:8]]
        memory_before = agent.memory()
        corpus = Corpus()
        gen = Generator(rng, layout, corpus, v1_sha, bundles.v1.stat().st_size)
        wire = Wire(broker.port, gen, layout)
        _wait(lambda: wire.genuine_status is not None, 15, lambda: True, "the observer saw no status of the agent")
        before = snapshot(layout.top, [layout.agent_state, layout.fleet_state])
        escapes_before = layout.escapes()

        # --- the fuzzing, with a job running ----------------------------------------------------
        job_x = samples[:48]
        job0 = fleet.submit("digits", job_x, batch_size=8, lease_s=3.0, max_attempts=1000)
        echo(f"fuzzing for {seconds:g} s (seed {seed}), job {job0[:8]} running")
        decoders = DecoderCheck()
        local = LocalApiFuzz(agent.socket_path, random.Random(seed + 1), lambda: agent.proc.pid if agent.alive else None)
        stop = threading.Event()
        local_thread = threading.Thread(target=_local_loop, args=(local, stop), name="fuzz-localapi", daemon=True)
        wire.phase = "fuzz"
        wire.answer_ghosts = True
        local_thread.start()
        counts: dict[str, Counter] = defaultdict(Counter)
        _fuzz_loop(gen, wire, decoders, counts, seconds, rate)
        stop.set()
        local_thread.join(30)
        wire.answer_ghosts = False
        for item in wire.take_pending():
            wire.publish(item)
            counts[item.channel][item.kind] += 1
        counts["local API socket"] = local.kinds
        report.inputs = {ch: dict(counts.get(ch, {})) for ch in CHANNELS}
        report.decoder_escapes = sorted(decoders.escapes.values(), key=lambda e: -e["count"])
        report.local_api = {"counts": dict(local.counts), "problems": local.problems,
                            "declared_4gb_vmsize_growth_mib": round(local.max_growth / 2**20)}

        # --- afterwards -------------------------------------------------------------------------
        wire.phase = "after"
        _heal(wire, gen)
        checks = report.checks
        checks.append(Check("agent process still running", agent.alive,
                            f"pid {agent.proc.pid}" if agent.alive else f"exited with {agent.proc.returncode}"))
        checks.append(Check("fleet engine thread alive", fleet.running))
        checks.append(_check(lambda: _same_answers(agent, samples[:8], baseline), "local API answers as before the fuzzing"))
        checks.append(_check(lambda: _job_done(fleet, job0, expected_v1[:48], 120),
                             "job run during the fuzzing: SUCCEEDED, outputs = local inference"))
        checks.append(_check(lambda: _job_done(fleet, fleet.submit("digits", samples, batch_size=16, lease_s=10.0,
                                                                   to={"fuzz": "real"}), expected_v1, 120),
                             "job after the fuzzing: SUCCEEDED, outputs = local inference"))
        checks.append(_check(lambda: _rollout(fleet, agent, bundles.v2, samples[:8]),
                             "rollout of version 2 after the fuzzing: SUCCEEDED, agent serves v2"))
        memory_after = agent.memory()
        grown = memory_after.get("VmHWM", 0) - memory_before.get("VmHWM", 0)
        checks.append(Check("agent memory bounded (peak RSS, declared 4 GB tensors)",
                            grown < MEMORY_BOUND and local.max_growth < MEMORY_BOUND,
                            f"peak RSS grew {grown / 2**20:.0f} MiB; address space grew {local.max_growth / 2**20:.0f} "
                            "MiB while a 4 GB tensor was declared"))
        after = snapshot(layout.top, [layout.agent_state, layout.fleet_state])
        report.files_touched = snapshot_diff(before, after) + [f"created {p}" for p in layout.escapes()
                                                              if p not in escapes_before]
        checks.append(Check("nothing outside the state dirs changed", not report.files_touched,
                            "\n".join(report.files_touched[:40])))
        report.chunks_served = {f"{ph} {sha} -> {dev}": n for (ph, sha, dev), n in wire.chunks_served.items()}
        outside = sum(n for (ph, _, _), n in wire.chunks_served.items() if ph != "after")
        checks.append(Check("no chunk served outside a rollout", outside == 0, f"{outside} chunk frames"))
        checks.append(Check("no file outside the fleet's store served", wire.secret_leaks == 0,
                            f"{wire.secret_leaks} messages carried the sentinel secret"))
        lc = local.counts
        checks.append(Check("local API: well-formed replies or a close, never a hang",
                            not (lc["hung (no reply, no close)"] or lc["malformed reply"] or lc["connect failed"]),
                            "\n".join(local.problems)))
        agent_alive_at_end = agent.alive
        report.fleet_stats = {k: int(v) for k, v in sorted(dict(fleet.stats).items())}
        fleet_running = fleet.running
        fleet.stop()
        fleet = None
        code = agent.stop()
        report.agent_log = parse_agent_log(agent.log_text())
        report.fleet_log = {"crashes": sorted(capture.crashes.values(), key=lambda e: -e["count"]),
                            "drops": dict(capture.drops), "thread_errors": thread_errors}
        checks.append(Check("no exception escaped the agent's receivers", report.agent_log["tracebacks"] == 0,
                            _crash_summary(report.agent_log["crashes"])))
        fleet_crashes = sum(e["count"] for e in capture.crashes.values()) + len(thread_errors) \
            + report.fleet_stats.get("failed_messages", 0)
        checks.append(Check("no exception escaped the fleet", fleet_crashes == 0,
                            "\n".join(filter(None, [_crash_summary(report.fleet_log["crashes"])] + thread_errors[:3]
                                              + [f"fleet.stats failed_messages {report.fleet_stats.get('failed_messages', 0)}"]))))
        checks.append(Check("sdk.protocol decoders raise ProtocolError only (every input, in-process)",
                            not report.decoder_escapes,
                            "\n".join(f"{e['decoder']}: {e['count']} x {e['error']}; input on {e['topic']}: {e['input']}"
                                      for e in report.decoder_escapes[:10])))
        checks.append(Check("agent shut down cleanly on SIGTERM", agent_alive_at_end and code == 0, f"exit code {code}"))
        checks.append(Check("fleet engine thread alive at the end", fleet_running))
        if wire.errors:
            checks.append(Check("harness observer", False, "\n".join(wire.errors[:5])))
    finally:
        threading.excepthook = saved_hook
        if wire is not None:
            wire.close()
        if fleet is not None:
            fleet.stop()
        if agent is not None:
            agent.stop()
        if broker is not None:
            broker.stop()
        fleet_logger.removeHandler(capture)
        fleet_logger.removeHandler(file_handler)
        file_handler.close()
        fleet_logger.propagate, _ = saved_logging
        fleet_logger.setLevel(saved_logging[1])
        layout.cleanup(keep)
        report.wall_s = time.monotonic() - t_start
    return report


def _crash_summary(crashes: list[dict[str, Any]]) -> str:
    return "\n".join(f"{e['count']} x {e['error']} (at {e['where']})" for e in crashes[:12])


def _copy_bundles(bundles: Bundles, layout: Layout) -> Bundles:
    """The bundles and the key, copied next to the state dirs (sentinels too: they must not change)."""
    v1 = layout.root / "bundles" / "digits-1.edgebundle"
    v2 = layout.root / "bundles" / "digits-2.edgebundle"
    key = layout.root / "keys" / Path(bundles.public_key).name
    shutil.copyfile(bundles.v1, v1)
    shutil.copyfile(bundles.v2, v2)
    shutil.copyfile(bundles.public_key, key)
    return Bundles(v1, v2, key)


def _samples() -> np.ndarray:
    from converter.digits import load_digits_split

    return load_digits_split().x_test[:96].astype(np.float32)


def _wait(predicate: Callable[[], bool], timeout: float, still: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not still():
            break
        time.sleep(0.2)
    raise RuntimeError(f"{what} within {timeout:g} s")


def _fuzz_loop(gen: Generator, wire: Wire, decoders: DecoderCheck, counts: dict[str, Counter], seconds: float,
               rate: float) -> None:
    deadline = time.monotonic() + seconds
    interval = 1.0 / rate
    next_presence = 0.0
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        batch = wire.take_pending()
        if now >= next_presence:
            batch += gen.ghost_presence()
            next_presence = now + 2.0
        for _ in range(20):  # a candidate that breaks the rules is dropped before it is sent
            candidate = gen.next_inputs()
            if all(gen.admissible(i) for i in candidate):
                batch += candidate
                break
        for item in batch:
            if not gen.admissible(item):
                continue
            decoders(item)
            wire.publish(item)
            counts[item.channel][item.kind] += 1
            sent += 1
            time.sleep(0.02 if item.channel == "agent chunk" and item.kind == "hostile well-formed" else 0)
        ahead = t0 + sent * interval - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def _local_loop(local: LocalApiFuzz, stop: threading.Event) -> None:
    while not stop.is_set():
        local.one()
        stop.wait(0.03)


def _heal(wire: Wire, gen: Generator) -> None:
    """Undo what a rogue on an open broker may legitimately do: ghosts and phantoms go offline,
    and the real device's own last status is published again."""
    for device in (*GHOSTS, *PHANTOMS):
        msg = gen.seed("status", device)
        msg["online"] = False
        wire.publish(Input("heal", "heal", gen.t(device, "status"), gen.dumps(msg)))
    if wire.genuine_status is not None:
        wire.pub.publish(gen.t(DEVICE, "status"), wire.genuine_status, qos=1, retain=True)
    time.sleep(1.0)


def _check(step: Callable[[], str], name: str) -> Check:
    try:
        return Check(name, True, step() or "")
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
                                  f"{_thread_stacks('edgesdk-fleet-engine')}")


def _thread_stacks(prefix: str) -> str:
    """Where the fleet's engine thread is right now (a stalled job or rollout says why)."""
    frames = sys._current_frames()
    out = []
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t.ident in frames:
            out.append(f"\nthe fleet engine thread is in:\n" + "".join(traceback.format_stack(frames[t.ident])[-10:]))
    return "".join(out)


def _same_answers(agent: AgentProcess, x: np.ndarray, expected: list[np.ndarray]) -> str:
    from agent import AgentClient

    if not agent.alive:
        raise AssertionError("the agent process is not running")
    with AgentClient(agent.socket_path, timeout=20) as client:
        got = [client.predict("digits", [s[None]])[0] for s in x]
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if not np.array_equal(g, e)]
    if bad:
        raise AssertionError(f"samples {bad} answered differently after the fuzzing")
    return f"{len(x)} samples, identical"


def _job_done(fleet: Any, job_id: str, expected: np.ndarray, timeout: float) -> str:
    summary = fleet.finish_job(job_id, timeout=timeout)
    np.testing.assert_allclose(summary.outputs[0], expected, atol=1e-5)
    return f"{summary.samples} samples, {summary.tasks} tasks, {summary.retries} retries, devices {sorted(summary.devices)}"


def _rollout(fleet: Any, agent: AgentProcess, v2: Path, x: np.ndarray) -> str:
    from agent import AgentClient

    if not agent.alive:
        raise AssertionError("the agent process is not running")
    rid_ = fleet.deploy(v2, devices=[DEVICE], canary=1)
    view = fleet.wait_rollout(rid_, timeout=180)
    if view.state != "SUCCEEDED":
        raise AssertionError(f"rollout {view.state}: {view.reason}; devices {view.devices}")
    expected = local_predictions(v2, x)
    with AgentClient(agent.socket_path, timeout=20) as client:
        got = np.concatenate([client.predict("digits", [s[None]])[0] for s in x])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    return f"rollout {rid_[:8]} SUCCEEDED; v2 answers = local inference"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="fuzz a live edgesdk agent and fleet on a real Mosquitto")
    ap.add_argument("--seconds", type=float, default=45.0, help="how long to fuzz (setup and checks come on top)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=150.0, help="MQTT inputs per second")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--keep", action="store_true", help="keep logs and the broker's files (their path is printed)")
    args = ap.parse_args(argv)
    report = run_fuzz(seconds=args.seconds, seed=args.seed, rate=args.rate, keep=args.keep)
    print(json.dumps(report.to_json(), indent=2, default=str) if args.json else report.table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
