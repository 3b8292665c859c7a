"""The agent's link to the fleet over MQTT: presence, heartbeats, commands, bundle transfer and
the durable outbox sender.

* Presence: on every connect a retained :class:`~sdk.protocol.Status` (online, versions,
  runtime, delegates, active models, tags, free disk); the Last-Will is the same with
  ``online=False``, so a killed agent shows offline within moments.
* Heartbeats every ``heartbeat_interval`` with each model's latency percentiles and counters.
* Commands (``cmd``): install (transfer the chunks this device lacks, then verify/install),
  rollback, and the fleet's acks that clear the outbox. Work runs off paho's thread.
* Batch work (``task``): the agent announces its free slots (:class:`~sdk.protocol.WorkRequest`)
  on connect, when a task finishes, when its models change and every ``announce_interval``
  seconds while it has free slots; it runs at most ``work_slots`` tasks at once and sends each
  :class:`~sdk.protocol.TaskResult` through the outbox. A full outbox announces zero free slots.
* Outbox sender: publishes what the outbox holds, again after every reconnect, whenever a new
  fleet session appears on the fleet's presence topic, and after ``resend_after`` seconds
  without an ack.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np

import sdk
from sdk import protocol as proto
from sdk.errors import BackpressureError, BrokerError, EdgeSdkError, ProtocolError
from sdk.mqtt import MqttConnection, MqttSettings

from .daemon import Agent
from .outbox import Outbox
from .transfer import Transfer

log = logging.getLogger("edgesdk.agent.link")

__all__ = ["AgentLink"]


class AgentLink:
    def __init__(
        self,
        agent: Agent,
        *,
        resend_after: float = 30.0,
        chunk_timeout: float = 5.0,
        connection_factory: Callable[..., MqttConnection] = MqttConnection,
        protocol: str = "auto",
        announce_interval: float = 5.0,
    ) -> None:
        self.agent = agent
        cfg = agent.config
        self.device = cfg.device_id
        self.outbox = Outbox(cfg.state_dir / "outbox.sqlite", cfg.outbox_max)
        self.resend_after = resend_after
        self.chunk_timeout = chunk_timeout
        self.settings = MqttSettings(
            host=cfg.broker_host, port=cfg.broker_port, client_id=f"edgesdk-agent-{self.device}", tls=cfg.tls,
            ca_file=cfg.ca_file, client_cert=cfg.client_cert, client_key=cfg.client_key, username=cfg.username,
            password=cfg.password, protocol=protocol,
        )
        self._factory = connection_factory
        self.conn: Optional[MqttConnection] = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._installs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgesdk-install")
        self._transfers: dict[str, tuple[Transfer, float]] = {}
        self._tlock = threading.Lock()
        self.capacity = cfg.work_slots or cfg.pool_size
        self.announce_interval = announce_interval
        self._tasks = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="edgesdk-task")
        self._running: set[str] = set()
        self._fleet_session = ""

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "AgentLink":
        will = (proto.topic(self.device, "status"), self._status(online=False).to_payload(), 1, True)
        subs = [(proto.topic(self.device, "cmd"), 1), (proto.topic(self.device, "chunk"), 1),
                (proto.topic(self.device, "task"), 1), (proto.fleet_topic(), 1)]
        self.conn = self._factory(self.settings, self._handle, subs, will=will, on_connected=self._on_connected)
        self.conn.start()
        self.agent.result_sink = lambda model, outputs, key: self.publish_result(model, outputs, key=key)
        for target, name in ((self._sender, "outbox"), (self._heartbeats, "heartbeat"), (self._watchdog, "transfers")):
            t = threading.Thread(target=target, name=f"edgesdk-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.agent.result_sink = None
        self._stop.set()
        self.outbox.changed.set()
        for t in self._threads:
            t.join(5)
        self._installs.shutdown(wait=True)
        self._tasks.shutdown(wait=True)
        if self.conn is not None:
            offline = (proto.topic(self.device, "status"), self._status(online=False).to_payload(), 1, True)
            self.conn.stop(publish_before=offline)
        self.outbox.close()

    # --- presence & telemetry --------------------------------------------------------------------
    def _status(self, online: bool = True) -> proto.Status:
        d = self.agent.describe()
        return proto.Status(
            device=self.device, online=online, agent_version=sdk.__version__, runtime=d["runtime"],
            delegates=self.agent.delegates(), models=d["models"], tags=d["tags"],
            free_disk_bytes=int(d["free_disk_bytes"]), accepting_work=not self.outbox.full,
        )

    def publish_status(self) -> None:
        self._publish(proto.topic(self.device, "status"), self._status().to_payload(), retain=True)

    def _on_connected(self) -> None:
        self.publish_status()
        self._resync()

    def _resync(self) -> None:
        """Replay the outbox, resume transfers, announce free slots (after a reconnect or when a
        new fleet session appears)."""
        self.outbox.reset_sent()
        with self._tlock:
            transfers = [t for t, _ in self._transfers.values()]
        for t in transfers:
            self._request_chunks(t)
        self.announce_work()

    # --- batch work ----------------------------------------------------------------------------
    def _work_request(self) -> proto.WorkRequest:
        models = self.agent.active_versions()  # after every task: no latency quantiles computed here
        with self._tlock:
            running = sorted(self._running)
        free = self.capacity - len(running) if models and not self.outbox.full and not self._stop.is_set() else 0
        return proto.WorkRequest(device=self.device, models=models, capacity=self.capacity, free=max(0, free),
                                 running=running)

    def announce_work(self) -> None:
        """Tell the fleet how many tasks this agent can take now (not durable: re-sent periodically)."""
        try:
            self._publish(proto.topic(self.device, "up"), self._work_request().to_payload())
        except BrokerError as exc:
            log.debug("work announcement deferred: %s", exc)

    def _on_task(self, task: proto.Task) -> None:
        with self._tlock:
            if task.id in self._running:
                return  # a duplicate delivery of a task already running
            # the fleet keeps at most `capacity` tasks outstanding; a few more can arrive when a
            # re-dispatched task's first result came back early, so queue up to 4x before declining
            if self.outbox.full or len(self._running) >= 4 * self.capacity:
                log.warning("declined task %s of job %s: %s", task.id, task.job,
                            "outbox full" if self.outbox.full else "too many tasks queued")
                declined = True
            else:
                self._running.add(task.id)
                declined = False
        if declined:
            self.announce_work()  # the fleet re-dispatches the task when its lease ends
            return
        self._tasks.submit(self._run_task, task)

    def _run_task(self, task: proto.Task) -> None:
        t0 = time.perf_counter()
        version, outputs, error = "", [], ""
        try:
            model = self.agent.model(task.model)
            version = model.version
            per_sample = [self.agent.predict(task.model, [x[i : i + 1] for x in task.inputs]) for i in range(task.count)]
            outputs = [proto.Result.encode_tensor(np.concatenate([ys[k] for ys in per_sample], axis=0))
                       for k in range(len(per_sample[0]))] if per_sample else []
        except EdgeSdkError as exc:
            error = str(exc)
        except Exception as exc:  # a bug on one task must not stop the worker
            log.exception("task %s failed", task.id)
            error = f"agent error: {type(exc).__name__}: {exc}"
        msg = proto.TaskResult(device=self.device, job=task.job, task=task.id, model=task.model, version=version,
                               outputs=outputs, error=error, elapsed_s=time.perf_counter() - t0, samples=task.count)
        try:
            try:
                self.send_durable(msg)
            except BrokerError as exc:  # too large for the broker: report that instead of the outputs
                msg.outputs, msg.error = [], f"{exc}: run the job with a smaller --batch-size"
                self.send_durable(msg)
        except BackpressureError as exc:
            log.error("task %s of job %s: result not queued (%s); the fleet will re-dispatch it", task.id, task.job, exc)
        finally:
            with self._tlock:
                self._running.discard(task.id)
            self.announce_work()

    def _heartbeats(self) -> None:
        interval = self.agent.config.heartbeat_interval
        while not self._stop.wait(interval):
            hb = proto.Heartbeat(
                device=self.device, uptime_s=time.time() - self.agent.started_at,
                models={m["name"]: {"version": m["active"], **(m["stats"] or {})} for m in self.agent.models()},
                outbox_pending=len(self.outbox),
            )
            try:
                self._publish(proto.topic(self.device, "heartbeat"), hb.to_payload(), qos=0)
            except BrokerError:
                pass  # telemetry is best effort; results and statuses go through the outbox

    # --- durable messages ---------------------------------------------------------------------
    def send_durable(self, message: proto.Message) -> str:
        """Queue a message in the outbox; returns its id. Raises BackpressureError when the outbox
        is full and BrokerError when the message could never pass the broker's packet limit (an
        oversized message must not sit in the outbox blocking everything behind it)."""
        topic, payload = proto.topic(self.device, "up"), message.to_payload()
        limit = self.conn.max_packet if self.conn is not None else self.settings.max_packet_size
        if len(payload) + len(topic) + 16 > limit:
            raise BrokerError(f"{message.TYPE} message of {len(payload)} bytes exceeds the broker's packet limit of {limit}")
        self.outbox.put(message.id, topic, payload)
        return message.id

    def publish_result(self, model: str, outputs: Sequence[np.ndarray], *, key: str = "",
                       meta: Optional[dict[str, Any]] = None) -> str:
        """Send an inference result to the fleet durably; it survives broker and agent restarts."""
        m = self.agent.model(model)
        msg = proto.Result(device=self.device, model=model, version=m.version, key=key,
                           outputs=[proto.Result.encode_tensor(o) for o in outputs], meta=dict(meta or {}))
        return self.send_durable(msg)

    def _sender(self) -> None:
        while not self._stop.is_set():
            self.outbox.changed.wait(0.5)
            self.outbox.changed.clear()
            if self.conn is None or not self.conn.connected.is_set():
                continue
            while not self._stop.is_set():
                due = self.outbox.due(self.resend_after, limit=200)
                if not due:
                    break
                sent = []
                for m in due:
                    try:
                        self.conn.publish(m.topic, m.payload, qos=1)
                    except BrokerError as exc:
                        log.debug("outbox send paused: %s", exc)
                        break
                    sent.append(m.seq)
                self.outbox.mark_sent(sent)
                if len(sent) < len(due):
                    break

    def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if self.conn is None:
            raise BrokerError("not started")
        self.conn.publish(topic, payload, qos=qos, retain=retain)

    # --- commands ---------------------------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == proto.fleet_topic():
            self._on_fleet_status(payload)
            return
        _, channel = proto.parse_topic(topic)
        if channel == "chunk":
            self._on_chunk(proto.Chunk.from_payload(payload))
            return
        if channel == "task":
            self._on_task(proto.Task.from_payload(payload))
            return
        try:
            msg = proto.decode(payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed command: %s", exc)
            return
        if isinstance(msg, proto.Ack):
            self.outbox.ack(msg.ack_ids)
        elif isinstance(msg, proto.InstallCommand):
            self._on_install(msg)
        elif isinstance(msg, proto.RollbackCommand):
            self._installs.submit(self._do_rollback, msg)
        else:
            log.warning("ignored unexpected %s message on cmd", msg.TYPE)

    def _on_fleet_status(self, payload: bytes) -> None:
        try:
            msg = proto.FleetStatus.from_payload(payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed fleet status: %s", exc)
            return
        if msg.online and msg.session != self._fleet_session:
            first = not self._fleet_session
            self._fleet_session = msg.session
            if not first:
                log.info("a new fleet session (%s): replaying the outbox", msg.session[:8])
            self._resync()

    def _report(self, state: str, model: str, version: str, reason: str = "", rollout: Optional[str] = None,
                previous: Optional[str] = None, p50_ms: Optional[float] = None,
                previous_p50_ms: Optional[float] = None) -> None:
        status = proto.InstallStatus(device=self.device, model=model, version=version, state=state, reason=reason,
                                     rollout=rollout, previous_version=previous, p50_ms=p50_ms,
                                     previous_p50_ms=previous_p50_ms)
        try:
            self.send_durable(status)
        except BackpressureError:
            log.error("outbox full: could not queue install status %s %s@%s", state, model, version)

    def _on_install(self, cmd: proto.InstallCommand) -> None:
        if self.agent.store.active(cmd.model) == cmd.version:
            self._report("SUCCEEDED", cmd.model, cmd.version, "already active", cmd.rollout,
                         self.agent.store.previous(cmd.model))
            return
        if not self.agent.runtime.supports(cmd.min_runtime_version):
            rt = self.agent.runtime
            self._report("FAILED", cmd.model, cmd.version,
                         f"incompatible: needs TFLite runtime {cmd.min_runtime_version}, device has {rt.name} "
                         f"{rt.version} (TFLite {rt.tflite_version})", cmd.rollout)
            return
        transfer = Transfer(self.agent.config.state_dir, cmd)
        with self._tlock:
            self._transfers[cmd.bundle_sha256] = (transfer, time.monotonic())
        self._report("DOWNLOADING", cmd.model, cmd.version, f"{len(transfer.missing())} of {transfer.count} chunks to fetch",
                     cmd.rollout)
        if transfer.complete:
            self._finish(transfer)
        else:
            self._request_chunks(transfer)

    def _request_chunks(self, transfer: Transfer) -> None:
        missing = transfer.missing()
        if not missing:
            return
        req = proto.ChunkRequest(device=self.device, bundle_sha256=transfer.command.bundle_sha256, indices=missing)
        try:
            self._publish(proto.topic(self.device, "up"), req.to_payload())
        except BrokerError as exc:
            log.debug("chunk request deferred: %s", exc)

    def _on_chunk(self, chunk: proto.Chunk) -> None:
        with self._tlock:
            entry = self._transfers.get(chunk.bundle_sha256)
        if entry is None:
            return
        transfer, _ = entry
        if not transfer.add(chunk):
            log.warning("discarded a corrupt chunk %d of %s", chunk.index, chunk.bundle_sha256[:12])
            return
        with self._tlock:
            if chunk.bundle_sha256 in self._transfers:
                self._transfers[chunk.bundle_sha256] = (transfer, time.monotonic())
        if transfer.complete:
            with self._tlock:
                self._transfers.pop(chunk.bundle_sha256, None)
            self._installs.submit(self._finish, transfer)

    def _watchdog(self) -> None:
        last_announce = time.monotonic()
        while not self._stop.wait(1.0):
            now = time.monotonic()
            if now - last_announce >= self.announce_interval:
                last_announce = now
                if self.conn is not None and self.conn.connected.is_set() and self._work_request().free:
                    self.announce_work()
            with self._tlock:
                stale = [t for t, seen in self._transfers.values() if now - seen > self.chunk_timeout]
                for t in stale:
                    self._transfers[t.command.bundle_sha256] = (t, now)
            for t in stale:
                self._request_chunks(t)

    def _finish(self, transfer: Transfer) -> None:
        cmd = transfer.command
        try:
            data = transfer.assemble()
            result = self.agent.install(data)
        except EdgeSdkError as exc:
            self._report("FAILED", cmd.model, cmd.version, str(exc), cmd.rollout)
            return
        finally:
            if transfer.dir.exists() and transfer.complete:
                transfer.discard()
        self._report("SUCCEEDED", cmd.model, cmd.version, "", cmd.rollout, result.get("previous"), result.get("p50_ms"),
                     result.get("previous_p50_ms"))
        self._safe_status()
        self.announce_work()

    def _do_rollback(self, cmd: proto.RollbackCommand) -> None:
        try:
            result = self.agent.rollback(cmd.model, cmd.to_version)
        except EdgeSdkError as exc:
            self._report("FAILED", cmd.model, cmd.to_version or "", f"rollback failed: {exc}", cmd.rollout)
            return
        self._report("ROLLED_BACK", cmd.model, result["version"], "", cmd.rollout, result.get("previous"), result.get("p50_ms"))
        self._safe_status()
        self.announce_work()

    def _safe_status(self) -> None:
        try:
            self.publish_status()
        except BrokerError:
            pass  # re-published on the next connect
