"""The fleet's engine: the one thread that writes the fleet's state and talks to devices, while
its controller leads.

Every MQTT message goes onto a queue (paho's thread never waits on the database). The engine
takes a batch of them off the queue and applies it in one transaction whose first statement
checks leadership (:meth:`fleet.leader.LeaseLeadership.fence`: a controller whose lease lapsed
writes nothing), commits, and only then acknowledges the agents' durable messages and sends
what the batch caused (tasks, install and rollback commands; bundle chunks, which change
nothing, go out at once). So whatever the fleet acknowledged is stored, and a controller killed
at any moment is replaced by one that resumes from the database (rollouts and jobs in
progress are picked up; agents replay their outboxes when they see the new controller's
session on the fleet's presence topic).

Messages are routed by type through one table (:attr:`Engine.handlers`). Nothing a device sends
can stall the engine: a message is read only through :func:`fleet.registry.read_device_message`
(its sender is the device of its topic), a task result counts only from the device holding the
task's lease (:mod:`fleet.jobs`), a chunk request is answered only for a bundle a running
rollout is sending to that device, and each message, each job's and each rollout's work runs in
its own SAVEPOINT: when it raises, only its changes are undone (a job or rollout then ends
FAILED with the reason) and the rest of the transaction goes on. The database's own failures
(:attr:`fleet.storage.FleetDB.Unavailable`) are not the message's fault: the step is retried,
or, when the connection is gone, the engine stops and its controller stands for leadership
again with a new connection.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable, MutableMapping, Optional

from sdk import protocol as proto
from sdk.errors import BrokerError, ProtocolError
from sdk.mqtt import MqttConnection, MqttSettings

from .bundlestore import BundleStore
from .chunks import ChunkCache
from .deltas import DeltaPlanner
from .desired import ConfigSender
from .jobs import JobController
from .leader import LostLeadership
from .registry import Registry, SpoofedMessage, read_device_message
from .rollout import RolloutController
from .storage import FleetDB, Storage, dumps

log = logging.getLogger("edgesdk.fleet")

__all__ = ["Engine", "DURABLE"]

#: device messages that come from an agent's outbox: stored once (by id) and acknowledged
DURABLE = (proto.InstallStatus, proto.TaskResult, proto.Result)

#: messages taken off the queue for one transaction at most
MAX_BATCH = 1000


class Engine:
    """One leadership term of a controller: open (connect), :meth:`run` until told to stop or
    until leadership or the database is lost, :meth:`close`.

    ``clock`` gives the time every controller uses (leases, time-outs, timestamps); ``stats``
    counts messages by kind and what was dropped and why (benchmarks, tests, metrics);
    ``on_batch(seconds, messages)`` is called after each committed transaction (metrics).
    """

    def __init__(self, storage: Storage, leadership: Any, settings: MqttSettings, *, bundles: BundleStore,
                 chunks: ChunkCache, deltas: DeltaPlanner, stats: MutableMapping[str, int], tick: float = 0.2,
                 clock: Callable[[], float] = time.time,
                 on_batch: Optional[Callable[[float, int], None]] = None) -> None:
        self.storage = storage
        self.leadership = leadership
        self.settings = settings
        self.bundles, self.chunks, self.deltas = bundles, chunks, deltas
        self.stats = stats
        self.tick_interval = tick
        self.clock = clock
        self.on_batch = on_batch
        self.session = uuid.uuid4().hex
        self.inbox: "queue.Queue[tuple[str, bytes]]" = queue.Queue()
        self._outgoing: list[tuple[str, bytes, int, Optional[str]]] = []
        self._unsent_tasks: list[str] = []
        #: during a batch's first pass, its durable ids that were new (stored together in one
        #: statement); None in the per-message pass, where each message records its own
        self._fresh: Optional[set[str]] = None
        self._resume = threading.Event()
        #: step the rollouts now, not at the next tick: a rollout was created, or a device finished
        self.kick = threading.Event()
        self.conn: Optional[MqttConnection] = None
        self.db: Optional[FleetDB] = None
        #: why :meth:`run` returned (empty while it runs or after a requested stop)
        self.ended = ""
        self.handlers: dict[type, Callable[[str, Any, float, dict[str, list[str]]], None]] = {
            proto.Status: self._on_status, proto.Heartbeat: self._on_heartbeat,
            proto.ChunkRequest: self._on_chunk_request, proto.WorkRequest: self._on_work_request,
            proto.InstallStatus: self._on_durable, proto.TaskResult: self._on_durable, proto.Result: self._on_durable,
        }

    # --- lifecycle ------------------------------------------------------------------------------
    def open(self, *, wait_connected: float = 15.0) -> "Engine":
        """Open the engine's own database connection and the controllers on it, then connect to
        the broker (BrokerError when it does not answer within ``wait_connected`` seconds; 0:
        do not wait, paho keeps trying)."""
        dedicated = getattr(self.storage, "dedicated", None)
        self.db = dedicated() if dedicated else self.storage.connect()
        self.leadership.prepare(self.db)
        self.db.execute("DELETE FROM seen WHERE at < ?", (self.clock() - 30 * 86400,))
        self.registry = Registry(self.db, cache=True)
        self.rollouts = RolloutController(self.db, self.registry, self._send_command, self._send_command, self.clock,
                                          isolate=self.isolated, deltas=self.deltas)
        self.jobs = JobController(self.db, self.registry, self._send_task, self.clock, isolate=self.isolated,
                                  stats=self.stats, max_packet=self.max_packet, blobs=self.storage.blobs)
        self.configs = ConfigSender(self.db, self._send_command)
        will = (proto.fleet_topic(), proto.FleetStatus(online=False, session=self.session).to_payload(), 1, True)
        # presence at QoS 0: a broker queues at most so many QoS-1 messages per client (Mosquitto:
        # max_queued_messages, 1000), and the retained statuses of 10,000 devices arrive in one
        # burst at every (re)subscribe; QoS 0 is not queued that way, and what a dropped live
        # status said comes back as the retained one at the next (re)subscribe
        subs = [(proto.subscription("status"), 0), (proto.subscription("heartbeat"), 0), (proto.subscription("up"), 1)]
        self.conn = MqttConnection(self.settings, self._on_message, subs, will=will, on_connected=self._on_connected)
        self.conn.start()
        if wait_connected and not self.conn.wait_connected(wait_connected):
            raise BrokerError(f"cannot connect to the MQTT broker at {self.settings.host}:{self.settings.port} "
                              f"within {wait_connected:g} s: check --broker and that the broker runs")
        return self

    def close(self) -> None:
        """Disconnect (saying offline on the fleet's presence topic after a requested stop; not
        after losing the lead, when the new leader's presence is the one that counts), close the
        database connection."""
        if self.conn is not None:
            offline = (proto.fleet_topic(), proto.FleetStatus(online=False, session=self.session).to_payload(), 1, True)
            say_offline = not self.ended and self.conn.connected.is_set()
            self.conn.stop(publish_before=offline if say_offline else None)
            self.conn = None
        if self.db is not None:
            try:
                self.db.rollback()
                self.db.close()
            except Exception as exc:  # a connection that broke is closed anyway
                log.debug("closing the engine's database connection: %s", exc)
            self.db = None

    def wake(self) -> None:
        """Run a step now (a rollout or job was created by this process)."""
        self.kick.set()
        self.inbox.put((proto.fleet_topic(), b""))  # messages on that topic are skipped

    def max_packet(self) -> int:
        """The broker's packet limit as the fleet knows it: its own setting, lowered by what the
        broker announced at connect (MQTT 5's Maximum Packet Size)."""
        return self.conn.max_packet if self.conn is not None else self.settings.max_packet_size

    def _on_connected(self) -> None:
        status = proto.FleetStatus(online=True, session=self.session)
        try:
            self.conn.publish(proto.fleet_topic(), status.to_payload(), qos=1, retain=True)
        except BrokerError as exc:
            log.warning("could not publish the fleet's presence: %s", exc)
        self._resume.set()  # the engine resends installs in progress

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))  # paho's worker never waits on the database

    # --- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> str:
        """Apply messages and tick the controllers until ``stop`` is set (returns ""), or until
        leadership or the database connection is lost (returns why)."""
        last_tick = 0.0
        while not stop.is_set():
            batch = self._take_batch()
            started = time.perf_counter()
            acks: dict[str, list[str]] = defaultdict(list)
            messages = self._decode(batch)
            try:
                self.db.begin()
                self.leadership.fence(self.db)
                self._apply(messages, acks)
                self._requeue_unsent()
                last_tick = self._tick(last_tick, bool(batch))
                self.db.commit()
            except LostLeadership as exc:
                self._abandon()
                log.warning("%s: standing down", exc)
                return self._ended(str(exc))
            except self.db.Unavailable as exc:
                self._abandon()
                if getattr(self.db.conn, "closed", False):
                    log.error("the fleet database connection is lost (%s): standing down", exc)
                    return self._ended(f"the database connection was lost: {exc}")
                log.warning("the fleet database failed a step (%s); retrying", exc)
                time.sleep(0.5)
                continue
            except Exception:
                log.exception("fleet engine step failed; retrying")
                self._abandon()
                time.sleep(0.5)
                continue
            for _, msg, _ in messages:
                self.stats[msg.TYPE] += 1
            self._flush(acks)
            if self.on_batch is not None and batch:
                self.on_batch(time.perf_counter() - started, len(batch))
        return self._ended("")

    def _ended(self, why: str) -> str:
        self.ended = why
        return why

    def _take_batch(self) -> list[tuple[str, bytes]]:
        batch = []
        try:
            batch.append(self.inbox.get(timeout=self.tick_interval))
            while len(batch) < MAX_BATCH:
                batch.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return batch

    def _abandon(self) -> None:
        """Undo the step: roll back, and send nothing it queued."""
        try:
            self.db.rollback()
        except Exception as exc:  # the connection may be gone: nothing to roll back then
            log.debug("rollback failed: %s", exc)
        self._outgoing.clear()

    def _requeue_unsent(self) -> None:
        """Tasks whose publish failed after the last commit go back to the queue."""
        if self._unsent_tasks:
            self.db.executemany("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL "
                                "WHERE id = ? AND state = 'LEASED'", [(t,) for t in self._unsent_tasks])
            self._unsent_tasks.clear()

    def _tick(self, last_tick: float, busy: bool) -> float:
        """Resume rollouts after a (re)connect; tick rollouts and jobs every ``tick`` seconds or
        when kicked; otherwise, after a batch, dispatch tasks to slots the batch freed."""
        connected = self.conn is not None and self.conn.connected.is_set()
        if not connected:
            return last_tick
        if self._resume.is_set():
            self._resume.clear()
            self.rollouts.resume()
        now = time.monotonic()
        if now - last_tick >= self.tick_interval or self.kick.is_set():
            self.kick.clear()
            self.rollouts.tick()
            self.jobs.tick()
            self.configs.tick()
            return now
        if busy:
            self.jobs.dispatch()
        return last_tick

    def isolated(self, what: str, step: Callable[[], None], on_failure: Callable[[str], None]) -> bool:
        """Run one job's or one rollout's step in its own SAVEPOINT (see :data:`fleet.storage.Isolate`).

        When the step raises, its database changes and the messages it queued are undone and
        ``on_failure(reason)`` marks its job or rollout FAILED; the engine's transaction goes on.
        The database's own failures are not the unit's fault: they propagate, and the engine
        retries the whole step."""
        self.db.savepoint("unit")
        queued = len(self._outgoing)
        try:
            step()
            return True
        except self.db.Unavailable:
            raise
        except Exception as exc:
            log.exception("%s could not be processed; it ends FAILED", what)
            self.db.rollback_to("unit")
            del self._outgoing[queued:]
            self.stats["isolated_failures"] += 1
            on_failure(f"the fleet could not process it: {type(exc).__name__}: {exc}"[:500])
            return False
        finally:
            self.db.release("unit")

    # --- messages -------------------------------------------------------------------------------
    def _decode(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, Any, Callable[..., None]]]:
        """``(device, message, its handler)`` for every message of the batch a device may send;
        the others are dropped and counted (what the topic does not vouch for, what does not
        decode, what only the fleet sends)."""
        out = []
        for topic, payload in batch:
            if topic == proto.fleet_topic():
                continue
            try:
                device, msg = read_device_message(topic, payload)
            except SpoofedMessage as exc:
                # the topic is what the broker's ACL vouches for; a message speaking for another device is dropped
                log.warning("ignored %s", exc)
                self.stats["spoofed"] += 1
                continue
            except ProtocolError as exc:
                log.warning("ignored a message on %s: %s", topic, exc)
                self.stats["malformed"] += 1
                continue
            handler = self.handlers.get(type(msg))
            if handler is None:  # a command or an ack: the fleet sends those, devices do not
                log.warning("ignored a %s from %s: devices do not send it", msg.TYPE, device)
                self.stats["unexpected"] += 1
                continue
            out.append((device, msg, handler))
        return out

    def _apply(self, messages: list[tuple[str, Any, Callable[..., None]]], acks: dict[str, list[str]]) -> None:
        """Apply the batch's messages in the open transaction. First all together; when one of
        them raises, the batch is undone and applied again with each message in a SAVEPOINT of
        its own, so the one that fails is rolled back alone, dropped, counted and (if durable)
        acknowledged so its agent stops re-sending it. (A savepoint per message costs two round
        trips to a PostgreSQL server; failures are rare, so the first pass goes without.)"""
        try:
            self._fresh = self.db.first_sights((m.id for _, m, _ in messages if isinstance(m, DURABLE)), self.clock())
            for device, msg, handler in messages:
                handler(device, msg, self.clock(), acks)
            return
        except self.db.Unavailable:
            raise  # the database's fault, not a message's: the whole step is retried
        except Exception as exc:
            log.warning("a message broke the batch (%s: %s); applying it one message at a time",
                        type(exc).__name__, exc)
        finally:
            self._fresh = None
        self.db.rollback()
        self._outgoing.clear()
        acks.clear()
        self.db.begin()
        self.leadership.fence(self.db)
        for device, msg, handler in messages:
            self.db.savepoint("message")
            queued = len(self._outgoing)
            try:
                handler(device, msg, self.clock(), acks)
            except self.db.Unavailable:
                raise
            except Exception:  # one bad message must not undo the batch, nor come back forever
                log.exception("could not process a %s from %s; dropped", msg.TYPE, device)
                self.stats["failed_messages"] += 1
                self.db.rollback_to("message")
                del self._outgoing[queued:]
                if isinstance(msg, DURABLE):
                    acks[device].append(msg.id)
            self.db.release("message")

    def _on_status(self, device: str, msg: proto.Status, now: float, acks: dict[str, list[str]]) -> None:
        if self.registry.on_status(msg, now):
            self.rollouts.on_device_online(device)
        if not msg.online:
            self.jobs.on_device_offline(device)
        self.configs.on_status(msg)

    def _on_heartbeat(self, device: str, msg: proto.Heartbeat, now: float, acks: dict[str, list[str]]) -> None:
        self.registry.on_heartbeat(msg, now)

    def _on_work_request(self, device: str, msg: proto.WorkRequest, now: float, acks: dict[str, list[str]]) -> None:
        self.jobs.on_work_request(msg)

    def _on_chunk_request(self, device: str, msg: proto.ChunkRequest, now: float, acks: dict[str, list[str]]) -> None:
        # sent at once, not after the batch's commit: a chunk answers a read (the bundle, and
        # whether a rollout is sending it there), changes nothing, and must not wait for a commit
        for chunk in self._chunks_for(msg):
            if self.conn is not None and self._publish(proto.topic(device, "chunk"), chunk, 1):
                self.stats["chunks_sent"] += 1

    def _on_durable(self, device: str, msg: Any, now: float, acks: dict[str, list[str]]) -> None:
        """An outbox message: stored once by id; acknowledged (after the commit) every time,
        since the agent may not have seen an earlier ack."""
        if self._fresh is not None:  # the batch's ids, recorded together (see _apply)
            new = msg.id in self._fresh
            self._fresh.discard(msg.id)  # a second copy in the same batch is a duplicate
        else:
            new = self.db.first_sight(msg.id, now)
        if not new:
            self.stats["duplicates"] += 1
        elif isinstance(msg, proto.InstallStatus):
            self._on_install_status(msg, now)
        elif isinstance(msg, proto.TaskResult):
            self.jobs.on_result(msg)
        else:
            self.db.execute("INSERT INTO results (id, device, model, version, key, outputs, meta, ts) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                            (msg.id, msg.device, msg.model, msg.version, msg.key, dumps(msg.outputs),
                             dumps(msg.meta), msg.ts))
        acks[device].append(msg.id)

    def _on_install_status(self, msg: proto.InstallStatus, now: float) -> None:
        self.registry.on_install_status(msg, now)
        self.rollouts.on_install_status(msg)
        if msg.state in ("SUCCEEDED", "FAILED", "ROLLED_BACK"):
            self.kick.set()  # the stage may be over: start the next devices, or finish, now
        if msg.fallback:
            self.stats["delta_fallbacks"] += 1
        elif msg.state == "SUCCEEDED" and msg.via == "delta":
            self.stats["delta_installs"] += 1

    def _chunks_for(self, req: proto.ChunkRequest) -> list[bytes]:
        """The chunks to answer ``req`` with: none unless a running rollout is sending that
        bundle to that device (``req.device`` is the device of the topic)."""
        if not self.rollouts.is_sending(req.device, req.bundle_sha256):
            log.warning("dropped a chunk request from %s for bundle %.12s: no running rollout is sending it that bundle",
                        req.device, str(req.bundle_sha256))
            self.stats["rejected_chunk_requests"] += 1
            return []
        try:
            return self.chunks.requested(req.bundle_sha256, req.indices, db=self.db)
        except (OSError, ProtocolError) as exc:
            log.warning("%s asked for chunks of bundle %.12s, which the store cannot give: %s", req.device,
                        str(req.bundle_sha256), exc)
            self.stats["rejected_chunk_requests"] += 1
            return []

    # --- sending ------------------------------------------------------------------------------
    def _flush(self, acks: dict[str, list[str]]) -> None:
        """After the commit: acknowledge, then send what the batch decided."""
        out, self._outgoing = self._outgoing, []
        if self.conn is None:
            return
        for device, ids in acks.items():
            for i in range(0, len(ids), 500):
                self._publish(proto.topic(device, "cmd"), proto.Ack(ack_ids=ids[i : i + 500]).to_payload())
        for topic, payload, qos, task_id in out:
            if not self._publish(topic, payload, qos) and task_id:
                self._unsent_tasks.append(task_id)

    def _publish(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        try:
            self.conn.publish(topic, payload, qos=qos)
            self.stats[f"sent.{topic.rsplit('/', 1)[-1]}"] += 1  # messages out, by channel (metrics)
            return True
        except BrokerError as exc:
            log.warning("could not send on %s: %s", topic, exc)
            return False

    # seams the controllers call (inside the engine's transaction: queued until the commit)
    def _send_command(self, device: str, cmd: proto.Message) -> None:
        """An install, rollback or configuration command to ``device``."""
        self._outgoing.append((proto.topic(device, "cmd"), cmd.to_payload(), 1, None))

    def _send_task(self, device: str, task_id: str, payload: bytes) -> None:
        self._outgoing.append((proto.topic(device, "task"), payload, 1, task_id))
