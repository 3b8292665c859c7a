"""Simulated devices: many lightweight agents in one process, speaking the real protocol.

For tests and benchmarks at fleet scale (1,000 devices on a 2-core machine): each simulated
device has its own topics, retained status, durable outbox (in memory, re-sent until the fleet
acknowledges), chunked bundle transfer (every chunk and the reassembled bundle checked against
their sha256), rollback, free-slot announcements and batch tasks. What is simulated:

* inference: a task of N samples "takes" ``infer_s`` × N seconds (a timer, not a CPU) and its
  output is an echo, the first ``output_width`` values of each sample (so results can be checked
  against the inputs, in order);
* install: ``install_s`` seconds after the bundle is complete; versions in ``fail_versions``
  fail; ``p50_ms`` (a number, or ``{version: ms}``) is the latency the device reports, so a
  latency regression can be staged;
* devices share MQTT connections (``per_connection`` devices each), so there is no per-device
  Last-Will: :meth:`SimulatedDevices.kill` publishes the retained offline status a Last-Will
  would and drops the device's running tasks, as a crash does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

import sdk
from sdk import protocol as proto
from sdk.errors import BrokerError, ProtocolError
from sdk.mqtt import MqttConnection, MqttSettings

log = logging.getLogger("edgesdk.fleet.sim")

__all__ = ["SimulatedDevices"]


@dataclass
class _Device:
    id: str
    tags: dict[str, str]
    models: dict[str, str]
    conn: Any = None
    alive: bool = True
    previous: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    outbox: dict[str, list[Any]] = field(default_factory=dict)  # id -> [topic, payload, sent_at]
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks_done: int = 0


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
    ) -> None:
        self.settings = settings or MqttSettings.from_url(broker)
        self.capacity, self.infer_s, self.install_s = capacity, infer_s, install_s
        self.p50_ms, self.fail_versions, self.output_width = p50_ms, tuple(fail_versions), output_width
        self.per_connection = max(1, per_connection)
        self.resend_after, self.announce_interval = resend_after, announce_interval
        self.devices: dict[str, _Device] = {}
        for i in range(count):
            t = tags(i) if callable(tags) else (tags or {})
            dev_id = f"{prefix}-{i:04d}"
            self.devices[dev_id] = _Device(dev_id, {"sim": "1", **dict(t)}, dict(models or {}))
        self._conns: list[MqttConnection] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None
        self._fleet_session = ""

    @property
    def ids(self) -> list[str]:
        return list(self.devices)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "SimulatedDevices":
        ids = list(self.devices)
        for k in range(0, len(ids), self.per_connection):
            group = [self.devices[d] for d in ids[k : k + self.per_connection]]
            subs = [(proto.topic(d.id, ch), 1) for d in group for ch in ("cmd", "chunk", "task")]
            subs.append((proto.fleet_topic(), 1))
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
            d.running.clear()
        self._status(d, online=False)

    def revive(self, device: str) -> None:
        d = self.devices[device]
        with self._lock:
            d.alive = True
        self._status(d, online=True)
        self._announce(d)

    def models(self, device: str) -> dict[str, str]:
        return dict(self.devices[device].models)

    # --- outgoing ------------------------------------------------------------------------------
    def _publish(self, d: _Device, channel: str, payload: bytes, retain: bool = False) -> None:
        try:
            d.conn.publish(proto.topic(d.id, channel), payload, qos=1, retain=retain)
        except BrokerError as exc:
            log.debug("sim %s: %s", d.id, exc)

    def _status(self, d: _Device, online: bool = True) -> None:
        s = proto.Status(device=d.id, online=online, agent_version=f"{sdk.__version__}-sim",
                         runtime={"name": "simulated"}, delegates=["cpu"], models=dict(d.models), tags=d.tags)
        self._publish(d, "status", s.to_payload(), retain=True)

    def _announce(self, d: _Device) -> None:
        if not d.alive:
            return
        free = max(0, self.capacity - len(d.running)) if d.models else 0
        msg = proto.WorkRequest(device=d.id, models=dict(d.models), capacity=self.capacity, free=free,
                                running=sorted(d.running))
        self._publish(d, "up", msg.to_payload())

    def _durable(self, d: _Device, msg: proto.Message) -> None:
        payload = msg.to_payload()
        with self._lock:
            d.outbox[msg.id] = [proto.topic(d.id, "up"), payload, time.monotonic()]
        self._publish(d, "up", payload)

    def _connected(self, group: list[_Device]) -> None:
        for d in group:
            if d.alive:
                self._status(d)
                self._resend(d, everything=True)
                self._announce(d)

    def _resend(self, d: _Device, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [m for m in d.outbox.values() if everything or now - m[2] > self.resend_after]
            for m in due:
                m[2] = now
        for topic, payload, _ in due:
            try:
                d.conn.publish(topic, payload, qos=1)
            except BrokerError:
                return
        for sha, t in list(d.transfers.items()):
            if everything or now - t["seen"] > 3.0:
                t["seen"] = now
                self._request_chunks(d, sha)

    # --- incoming --------------------------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == proto.fleet_topic():
            try:
                fs = proto.FleetStatus.from_payload(payload)
            except ProtocolError:
                return
            if fs.online and fs.session != self._fleet_session:
                self._fleet_session = fs.session
                for d in self.devices.values():
                    if d.alive and d.conn is not None:
                        self._resend(d, everything=True)
                        self._announce(d)
            return
        device, channel = proto.parse_topic(topic)
        d = self.devices.get(device)
        if d is None or not d.alive:
            return
        if channel == "chunk":
            self._on_chunk(d, proto.Chunk.from_payload(payload))
        elif channel == "task":
            self._on_task(d, proto.Task.from_payload(payload))
        else:
            msg = proto.decode(payload)
            if isinstance(msg, proto.Ack):
                with self._lock:
                    for i in msg.ack_ids:
                        d.outbox.pop(i, None)
            elif isinstance(msg, proto.InstallCommand):
                self._on_install(d, msg)
            elif isinstance(msg, proto.RollbackCommand):
                self._on_rollback(d, msg)

    def _p50(self, version: Optional[str]) -> Optional[float]:
        if version is None:
            return None
        if isinstance(self.p50_ms, Mapping):
            return float(self.p50_ms.get(version, 1.0))
        return float(self.p50_ms)

    def _report(self, d: _Device, cmd: Any, state: str, version: str, reason: str = "", **extra: Any) -> None:
        self._durable(d, proto.InstallStatus(device=d.id, model=cmd.model, version=version, state=state, reason=reason,
                                             rollout=cmd.rollout, **extra))

    def _on_install(self, d: _Device, cmd: proto.InstallCommand) -> None:
        if d.models.get(cmd.model) == cmd.version:
            self._report(d, cmd, "SUCCEEDED", cmd.version, "already active", previous_version=d.previous.get(cmd.model))
            return
        if cmd.bundle_sha256 not in d.transfers:
            d.transfers[cmd.bundle_sha256] = {"cmd": cmd, "chunks": {}, "seen": time.monotonic()}
        self._report(d, cmd, "DOWNLOADING", cmd.version, f"{cmd.chunks} chunks to fetch")
        self._request_chunks(d, cmd.bundle_sha256)

    def _request_chunks(self, d: _Device, sha: str) -> None:
        t = d.transfers.get(sha)
        if t is None:
            return
        missing = [i for i in range(t["cmd"].chunks) if i not in t["chunks"]]
        if missing:
            self._publish(d, "up", proto.ChunkRequest(device=d.id, bundle_sha256=sha, indices=missing).to_payload())

    def _on_chunk(self, d: _Device, chunk: proto.Chunk) -> None:
        t = d.transfers.get(chunk.bundle_sha256)
        if t is None or hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
            return
        t["chunks"][chunk.index] = chunk.data
        t["seen"] = time.monotonic()
        cmd: proto.InstallCommand = t["cmd"]
        if len(t["chunks"]) < cmd.chunks:
            return
        del d.transfers[chunk.bundle_sha256]
        data = b"".join(t["chunks"][i] for i in range(cmd.chunks))
        if hashlib.sha256(data).hexdigest() != cmd.bundle_sha256:
            self._report(d, cmd, "FAILED", cmd.version, "reassembled bundle does not match its sha256")
            return
        self._later(self.install_s, lambda: self._installed(d, cmd))

    def _installed(self, d: _Device, cmd: proto.InstallCommand) -> None:
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
        self._report(d, cmd, "SUCCEEDED", cmd.version, previous_version=old, p50_ms=self._p50(cmd.version),
                     previous_p50_ms=self._p50(old))
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

    def _on_task(self, d: _Device, task: proto.Task) -> None:
        with self._lock:
            if task.id in d.running:
                return
            d.running.add(task.id)
        self._later(self.infer_s * task.count, lambda: self._task_done(d, task))

    def _task_done(self, d: _Device, task: proto.Task) -> None:
        with self._lock:
            if not d.alive or task.id not in d.running:
                return  # the device "crashed" meanwhile
        flat = np.asarray(task.inputs[0], dtype=np.float32).reshape(task.count, -1)[:, : self.output_width]
        msg = proto.TaskResult(device=d.id, job=task.job, task=task.id, model=task.model,
                               version=d.models.get(task.model, ""), outputs=[proto.Result.encode_tensor(flat)],
                               elapsed_s=self.infer_s * task.count, samples=task.count)
        self._durable(d, msg)
        with self._lock:
            d.running.discard(task.id)
            d.tasks_done += 1
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
                        if announce and len(d.running) < self.capacity and d.models:
                            self._announce(d)
