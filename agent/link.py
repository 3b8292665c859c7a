"""The agent's link to the fleet over MQTT: presence, heartbeats, commands, bundle transfer and
the durable outbox sender.

* Presence: on every connect a retained :class:`~sdk.protocol.Status` (online, versions,
  runtime, delegates, active models, tags, free disk); the Last-Will is the same with
  ``online=False``, so a killed agent shows offline within moments.
* Heartbeats every ``heartbeat_interval`` with each model's latency percentiles and counters.
* Commands (``cmd``): install (transfer the chunks this device lacks, then verify/install),
  rollback, and the fleet's acks that clear the outbox. Work runs off paho's thread.
* Outbox sender: publishes what the outbox holds, again after every reconnect and after
  ``resend_after`` seconds without an ack.
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

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "AgentLink":
        will = (proto.topic(self.device, "status"), self._status(online=False).to_payload(), 1, True)
        subs = [(proto.topic(self.device, "cmd"), 1), (proto.topic(self.device, "chunk"), 1)]
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
        self.outbox.reset_sent()
        with self._tlock:
            transfers = [t for t, _ in self._transfers.values()]
        for t in transfers:
            self._request_chunks(t)

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
        """Queue a message in the outbox (raises BackpressureError when full); returns its id."""
        self.outbox.put(message.id, proto.topic(self.device, "up"), message.to_payload())
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
        _, channel = proto.parse_topic(topic)
        if channel == "chunk":
            self._on_chunk(proto.Chunk.from_payload(payload))
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

    def _report(self, state: str, model: str, version: str, reason: str = "", rollout: Optional[str] = None,
                previous: Optional[str] = None, p50_ms: Optional[float] = None) -> None:
        status = proto.InstallStatus(device=self.device, model=model, version=version, state=state, reason=reason,
                                     rollout=rollout, previous_version=previous, p50_ms=p50_ms)
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
        while not self._stop.wait(1.0):
            now = time.monotonic()
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
        self._report("SUCCEEDED", cmd.model, cmd.version, "", cmd.rollout, result.get("previous"), result.get("p50_ms"))
        self._safe_status()

    def _do_rollback(self, cmd: proto.RollbackCommand) -> None:
        try:
            result = self.agent.rollback(cmd.model, cmd.to_version)
        except EdgeSdkError as exc:
            self._report("FAILED", cmd.model, cmd.to_version or "", f"rollback failed: {exc}", cmd.rollout)
            return
        self._report("ROLLED_BACK", cmd.model, result["version"], "", cmd.rollout, result.get("previous"), result.get("p50_ms"))
        self._safe_status()

    def _safe_status(self) -> None:
        try:
            self.publish_status()
        except BrokerError:
            pass  # re-published on the next connect
