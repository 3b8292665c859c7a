"""Simulated devices: many lightweight agents in one process, speaking the real protocol.

For tests and benchmarks at fleet scale (1,000 devices on a 2-core machine): each simulated
device has its own topics, retained status, durable outbox (in memory, re-sent until the fleet
acknowledges), chunked bundle transfer (every chunk and the reassembled bundle checked against
their sha256), rollback, free-slot announcements and batch tasks (large ones in pieces,
reassembled by the agent's own :class:`sdk.pieces.Reassembler`). What is simulated:

* inference: a task of N samples "takes" ``infer_s`` × N seconds (a timer, not a CPU) and its
  output is an echo, the first ``output_width`` values of each sample (so results can be checked
  against the inputs, in order); at most ``capacity`` tasks run at once, ``prefetch`` more are
  held queued, and what a device announces and declines follows the agent's rules
  (:meth:`sdk.protocol.WorkRequest.of_device`, :meth:`~sdk.protocol.WorkRequest.holds_too_many`);
* install: ``install_s`` seconds after the bundle is complete; versions in ``fail_versions``
  fail; ``p50_ms`` (a number, or ``{version: ms}``) is the latency the device reports, so a
  latency regression can be staged;
* devices share MQTT connections (``per_connection`` devices each), so there is no per-device
  Last-Will: :meth:`SimulatedDevices.kill` publishes the retained offline status a Last-Will
  would and drops the device's running tasks, as a crash does;
* hashing: the chunk window and the chunk and whole-blob checks are the agent's own
  (:mod:`sdk.chunkflow`), but bytes one simulated device has already hashed are compared, not
  hashed again, by the others (:class:`sdk.chunkflow.HashMemo`): they share one CPU where real
  devices each have theirs. Bytes that differ are hashed and refused as the agent would.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

import sdk
from sdk import delta as delta_mod
from sdk import protocol as proto
from sdk.chunkflow import ChunkWindow, HashMemo, blob_matches, chunk_fits
from sdk.errors import BrokerError
from sdk.mqtt import MqttConnection, MqttSettings
from sdk.device import (DECODERS, FleetSession, MemoryOutbox, WorkSlots, pin_refusal, plan_fetch, rebuild,
                        send_due, subscriptions)
from sdk.pieces import PieceRefused, Reassembler

log = logging.getLogger("edgesdk.fleet.sim")

#: Mosquitto's default ``max_queued_messages``: QoS-1 messages it holds for one connection before dropping
_BROKER_QUEUE = 1000

__all__ = ["SimulatedDevices"]


@dataclass
class _Device:
    id: str
    tags: dict[str, str]
    models: dict[str, str]
    conn: Any = None
    alive: bool = True
    previous: dict[str, str] = field(default_factory=dict)
    slots: WorkSlots = field(default_factory=lambda: WorkSlots(1))  # tasks held, and done awaiting an ack
    queued: collections.deque = field(default_factory=collections.deque)  # held tasks waiting for a slot
    busy: int = 0  # tasks running now (at most capacity)
    outbox: MemoryOutbox = field(default_factory=MemoryOutbox)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks_done: int = 0
    held: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, version) -> bundle sha256
    installs: list[tuple[str, str]] = field(default_factory=list)  # (version, "full" | "delta") as installed
    pieces: Optional[Reassembler] = None  # made at a device's first task piece
    #: the fleet's desired configuration as applied (simulated: recorded, tags and pins taken)
    config: dict[str, Any] = field(default_factory=dict)
    config_revision: int = 0
    config_note: str = ""
    base_tags: dict[str, str] = field(default_factory=dict)
    pins: dict[str, str] = field(default_factory=dict)  # model -> the version it is pinned to

    def bundles(self) -> list[str]:
        """The sha256s of the bundles it holds: those of each model's active and previous version."""
        keep = {(m, v) for m, v in self.models.items()} | {(m, v) for m, v in self.previous.items()}
        return sorted({sha for key, sha in self.held.items() if key in keep})


