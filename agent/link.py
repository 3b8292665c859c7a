"""The agent's link to the fleet over MQTT: presence, heartbeats, commands, bundle transfer and
the durable outbox sender.

* Presence: on every connect a retained :class:`~sdk.protocol.Status` (online, versions,
  runtime, delegates, active models, tags, free disk); the Last-Will is the same with
  ``online=False``, so a killed agent shows offline within moments.
* Heartbeats every ``heartbeat_interval`` with each model's latency percentiles and counters.
* Commands (``cmd``): install (transfer the chunks this device lacks, pipelined: at most the
  command's ``window`` of chunks asked for and not yet received, more asked for as they arrive,
  what is in flight asked for again after a reconnect or ``chunk_timeout`` without a chunk; see
  :mod:`sdk.chunkflow`; then verify/install),
  rollback, and the fleet's acks that clear the outbox. Work runs off paho's thread. One
  transfer per bundle: a repeated install command joins the transfer or install running for
  that bundle, and every rollout that asked hears the outcome. A command naming a model or
  version the device does not have, a bundle over ``max_bundle_bytes`` or one the free disk
  cannot hold is refused with a FAILED install status saying why, before anything is written.
* Delta updates: an install command may offer a delta against a bundle the device holds. The
  link then fetches the delta's chunks (the same :class:`Transfer`, for the delta's sha256 and
  size), finds the base by sha256 in the model store, rebuilds the bundle with
  :func:`sdk.delta.apply_delta` (output bounded by the bundle's size, checked against its
  sha256) and installs it exactly as a full one. No base, a delta that does not apply or a
  wrong result: a DOWNLOADING status with ``fallback`` and the reason, then the full bundle.
* Nothing from the network is trusted: every message on every channel is decoded through
  :mod:`sdk.protocol`; one that does not decode, or whose processing fails, is logged, counted
  in :attr:`AgentLink.dropped` under its channel (the agent's metrics show it) and dropped,
  and the messages behind it are processed as usual. Chunks for no running transfer are
  dropped and counted too.
* Large tasks come in pieces (:class:`~sdk.protocol.TaskPiece`) when one task frame is larger
  than the broker's packet limit; :class:`sdk.pieces.Reassembler` holds them within
  ``max_task_bytes`` and a timeout, checks the whole against its sha256, and the task runs as
  one that came whole; every refused piece is dropped and counted under ``task-piece``.
* Batch work (``task``): the agent announces its free slots (:class:`~sdk.protocol.WorkRequest`)
  on connect, when a task finishes, when its models change and every ``announce_interval``
  seconds while it has free slots; it runs at most ``work_slots`` tasks at once and holds up to
  ``prefetch`` more queued (announced, so the fleet sends the next task before this one ends;
  more while tasks are short, enough for :data:`PREFETCH_HORIZON_S` of work, see
  :attr:`AgentLink.prefetch`);
  a task runs as one batch (:meth:`agent.serving.ActiveModel.predict_batch`: one ``invoke`` where
  the model's batch dimension is dynamic). Each :class:`~sdk.protocol.TaskResult` (a binary
  frame) goes through the outbox; results that finish while the last ones are being written are
  stored together, in one transaction, and published at once by a writer thread. A full outbox
  announces zero free slots.
* Outbox sender: publishes what the outbox holds, again after every reconnect, whenever a new
  fleet session appears on the fleet's presence topic, and after ``resend_after`` seconds
  without an ack.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

import sdk
from sdk import delta as delta_mod
from sdk import protocol as proto
from sdk.errors import BackpressureError, BrokerError, EdgeSdkError, InstallError, ProtocolError
from sdk.mqtt import MqttConnection, MqttSettings
from sdk.device import DECODERS, FleetSession, WorkSlots, pin_refusal, plan_fetch, rebuild, send_due, subscriptions
from sdk.pieces import PieceRefused, Reassembler

from .daemon import Agent
from .outbox import Outbox, outbox_path
from .transfer import Transfer

log = logging.getLogger("edgesdk.agent.link")

__all__ = ["AgentLink", "PREFETCH_HORIZON_S"]

#: seconds of work an agent holds queued (beyond the tasks running) when its tasks are short: the
#: round trip from a result to the task that replaces it (outbox, broker, the fleet's transaction
#: and its sync to disk, broker again) took 10-60 ms on a loaded 2-core machine, and a device that
#: holds less than that idles between tasks
PREFETCH_HORIZON_S = 0.1

#: weight of the newest task in the moving averages of task run time and size
_AVERAGE_WEIGHT = 0.2


@dataclass
class _Running:
    """A bundle being received or installed: at most one per bundle sha256. ``transfer`` fetches
    the blob that travels (the bundle itself, or a delta against ``base``); ``command`` is the
    install command of the bundle."""

    transfer: Transfer
    rollouts: list[Optional[str]]  # every rollout that asked for it hears the outcome
    seen: float  # last progress (monotonic), for the watchdog's re-requests
    installing: bool = False
    command: Optional[proto.InstallCommand] = None  # the bundle's command (None: the transfer's own)

    @property
    def install(self) -> proto.InstallCommand:
        return self.command or self.transfer.command

    @property
    def via_delta(self) -> bool:
        return self.transfer.command.bundle_sha256 != self.install.bundle_sha256


def _unacked_results(outbox: Outbox) -> dict[str, str]:
    """Task results kept in the outbox from before a restart: message id -> task id (they are
    announced as done until the fleet acknowledges them)."""
    found = {}
    for m in outbox.due(-1.0, limit=outbox.max_messages):
        if m.payload[:4] != b"ESDK":  # task results are binary frames; the rest is JSON
            continue
        try:
            result = proto.TaskResult.from_payload(m.payload)
        except ProtocolError:
            continue
        found[result.id] = result.task
    return found


class AgentLink:
    def __init__(
        self,
        agent: Agent,
        *,
        resend_after: float = 30.0,
        chunk_timeout: float = 5.0,
        protocol: str = "auto",
        announce_interval: float = 5.0,
        piece_timeout: float = 120.0,
        prefetch: Optional[int] = None,
        prefetch_horizon: float = PREFETCH_HORIZON_S,
    ) -> None:
        self.agent = agent
        cfg = agent.config
        self.device = cfg.device_id
        self.outbox = Outbox(outbox_path(cfg.state_dir), cfg.outbox_max)
        self.resend_after = resend_after
        self.chunk_timeout = chunk_timeout
        self.settings = MqttSettings.from_url(  # one broker, or the nodes of a cluster to fail over between
            cfg.broker_url, client_id=f"edgesdk-agent-{self.device}", ca_file=cfg.ca_file, client_cert=cfg.client_cert,
            client_key=cfg.client_key, username=cfg.username, password=cfg.password, protocol=protocol, extra="agent",
        )
        self.conn: Optional[MqttConnection] = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._installs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgesdk-install")
        self._transfers: dict[str, _Running] = {}
        self._tlock = threading.Lock()
        self.capacity = cfg.work_slots or cfg.pool_size
        self.announce_interval = announce_interval
        #: tasks held queued beyond those running at least, so the next one is already here when one
        #: ends (0: none); more while tasks are short (:attr:`prefetch`)
        self.prefetch_min = max(0, min(proto.MAX_PREFETCH, cfg.prefetch if prefetch is None else prefetch))
        self.prefetch_horizon = prefetch_horizon
        self._max_queued_bytes = cfg.max_task_bytes
        #: recent tasks' run time in seconds and input bytes (moving averages; None before the first)
        self._task_s: Optional[float] = None
        self._task_bytes = 0.0
        #: the most this agent ever announced: the fleet may still act on that announcement, so
        #: tasks within it are never declined when :attr:`prefetch` shrinks
        self._announced_prefetch = self.prefetch_min
        self._tasks = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="edgesdk-task")
        #: the tasks held (running or queued) and those whose results await the fleet's ack
        self.slots = WorkSlots(self.capacity, self.prefetch_min)
        self.slots.remember_done(_unacked_results(self.outbox))
        #: finished tasks' results (topic, payload, message id, task id) waiting for the writer, which
        #: stores whatever has gathered in one outbox transaction: one sync to disk for many tasks,
        #: off the task thread, which goes on with the next (prefetched) task meanwhile
        self._results: list[tuple[str, bytes, str, str]] = []
        self._results_cv = threading.Condition()
        self._results_closed = False
        self._writer: Optional[threading.Thread] = None
        self._fleet = FleetSession()
        #: pieces of tasks too large for one MQTT message, held until whole (bounded: sdk.pieces)
        self.pieces = Reassembler(max_bytes=cfg.max_task_bytes, max_tasks=max(4, 2 * self.capacity),
                                  timeout_s=piece_timeout, on_discard=lambda why: self._drop("task-piece", why))
        #: messages dropped per channel (``cmd``, ``chunk``, ``task``, ``fleet``; ``chunk-no-transfer``,
        #: ``chunk-corrupt``): the agent's counter, shown on its metrics endpoint
        self.dropped = agent.dropped
        #: channel -> (its decoder in sdk.protocol, what processes the decoded message)
        self._channels: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], None]]] = {
            channel: (DECODERS[channel], process) for channel, process in (
                ("cmd", self._on_command), ("chunk", self._on_chunk), ("task", self._on_task_or_piece),
                ("fleet", self._on_fleet_status))}

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "AgentLink":
        will = (proto.topic(self.device, "status"), self._status(online=False).to_payload(), 1, True)
        self.conn = MqttConnection(self.settings, self._handle, subscriptions(self.device), will=will,
                                   on_connected=self._on_connected)
        self.conn.start()
        self.agent.result_sink = lambda model, outputs, key: self.publish_result(model, outputs, key=key)
        self.agent.link = self
        for target, name in ((self._sender, "outbox"), (self._heartbeats, "heartbeat"), (self._watchdog, "transfers")):
            t = threading.Thread(target=target, name=f"edgesdk-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._writer = threading.Thread(target=self._write_results, name="edgesdk-results", daemon=True)
        self._writer.start()
        return self

    def stop(self) -> None:
        self.agent.result_sink = None
        self.agent.link = None
        self._stop.set()
        self.outbox.changed.set()
        for t in self._threads:
            t.join(5)
        self._installs.shutdown(wait=True)
        self._tasks.shutdown(wait=True)
        with self._results_cv:  # the tasks have finished: their results are stored before the outbox closes
            self._results_closed = True
            self._results_cv.notify_all()
        if self._writer is not None:
            self._writer.join(10)
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
            bundles=sorted(self.agent.store.held())[: proto.MAX_HELD_BUNDLES],
            config=d["config"], config_revision=d["config_revision"], config_note=d["config_note"],
        )

    def publish_status(self) -> None:
        self._publish(proto.topic(self.device, "status"), self._status().to_payload(), retain=True)

    def describe(self) -> dict[str, Any]:
        """The link as ``edgesdk agent status`` shows it: connected or not, and the outbox's depth."""
        return {"connected": self.conn is not None and self.conn.connected.is_set(), "outbox_pending": len(self.outbox)}

    def report_install(self, status: proto.InstallStatus) -> None:
        """An install the fleet did not ask for (a sideload): its status through the outbox, and,
        when it changed what runs, the device's presence and free slots again."""
        self.send_durable(status)
        if status.state == "SUCCEEDED":
            self._safe_status()
            self.announce_work()

    def _on_connected(self) -> None:
        self.publish_status()
        self._resync()

    def _resync(self) -> None:
        """Replay the outbox, resume transfers, announce free slots (after a reconnect or when a
        new fleet session appears)."""
        self.outbox.reset_sent()
        with self._tlock:
            transfers = [r.transfer for r in self._transfers.values() if not r.installing]
        for t in transfers:
            self._request_chunks(t, restart=True)  # what was in flight may be lost with the connection
        self.announce_work()

    # --- batch work ----------------------------------------------------------------------------
    @property
    def prefetch(self) -> int:
        """Tasks to hold queued beyond those running, as announced: ``prefetch_min``, or, while
        tasks are short, enough for ``prefetch_horizon`` seconds of work on every slot (at most
        :data:`~sdk.protocol.MAX_PREFETCH`, and as many as ``max_task_bytes`` holds). 0 stays 0."""
        task_s = self._task_s
        if not self.prefetch_min or task_s is None:
            return self.prefetch_min
        by_time = math.ceil(self.prefetch_horizon * self.capacity / max(task_s, 1e-6))
        by_memory = int(self._max_queued_bytes // max(self._task_bytes, 1.0))
        return max(self.prefetch_min, min(proto.MAX_PREFETCH, by_time, by_memory))

    def _task_ran(self, seconds: float, nbytes: int) -> None:
        """Fold one task's run time and input size into the averages :attr:`prefetch` reads."""
        if self._task_s is None:
            self._task_s, self._task_bytes = seconds, float(nbytes)
        else:
            w = _AVERAGE_WEIGHT
            self._task_s = (1 - w) * self._task_s + w * seconds
            self._task_bytes = (1 - w) * self._task_bytes + w * nbytes

    def _work_request(self) -> proto.WorkRequest:
        models = self.agent.active_versions()  # after every task: no latency quantiles computed here
        prefetch = self.prefetch
        with self._tlock:
            self._announced_prefetch = max(self._announced_prefetch, prefetch)
        return self.slots.request(self.device, models, accepting=not self.outbox.full and not self._stop.is_set(),
                                  prefetch=prefetch)

    def announce_work(self) -> None:
        """Tell the fleet how many tasks this agent can take now (not durable: re-sent periodically)."""
        try:
            self._publish(proto.topic(self.device, "up"), self._work_request().to_payload())
        except BrokerError as exc:
            log.debug("work announcement deferred: %s", exc)

    def _on_task_or_piece(self, msg: "proto.Task | proto.TaskPiece") -> None:
        """A task, or a piece of one: pieces are held (bounded) until the whole task is there and
        matches its sha256, then it runs as any task; a refused piece is dropped and counted
        (``task-piece``), and so is a partial task that timed out."""
        if isinstance(msg, proto.Task):
            self._on_task(msg)
            return
        try:
            whole = self.pieces.add(msg)
        except PieceRefused as exc:
            self._drop("task-piece", str(exc))
            return
        if whole is not None:
            self._on_task(proto.Task.from_payload(whole))

    def _on_task(self, task: proto.Task) -> None:
        # the fleet keeps at most capacity + prefetch tasks outstanding; a few more can arrive when a
        # re-dispatched task's first result came back early: room for those, then declined
        full = self.outbox.full
        taken = self.slots.take(task.id, accepting=not full, prefetch=self._announced_prefetch)
        if taken is None:
            return  # a duplicate delivery of a task already held
        if not taken:
            log.warning("declined task %s of job %s: %s", task.id, task.job,
                        "outbox full" if full else "too many tasks queued")
            self.announce_work()  # the fleet re-dispatches the task (its next announcement shows it lost)
            return
        self._tasks.submit(self._run_task, task)

    def _run_task(self, task: proto.Task) -> None:
        t0 = time.perf_counter()
        version, outputs, error = "", [], ""
        try:
            model = self.agent.model(task.model)  # one model object: the version reported is the one that ran
            version = model.version
            outputs = model.predict_batch(task.inputs, quant=task.quant)  # whole arrays, one invoke where it can
        except EdgeSdkError as exc:
            error = str(exc)
        except Exception as exc:  # a bug on one task must not stop the worker
            log.exception("task %s failed", task.id)
            error = f"agent error: {type(exc).__name__}: {exc}"
        msg = proto.TaskResult(device=self.device, job=task.job, task=task.id, model=task.model, version=version,
                               outputs=outputs, error=proto.clip_text(error), elapsed_s=time.perf_counter() - t0,
                               samples=task.count)
        try:
            try:
                topic, payload = self._durable_payload(msg)
            except BrokerError as exc:  # too large for the broker: report that instead of the outputs
                msg.outputs, msg.error = [], f"{exc}: run the job with a smaller --batch-size"
                topic, payload = self._durable_payload(msg)
        except Exception:  # (an error result always fits) a bug must not leave the task held
            log.exception("task %s of job %s: no result could be made; the fleet will re-dispatch it", task.id, task.job)
            self._release([task.id])
            return
        with self._results_cv:
            self._results.append((topic, payload, msg.id, task.id))
            self._results_cv.notify()
            self._task_ran(time.perf_counter() - t0, sum(int(getattr(x, "nbytes", 0)) for x in task.inputs))

    def _write_results(self) -> None:
        """The result writer: stores the results gathered since its last write in one outbox
        transaction and publishes them, then frees their tasks' slots and announces them (until
        the link stops and every task has finished)."""
        while True:
            with self._results_cv:
                while not self._results and not self._results_closed:
                    self._results_cv.wait()
                batch, self._results = self._results, []
                if not batch and self._results_closed:
                    return
            sending = self.conn is not None and self.conn.connected.is_set()
            try:
                self.outbox.put_many([(mid, topic, payload) for topic, payload, mid, _ in batch], sending=sending)
                if sending:  # published from here: no read back from the outbox by the sender thread
                    self._send_stored(batch)
                stored = [(task_id, mid) for _, _, mid, task_id in batch]
            except BackpressureError as exc:  # stored one by one: as many as fit, the rest re-dispatched
                stored = []
                for topic, payload, mid, task_id in batch:
                    try:
                        self.outbox.put(mid, topic, payload)
                        stored.append((task_id, mid))
                    except BackpressureError:
                        log.error("task %s: result not queued (%s); the fleet will re-dispatch it", task_id, exc)
                        stored.append((task_id, None))
            except Exception:  # the disk failed: the fleet re-dispatches these tasks
                log.exception("results of %d task(s) could not be stored", len(batch))
                stored = [(task_id, None) for *_, task_id in batch]
            for task_id, mid in stored:
                self.slots.finished(task_id, mid)
            self.announce_work()

    def _send_stored(self, batch: list[tuple[str, bytes, str, str]]) -> None:
        """Publish results just stored as sent; one that cannot go now goes after the reconnect
        (which makes the whole outbox due again) or after ``resend_after``."""
        for topic, payload, *_ in batch:
            try:
                self.conn.publish(topic, payload, qos=1)
            except BrokerError as exc:
                log.debug("results sent after the reconnect: %s", exc)
                return

    def _release(self, task_ids: list[str]) -> None:
        """These tasks are over without a result (lost; the fleet sends them again): free their slots."""
        self.slots.release(task_ids)
        self.announce_work()

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.agent.config.heartbeat_interval):  # desired state may change it
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
        topic, payload = self._durable_payload(message)
        self.outbox.put(message.id, topic, payload)
        return message.id

    def _durable_payload(self, message: proto.Message) -> tuple[str, bytes]:
        """The topic and payload of a durable message; BrokerError when it exceeds the packet limit."""
        topic, payload = proto.topic(self.device, "up"), message.to_payload()
        limit = self.conn.max_packet if self.conn is not None else self.settings.max_packet_size
        if len(payload) + len(topic) + 16 > limit:
            raise BrokerError(f"{message.TYPE} message of {len(payload)} bytes exceeds the broker's packet limit of {limit}")
        return topic, payload

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
            conn = self.conn
            if conn is None or not conn.connected.is_set():
                continue
            send_due(self.outbox, lambda topic, payload: conn.publish(topic, payload, qos=1), self.resend_after,
                     stop=self._stop)

    def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if self.conn is None:
            raise BrokerError("not started")
        self.conn.publish(topic, payload, qos=qos, retain=retain)

    # --- incoming messages -----------------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes) -> None:
        """Every incoming message, on every channel, is decoded through :mod:`sdk.protocol` and then
        dispatched; whatever fails (a ProtocolError, or any error processing it) is logged, counted
        in :attr:`dropped` under its channel, and never stops the messages behind it."""
        channel = self._channel(topic)
        try:
            entry = self._channels.get(channel)
            if entry is None:
                raise ProtocolError(f"no messages are expected on {topic!r}")
            decode, process = entry
            process(decode(payload))
        except ProtocolError as exc:
            self._drop(channel, f"{exc}")
        except Exception as exc:  # a failure on one message must not stall the link
            log.debug("processing a %s message failed", channel, exc_info=True)
            self._drop(channel, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _channel(topic: str) -> str:
        if topic == proto.fleet_topic():
            return "fleet"
        try:
            return proto.parse_topic(topic)[1]
        except ProtocolError:
            return "unknown"

    def _drop(self, channel: str, why: str) -> None:
        log.warning("dropped a message on %s: %s", channel, why)
        self.agent.count_dropped(channel)

    def _on_command(self, msg: proto.Message) -> None:
        if isinstance(msg, proto.Ack):
            self.outbox.ack(msg.ack_ids)
            self.slots.acknowledged(msg.ack_ids)
        elif isinstance(msg, proto.InstallCommand):
            self._on_install(msg)
        elif isinstance(msg, proto.RollbackCommand):
            self._installs.submit(self._do_rollback, msg)
        elif isinstance(msg, proto.ConfigCommand):
            self._installs.submit(self._do_config, msg)  # one at a time with installs and rollbacks
        else:
            raise ProtocolError(f"a {msg.TYPE} message is not a command")

    def _do_config(self, cmd: proto.ConfigCommand) -> None:
        """Apply the fleet's desired configuration (:mod:`agent.desired`), then say what runs now."""
        try:
            self.agent.apply_config(cmd)
        except Exception:  # a bug must not stop the command worker; the status says what runs
            log.exception("desired configuration revision %d could not be applied", cmd.revision)
        cfg = self.agent.config
        capacity = cfg.work_slots or cfg.pool_size
        if capacity != self.capacity:  # from the next task on (running ones finish where they are)
            old, self._tasks = self._tasks, ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="edgesdk-task")
            self.capacity = self.slots.capacity = capacity
            old.shutdown(wait=False)
        self.publish_status()
        self.announce_work()

    def _on_fleet_status(self, msg: proto.FleetStatus) -> None:
        first = not self._fleet.current
        if self._fleet.is_new(msg):
            if not first:
                log.info("a new fleet session (%s): replaying the outbox", msg.session[:8])
            self._resync()

    def _report(self, state: str, model: str, version: str, reason: str = "", rollout: Optional[str] = None,
                previous: Optional[str] = None, p50_ms: Optional[float] = None,
                previous_p50_ms: Optional[float] = None, **transfer: Any) -> None:
        """Queue an install status; ``transfer``: its ``bundle_sha256``, ``via`` and ``fallback``."""
        try:
            status = proto.InstallStatus(device=self.device, model=model, version=version, state=state,
                                         reason=proto.clip_text(reason),
                                         rollout=rollout, previous_version=previous, p50_ms=p50_ms,
                                         previous_p50_ms=previous_p50_ms, **transfer)
            self.send_durable(status)
        except BackpressureError:
            log.error("outbox full: could not queue install status %s %s@%s", state, model, version)
        except (ProtocolError, BrokerError) as exc:  # e.g. a command whose ids cannot be sent back
            log.warning("could not report install status %s for %r@%r: %s", state, model, version, exc)

    # --- installs --------------------------------------------------------------------------------
    def _on_install(self, cmd: proto.InstallCommand) -> None:
        """Start (or join) the transfer of ``cmd``'s bundle; a command the agent cannot follow
        (a value that cannot name a file, over a limit, no disk space) is refused with FAILED."""
        try:
            self._start_install(cmd)
        except ProtocolError as exc:
            self.agent.count_dropped("cmd")
            log.warning("refused an install command: %s", exc)
            self._report("FAILED", cmd.model, cmd.version, f"refused: {exc}", cmd.rollout)
        except EdgeSdkError as exc:
            self._report("FAILED", cmd.model, cmd.version, str(exc), cmd.rollout)

    def _start_install(self, cmd: proto.InstallCommand) -> None:
        if self.agent.store.active(cmd.model) == cmd.version:
            self._report("SUCCEEDED", cmd.model, cmd.version, "already active", cmd.rollout,
                         self.agent.store.previous(cmd.model))
            return
        refusal = pin_refusal(cmd.model, cmd.version, self.agent.desired.pins)
        if refusal is not None:  # refused before anything is fetched
            self._report("FAILED", cmd.model, cmd.version, refusal, cmd.rollout)
            return
        if not self.agent.runtime.supports(cmd.min_runtime_version):
            rt = self.agent.runtime
            self._report("FAILED", cmd.model, cmd.version,
                         f"incompatible: needs TFLite runtime {cmd.min_runtime_version}, device has {rt.name} "
                         f"{rt.version} (TFLite {rt.tflite_version})", cmd.rollout)
            return
        with self._tlock:
            running = self._running_for(cmd.bundle_sha256)
            if running is not None:
                self._join(running, cmd)
                return
        blob, note = plan_fetch(cmd, lambda sha: self.agent.store.find(cmd.model, sha) is not None)
        self._open_transfer(cmd, blob, [cmd.rollout], note)

    def _running_for(self, bundle_sha256: str) -> Optional["_Running"]:
        """The transfer or install running for bundle ``bundle_sha256`` (whole or as a delta);
        called under ``_tlock``."""
        for r in self._transfers.values():
            if r.install.bundle_sha256 == bundle_sha256:
                return r
        return None

    def _open_transfer(self, cmd: proto.InstallCommand, blob: proto.InstallCommand, rollouts: list[Optional[str]],
                       note: str = "") -> None:
        """Start fetching ``blob`` (``cmd``'s bundle, or its delta) for ``rollouts``. The full
        bundle's limits and disk space are checked either way, so a delta that fails can fall back."""
        cfg = self.agent.config
        with self._tlock:
            reserved = sum(r.transfer.needed_bytes() for r in self._transfers.values())
        if blob is not cmd:
            full = Transfer(cfg.state_dir, cmd)
            full.check_limits(cfg.max_bundle_bytes)
            full.check_space(reserved + blob.bundle_size)
        transfer = Transfer.open(cfg.state_dir, blob, max_bundle_bytes=cfg.max_bundle_bytes, reserved_bytes=reserved)
        running = _Running(transfer, list(rollouts), time.monotonic(), command=cmd)
        with self._tlock:
            self._transfers[blob.bundle_sha256] = running
        via = "delta" if running.via_delta else "full"
        what = (f"a {cmd.delta['method']} delta of {blob.bundle_size} bytes against {cmd.delta['base_sha256'][:12]} "
                f"instead of the {cmd.bundle_size}-byte bundle: " if running.via_delta else "")
        extra = f" (delta not used: {note})" if note else ""
        for rollout in rollouts:
            self._report("DOWNLOADING", cmd.model, cmd.version,
                         f"{what}{len(transfer.missing())} of {transfer.count} chunks to fetch{extra}", rollout,
                         bundle_sha256=cmd.bundle_sha256, via=via, fallback=bool(note))
        if transfer.complete:
            self._start_finish(running)
        else:
            self._request_chunks(transfer)

    def _join(self, running: "_Running", cmd: proto.InstallCommand) -> None:
        """A repeated install command for a bundle already transferring or installing (called under
        ``_tlock``): it joins that one, and its rollout hears the outcome."""
        first = running.install
        same = (cmd.model, cmd.version, cmd.bundle_size, cmd.chunk_size) == (first.model, first.version,
                                                                              first.bundle_size, first.chunk_size)
        if not same:
            raise InstallError(
                f"bundle {cmd.bundle_sha256[:12]} is already being received as {first.model}@{first.version} "
                f"({first.bundle_size} bytes in chunks of {first.chunk_size}); this command names {cmd.model}@"
                f"{cmd.version} ({cmd.bundle_size} bytes in chunks of {cmd.chunk_size}): refused")
        if cmd.rollout not in running.rollouts:
            running.rollouts.append(cmd.rollout)
        if running.installing:
            self._report("VERIFYING", cmd.model, cmd.version, "joined the install already running", cmd.rollout)
            return
        t = running.transfer
        self._report("DOWNLOADING", cmd.model, cmd.version,
                     f"joined the running transfer: {t.count - len(t.missing())} of {t.count} chunks held", cmd.rollout)
        running.seen = time.monotonic()
        self._request_chunks(t, restart=True)  # a repeated command: the fleet may have restarted

    def _request_chunks(self, transfer: Transfer, *, restart: bool = False) -> None:
        """Ask for the chunks the transfer's window allows now (none while more than half of it is
        in flight); ``restart``: first presume what is in flight lost, so it is asked for again."""
        if restart:
            transfer.window.restart()
        indices = transfer.window.take()
        if not indices:
            return
        req = proto.ChunkRequest(device=self.device, bundle_sha256=transfer.command.bundle_sha256, indices=indices)
        try:
            self._publish(proto.topic(self.device, "up"), req.to_payload())
        except BrokerError as exc:  # not connected: asked again on reconnect (or by the watchdog)
            transfer.window.restart()
            log.debug("chunk request deferred: %s", exc)

    def _on_chunk(self, chunk: proto.Chunk) -> None:
        with self._tlock:
            running = self._transfers.get(chunk.bundle_sha256)
            if running is None or running.installing:
                running = None
        if running is None:
            self._drop("chunk-no-transfer", f"chunk {chunk.index} of {chunk.bundle_sha256[:12]}: no transfer running")
            return
        transfer = running.transfer
        if not transfer.add(chunk):
            self._drop("chunk-corrupt", f"chunk {chunk.index} of {chunk.bundle_sha256[:12]} does not match its "
                                        "sha256 or length (or came after the transfer ended)")
            return
        running.seen = time.monotonic()
        if transfer.complete:
            self._start_finish(running)
        else:
            self._request_chunks(transfer)  # refill the window: the next chunks are on their way

    def _start_finish(self, running: "_Running") -> None:
        """Hand a complete transfer to the install thread, once."""
        with self._tlock:
            if running.installing:
                return
            running.installing = True
        self._installs.submit(self._finish, running)

    def _watchdog(self) -> None:
        last_announce = time.monotonic()
        while not self._stop.wait(1.0):
            now = time.monotonic()
            self.pieces.expire()  # partial tasks whose pieces stopped coming: dropped and counted
            if now - last_announce >= self.announce_interval:
                last_announce = now
                if self.conn is not None and self.conn.connected.is_set() and self._work_request().free:
                    self.announce_work()
            with self._tlock:
                stale = [r for r in self._transfers.values() if not r.installing and now - r.seen > self.chunk_timeout]
                for r in stale:
                    r.seen = now
            for r in stale:  # no chunk for chunk_timeout: what is in flight is presumed lost
                self._request_chunks(r.transfer, restart=True)

    def _rebuild(self, running: "_Running") -> bytes:
        """The bundle from a complete delta transfer (:func:`sdk.device.rebuild`: the base read
        from this device's own store by its sha256). Raises DeltaError."""
        cmd = running.install
        try:
            patch = running.transfer.assemble()
        except InstallError as exc:
            raise delta_mod.DeltaError(f"the delta did not arrive intact ({exc})") from exc
        return rebuild(cmd, patch, self.agent.store.find(cmd.model, cmd.delta["base_sha256"]))

    def _finish(self, running: "_Running") -> None:
        """Reassemble (or rebuild from a delta), verify and install a complete transfer; report the
        outcome to every rollout that asked for it. Until this returns, repeated commands for the
        bundle join it. A delta that does not rebuild the bundle falls back to the full bundle."""
        transfer = running.transfer
        cmd = running.install
        result: dict[str, Any] = {}
        failure = fallback = ""
        try:
            if running.via_delta:
                try:
                    data = self._rebuild(running)
                except delta_mod.DeltaError as exc:
                    fallback, data = str(exc), b""
            else:
                data = transfer.assemble()
            if not fallback:  # the rebuilt bundle goes through exactly the path a full one does
                result = self.agent.install(data, expected=(cmd.model, cmd.version), origin="fleet")
        except EdgeSdkError as exc:
            failure = str(exc)
        except Exception as exc:  # a bug must not leave the transfer (and its rollouts) hanging
            log.exception("installing %s@%s failed", cmd.model, cmd.version)
            failure = f"agent error: {type(exc).__name__}: {exc}"
        finally:
            transfer.discard()
            with self._tlock:
                key = transfer.command.bundle_sha256
                if self._transfers.get(key) is running:
                    del self._transfers[key]
                rollouts = list(running.rollouts)
        if fallback:
            log.warning("%s@%s: %s; fetching the full bundle", cmd.model, cmd.version, fallback)
            try:
                self._open_transfer(cmd, cmd, rollouts, fallback)
            except EdgeSdkError as exc:
                for rollout in rollouts:
                    self._report("FAILED", cmd.model, cmd.version, f"{fallback}; the full bundle: {exc}", rollout,
                                 bundle_sha256=cmd.bundle_sha256)
            return
        via = "delta" if running.via_delta else "full"
        for rollout in rollouts:
            if failure:
                rebuilt = (f" (the bundle was rebuilt from a {cmd.delta['method']} delta and matched its sha256)"
                           if running.via_delta else "")
                self._report("FAILED", cmd.model, cmd.version, failure + rebuilt, rollout,
                             bundle_sha256=cmd.bundle_sha256, via=via)
            else:
                how = (f"installed from a {cmd.delta['method']} delta of {transfer.command.bundle_size} bytes "
                       f"(the bundle: {cmd.bundle_size})" if running.via_delta else "")
                self._report("SUCCEEDED", cmd.model, cmd.version, how, rollout, result.get("previous"),
                             result.get("p50_ms"), result.get("previous_p50_ms"), bundle_sha256=cmd.bundle_sha256,
                             via=via)
        if not failure:
            self._safe_status()
            self.announce_work()

    def _do_rollback(self, cmd: proto.RollbackCommand) -> None:
        """Roll back as told; a model or version this device does not have is refused with FAILED,
        the reason naming what it has."""
        try:
            result = self.agent.rollback(cmd.model, cmd.to_version)
        except Exception as exc:  # EdgeSdkError: refused; anything else: a bug, still reported
            if not isinstance(exc, EdgeSdkError):
                log.exception("rollback of %s failed", cmd.model)
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