class SimulatedDevices:
    def __init__(
        self,
        count: int,
        broker: str = "mqtt://127.0.0.1:1883",
        *,
        settings: Optional[MqttSettings] = None,
        prefix: str = "sim",
        tags: Union[Mapping[str, str], Callable[[int], Mapping[str, str]], None] = None,
        models: Optional[Mapping[str, str]] = None,
        capacity: int = 1,
        infer_s: float = 0.0,
        install_s: float = 0.0,
        p50_ms: Union[float, Mapping[str, float]] = 1.0,
        fail_versions: tuple[str, ...] = (),
        output_width: int = 4,
        per_connection: int = 100,
        resend_after: float = 10.0,
        announce_interval: float = 5.0,
        max_task_bytes: int = 64 << 20,
        prefetch: int = 0,
    ) -> None:
        self.settings = settings or MqttSettings.from_url(broker, extra="fleet")
        self.capacity, self.infer_s, self.install_s = capacity, infer_s, install_s
        #: tasks each device holds queued beyond the ``capacity`` it runs, announced as the agent does
        self.prefetch = prefetch
        self.p50_ms, self.fail_versions, self.output_width = p50_ms, tuple(fail_versions), output_width
        self.per_connection = max(1, per_connection)
        self.resend_after, self.announce_interval = resend_after, announce_interval
        self.devices: dict[str, _Device] = {}
        for i in range(count):
            t = tags(i) if callable(tags) else (tags or {})
            dev_id = f"{prefix}-{i:04d}"
            self.devices[dev_id] = _Device(dev_id, {"sim": "1", **dict(t)}, dict(models or {}),
                                           slots=WorkSlots(capacity, prefetch))
        self._conns: list[MqttConnection] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None
        self._fleet = FleetSession()
        self._blobs: dict[str, bytes] = {}  # bundle bytes by sha256, shared by every device holding one
        #: chunks and blobs already hashed by one simulated device: the others compare instead (they
        #: share this process's CPU, where real devices each hash on their own; see sdk.chunkflow)
        self.hashes = HashMemo()
        self.max_task_bytes = max_task_bytes
        #: messages dropped by kind (``task-piece``: refused or timed-out pieces of large tasks)
        self.dropped: collections.Counter[str] = collections.Counter()

    @property
    def ids(self) -> list[str]:
        return list(self.devices)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "SimulatedDevices":
        ids = list(self.devices)
        for k in range(0, len(ids), self.per_connection):
            group = [self.devices[d] for d in ids[k : k + self.per_connection]]
            subs = list(dict.fromkeys(sub for d in group for sub in subscriptions(d.id)))  # the fleet topic once
            settings = dataclasses.replace(self.settings, client_id=f"{group[0].id}-x{len(group)}",
                                           persistent_session=False)
            conn = MqttConnection(settings, self._handle, subs, on_connected=lambda g=group: self._connected(g))
            for d in group:
                d.conn = conn
            self._conns.append(conn)
            conn.start()
        deadline = time.monotonic() + timeout
        for conn in self._conns:
            if not conn.wait_connected(max(0.1, deadline - time.monotonic())):
                raise BrokerError("simulated devices could not connect to the broker")
        self._thread = threading.Thread(target=self._timer_loop, name="edgesdk-sim-timers", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        for conn in self._conns:
            group = [d for d in self.devices.values() if d.conn is conn and d.alive]
            for d in group:
                self._status(d, online=False)
            conn.stop()
        self._conns.clear()

    def __enter__(self) -> "SimulatedDevices":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, device: str) -> None:
        """A crash: the device stops answering, its running tasks are lost, it shows offline."""
        d = self.devices[device]
        with self._lock:
            d.alive = False
            d.slots.clear()
            d.queued.clear()
            d.busy = 0
        self._status(d, online=False)

    def revive(self, device: str) -> None:
        d = self.devices[device]
        with self._lock:
            d.alive = True
        self._status(d, online=True)
        self._announce(d)

    def models(self, device: str) -> dict[str, str]:
        return dict(self.devices[device].models)

    def installs(self, device: str) -> list[tuple[str, str]]:
        """``(version, "full" | "delta")`` of every install the device completed, in order."""
        return list(self.devices[device].installs)

    # --- outgoing ------------------------------------------------------------------------------
    def _publish(self, d: _Device, channel: str, payload: bytes, retain: bool = False) -> None:
        try:
            d.conn.publish(proto.topic(d.id, channel), payload, qos=1, retain=retain)
        except BrokerError as exc:
            log.debug("sim %s: %s", d.id, exc)

    def _status(self, d: _Device, online: bool = True) -> None:
        s = proto.Status(device=d.id, online=online, agent_version=f"{sdk.__version__}-sim",
                         runtime={"name": "simulated"}, delegates=["cpu"], models=dict(d.models), tags=d.tags,
                         bundles=d.bundles(), config={**d.config, "tags": dict(d.tags), "models": dict(d.models)},
                         config_revision=d.config_revision, config_note=d.config_note)
        self._publish(d, "status", s.to_payload(), retain=True)

    def _announce(self, d: _Device) -> None:
        if not d.alive:
            return
        self._publish(d, "up", d.slots.request(d.id, dict(d.models)).to_payload())

    def _durable(self, d: _Device, msg: proto.Message) -> None:
        with self._lock:
            d.outbox.put(msg.id, proto.topic(d.id, "up"), msg.to_payload())
        self._resend(d)

    def _connected(self, group: list[_Device]) -> None:
        for d in group:
            if d.alive:
                self._status(d)
                self._resend(d, everything=True)
                self._announce(d)

    def _resend(self, d: _Device, everything: bool = False) -> None:
        """Send what the outbox holds that is due (all of it after a reconnect or a new fleet
        session), and ask again for the chunks a stalled transfer waits for."""
        now = time.monotonic()
        with self._lock:
            if everything:
                d.outbox.reset_sent()
            send_due(d.outbox, lambda topic, payload: d.conn.publish(topic, payload, qos=1), self.resend_after)
        if not everything and not d.transfers:
            return
        for sha, t in list(d.transfers.items()):
            if everything or now - t["seen"] > 3.0:
                t["seen"] = now
                self._request_chunks(d, sha, restart=True)  # what was in flight is presumed lost

    # --- incoming --------------------------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes) -> None:
        """Every message through its channel's decoder (:data:`sdk.device.DECODERS`); one that
        does not decode is dropped (MqttConnection logs it and goes on)."""
        if topic == proto.fleet_topic():
            if self._fleet.is_new(DECODERS["fleet"](payload)):
                for d in self.devices.values():
                    if d.alive and d.conn is not None:
                        self._resend(d, everything=True)
                        self._announce(d)
            return
        device, channel = proto.parse_topic(topic)
        d = self.devices.get(device)
        if d is None or not d.alive:
            return
        msg = DECODERS[channel](payload)
        if channel == "chunk":
            self._on_chunk(d, msg)
        elif channel == "task":
            if isinstance(msg, proto.TaskPiece):
                self._on_piece(d, msg)
            else:
                self._on_task(d, msg)
        else:
            if isinstance(msg, proto.Ack):
                with self._lock:
                    d.outbox.ack(msg.ack_ids)
                d.slots.acknowledged(msg.ack_ids)
            elif isinstance(msg, proto.InstallCommand):
                self._on_install(d, msg)
            elif isinstance(msg, proto.RollbackCommand):
                self._on_rollback(d, msg)
            elif isinstance(msg, proto.ConfigCommand):
                self._on_config(d, msg)

    def _on_config(self, d: _Device, cmd: proto.ConfigCommand) -> None:
        """Desired configuration, as the agent takes it (agent.desired): tags over the device's own,
        models pinned to a held version activated, the other settings recorded as running."""
        if cmd.revision <= d.config_revision:
            return
        notes = []
        with self._lock:
            if not d.base_tags:
                d.base_tags = dict(d.tags)
            d.tags = {**d.base_tags, **cmd.config.get("tags", {})}
            for model, version in sorted(cmd.config.get("models", {}).items()):
                if d.models.get(model) == version:
                    continue
                if (model, version) in d.held or d.previous.get(model) == version:
                    if d.models.get(model):
                        d.previous[model] = d.models[model]
                    d.models[model] = version
                else:
                    notes.append(f"models.{model}: version {version} is not on this device (deploy it)")
            d.config = {k: v for k, v in cmd.config.items() if k not in ("tags", "models")}
            d.pins = dict(cmd.config.get("models", {}))
            d.config_revision, d.config_note = cmd.revision, "; ".join(notes)
        self._status(d)
        self._announce(d)

    def _p50(self, version: Optional[str]) -> Optional[float]:
        if version is None:
            return None
        if isinstance(self.p50_ms, Mapping):
            return float(self.p50_ms.get(version, 1.0))
        return float(self.p50_ms)

    def _report(self, d: _Device, cmd: Any, state: str, version: str, reason: str = "", **extra: Any) -> None:
        self._durable(d, proto.InstallStatus(device=d.id, model=cmd.model, version=version, state=state, reason=proto.clip_text(reason),
                                             rollout=cmd.rollout, **extra))

    def _base(self, d: _Device, sha256: str) -> Optional[bytes]:
        """The bytes of bundle ``sha256`` when this device holds it (by sha256, as an agent looks it up)."""
        return self._blobs.get(sha256) if sha256 in d.bundles() else None

    def _on_install(self, d: _Device, cmd: proto.InstallCommand) -> None:
        refusal = pin_refusal(cmd.model, cmd.version, d.pins)
        if refusal is not None:
            self._report(d, cmd, "FAILED", cmd.version, refusal)
            return
        if d.models.get(cmd.model) == cmd.version:
            self._report(d, cmd, "SUCCEEDED", cmd.version, "already active", previous_version=d.previous.get(cmd.model))
            return
        if any(t["cmd"].bundle_sha256 == cmd.bundle_sha256 for t in d.transfers.values()):
            for sha, t in list(d.transfers.items()):
                if t["cmd"].bundle_sha256 == cmd.bundle_sha256:
                    self._request_chunks(d, sha, restart=True)  # joins the transfer running for that bundle
            return
        blob, note = plan_fetch(cmd, lambda sha: self._base(d, sha) is not None)
        self._fetch(d, cmd, blob, note)

    def _fetch(self, d: _Device, cmd: proto.InstallCommand, blob: proto.InstallCommand, note: str = "") -> None:
        """Fetch ``blob``: ``cmd``'s bundle, or its delta; ``note`` says why a delta is not used."""
        # the devices of a connection share the broker's queue for it: their windows together stay within it
        window = max(1, min(blob.window, _BROKER_QUEUE // self.per_connection))
        d.transfers[blob.bundle_sha256] = {"cmd": cmd, "blob": blob, "chunks": {}, "seen": time.monotonic(),
                                           "window": ChunkWindow(blob.chunks, window)}
        via = "full" if blob is cmd else "delta"
        extra = f" (delta not used: {note})" if note else ""
        self._report(d, cmd, "DOWNLOADING", cmd.version, f"{blob.chunks} chunks to fetch{extra}",
                     bundle_sha256=cmd.bundle_sha256, via=via, fallback=bool(note))
        self._request_chunks(d, blob.bundle_sha256)

    def _request_chunks(self, d: _Device, sha: str, *, restart: bool = False) -> None:
        """Ask for what the transfer's window allows now, as the agent does (:mod:`sdk.chunkflow`)."""
        t = d.transfers.get(sha)
        if t is None:
            return
        window: ChunkWindow = t["window"]
        if restart:
            window.restart()
        indices = window.take()
        if indices:
            self._publish(d, "up", proto.ChunkRequest(device=d.id, bundle_sha256=sha, indices=indices).to_payload())

    def _on_chunk(self, d: _Device, chunk: proto.Chunk) -> None:
        t = d.transfers.get(chunk.bundle_sha256)
        if t is None or not chunk_fits(t["blob"], chunk, self.hashes):
            return
        t["chunks"][chunk.index] = chunk.data
        t["seen"] = time.monotonic()
        t["window"].received(chunk.index)
        cmd: proto.InstallCommand = t["cmd"]
        blob: proto.InstallCommand = t["blob"]
        if len(t["chunks"]) < blob.chunks:
            self._request_chunks(d, chunk.bundle_sha256)  # refill the window
            return
        del d.transfers[chunk.bundle_sha256]
        data = b"".join(t["chunks"][i] for i in range(blob.chunks))
        via = "full" if blob is cmd else "delta"
        if blob is not cmd:  # the agent's own rebuild (sdk.device): bounded, checked against the bundle's sha256
            try:
                if not blob_matches(blob, data, self.hashes):
                    raise delta_mod.DeltaError("the delta did not arrive intact")
                data = rebuild(cmd, data, self._base(d, cmd.delta["base_sha256"]))
            except delta_mod.DeltaError as exc:
                self._fetch(d, cmd, cmd, str(exc))
                return
        elif not blob_matches(cmd, data, self.hashes):
            self._report(d, cmd, "FAILED", cmd.version, "reassembled bundle does not match its sha256",
                         bundle_sha256=cmd.bundle_sha256, via=via)
            return
        with self._lock:
            self._blobs.setdefault(cmd.bundle_sha256, data)
        self._later(self.install_s, lambda: self._installed(d, cmd, via))

    def _installed(self, d: _Device, cmd: proto.InstallCommand, via: str = "full") -> None:
        if not d.alive:
            return
        if cmd.version in self.fail_versions:
            self._report(d, cmd, "FAILED", cmd.version, "health check failed: simulated failure")
            return
        old = d.models.get(cmd.model)
        with self._lock:
            d.models[cmd.model] = cmd.version
            if old:
                d.previous[cmd.model] = old
            d.held[(cmd.model, cmd.version)] = cmd.bundle_sha256
            d.installs.append((cmd.version, via))
        self._report(d, cmd, "SUCCEEDED", cmd.version, previous_version=old, p50_ms=self._p50(cmd.version),
                     previous_p50_ms=self._p50(old), bundle_sha256=cmd.bundle_sha256, via=via)
        self._status(d)
        self._announce(d)

    def _on_rollback(self, d: _Device, cmd: proto.RollbackCommand) -> None:
        target = cmd.to_version or d.previous.get(cmd.model)
        if not target:
            self._report(d, cmd, "FAILED", "", "rollback failed: no previous version")
            return
        with self._lock:
            current = d.models.get(cmd.model)
            d.models[cmd.model] = target
            if current:
                d.previous[cmd.model] = current
        self._report(d, cmd, "ROLLED_BACK", target, previous_version=current)
        self._status(d)

    def _on_piece(self, d: _Device, piece: proto.TaskPiece) -> None:
        """A piece of a task too large for one message: reassembled as the agent does (sdk.pieces)."""
        with self._lock:
            if d.pieces is None:
                d.pieces = Reassembler(max_bytes=self.max_task_bytes, max_tasks=max(4, 2 * self.capacity),
                                       on_discard=lambda why: self._dropped(d, why))
        try:
            whole = d.pieces.add(piece)
        except PieceRefused as exc:
            self._dropped(d, str(exc))
            return
        if whole is not None:
            self._on_task(d, proto.Task.from_payload(whole))

    def _dropped(self, d: _Device, why: str) -> None:
        log.debug("sim %s: dropped a task piece: %s", d.id, why)
        with self._lock:
            self.dropped["task-piece"] += 1

    def _on_task(self, d: _Device, task: proto.Task) -> None:
        """Hold the task (declined past what the agent would hold) and run it when a slot is free:
        at most ``capacity`` at once, the rest queued in arrival order, as the agent does."""
        taken = d.slots.take(task.id)
        if not taken:
            if taken is False:
                log.debug("sim %s: declined task %s: too many tasks held", d.id, task.id)
            return  # a duplicate, or declined: the fleet sends it again
        with self._lock:
            d.queued.append(task)
        self._start_next(d)

    def _start_next(self, d: _Device) -> None:
        start = []
        with self._lock:
            while d.queued and d.busy < self.capacity:
                d.busy += 1
                start.append(d.queued.popleft())
        for task in start:
            self._later(self.infer_s * task.count, lambda t=task: self._task_done(d, t))

    def _task_done(self, d: _Device, task: proto.Task) -> None:
        with self._lock:
            if not d.alive or task.id not in d.slots:
                return  # the device "crashed" meanwhile
            d.busy -= 1
        flat = np.asarray(task.inputs[0], dtype=np.float32).reshape(task.count, -1)[:, : self.output_width]
        msg = proto.TaskResult(device=d.id, job=task.job, task=task.id, model=task.model,
                               version=d.models.get(task.model, ""), outputs=[flat],
                               elapsed_s=self.infer_s * task.count, samples=task.count)
        d.slots.finished(task.id, msg.id)  # announced as done until the fleet acknowledges it
        self._durable(d, msg)
        with self._lock:
            d.tasks_done += 1
        self._start_next(d)
        self._announce(d)

    # --- timers ------------------------------------------------------------------------------------
    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            fn()
            return
        with self._cv:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
            self._cv.notify()

    def _timer_loop(self) -> None:
        next_sweep = time.monotonic() + 1.0
        last_announce = time.monotonic()
        while not self._stop.is_set():
            with self._cv:
                now = time.monotonic()
                wait = min(next_sweep, self._timers[0][0] if self._timers else next_sweep) - now
                if wait > 0:
                    self._cv.wait(wait)
                now = time.monotonic()
                due = []
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
            for fn in due:
                try:
                    fn()
                except Exception:
                    log.exception("simulated device timer failed")
            if now >= next_sweep:
                next_sweep = now + 1.0
                announce = now - last_announce >= self.announce_interval
                if announce:
                    last_announce = now
                for d in self.devices.values():
                    if d.alive and d.conn is not None and d.conn.connected.is_set():
                        self._resend(d)
                        if announce and len(d.slots) < self.capacity + self.prefetch and d.models:
                            self._announce(d)
