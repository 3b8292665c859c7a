"""``Fleet``: the fleet's one process: registry, rollouts and batch jobs over MQTT.

Python use::

    from fleet import Fleet

    with Fleet("~/.local/share/edgesdk/fleet", "mqtt://broker:1883") as fleet:
        print([d.id for d in fleet.devices() if d.online])
        rid = fleet.deploy("digits-2.edgebundle", to={"site": "berlin"}, canary=1, max_latency_regression=1.5)
        print(fleet.wait_rollout(rid).state)
        job = fleet.run("digits", "frames.npz", batch_size=64)   # JobSummary with .outputs
        print(job.samples_per_s, job.efficiency)

One process at a time controls a state directory (a lock file): it alone writes the database,
acknowledges the agents' durable messages and sends commands. Its engine thread takes every
MQTT message off a queue (paho's thread never waits), applies a batch of them in one SQLite
transaction, commits, and only then acknowledges them to the agents and sends what the batch
caused (tasks, install and rollback commands; bundle chunks, which change nothing, go out at
once); so whatever the fleet acknowledged is on disk,
and a fleet killed at any moment resumes from its database (``Fleet.start`` picks up every
running rollout and job).

Nothing a device sends can stall the engine: a message is read only through
:func:`fleet.registry.read_device_message` (its sender is the device of its topic), a task
result only counts from the device holding the task's lease (:mod:`fleet.jobs`), a chunk
request is answered only for a bundle a running rollout is sending to that device, and each
job's and each rollout's work runs in its own SAVEPOINT (:meth:`Fleet._isolated`): when it
raises, only its changes are undone and that job or rollout ends FAILED with the reason, while
everything else in the same transaction goes on (also after a restart: the FAILED state is
stored, so the row that broke it is not processed again).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from sdk import protocol as proto
from sdk.bundle import Bundle
from sdk.errors import BrokerError, BundleError, FleetError, JobError, ProtocolError, RolloutError
from sdk.mqtt import MqttConnection, MqttSettings

from . import jobs as jobs_mod
from . import rollout as rollout_mod
from .bundlestore import BundleStore
from .chunks import ChunkCache
from .deltas import DeltaPlanner
from .jobs import JobController, JobOptions, JobSummary
from .registry import DeviceInfo, Registry, SpoofedMessage, parse_tags, read_device_message
from .rollout import RolloutController, RolloutOptions, RolloutView
from .state import FleetDB, default_state_dir, dumps

log = logging.getLogger("edgesdk.fleet")

__all__ = ["Fleet"]

Inputs = Union[str, os.PathLike, np.ndarray, Sequence[np.ndarray]]


class _ControllerLock:
    """An exclusive ``flock`` on ``<state_dir>/controller.lock``: one controlling process per state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Fleet:
    """The fleet controller. ``connection_factory`` and ``clock`` are seams for tests."""

    def __init__(
        self,
        state_dir: Optional[Union[str, os.PathLike]] = None,
        broker: str = "mqtt://127.0.0.1:1883",
        *,
        settings: Optional[MqttSettings] = None,
        name: str = "edgesdk-fleet",
        tick: float = 0.2,
        clock: Callable[[], float] = time.time,
        connection_factory: Callable[..., MqttConnection] = MqttConnection,
        deltas: bool = True,
        **mqtt_options: Any,
    ) -> None:
        self.state_dir = Path(os.path.expanduser(str(state_dir))) if state_dir else default_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings or MqttSettings.from_url(broker, client_id=name, **mqtt_options)
        if not self.settings.client_id:
            self.settings.client_id = name
        self.tick_interval = tick
        self.clock = clock
        self._factory = connection_factory
        self._lock = _ControllerLock(self.state_dir / "controller.lock")
        self._inbox: "queue.Queue[tuple[str, bytes]]" = queue.Queue()
        self._outgoing: list[tuple[str, bytes, int, Optional[str]]] = []
        self._unsent_tasks: list[str] = []
        self._stop = threading.Event()
        self._engine: Optional[threading.Thread] = None
        self._resume = threading.Event()
        #: step the rollouts now, not at the next tick: a rollout was created, or a device finished
        self._kick = threading.Event()
        self.conn: Optional[MqttConnection] = None
        self.session = uuid.uuid4().hex
        self.db: Optional[FleetDB] = None
        self.bundles = BundleStore(self.state_dir / "bundles")
        self.chunks = ChunkCache(self.bundles)
        #: delta updates (``deltas=False``: always send bundles whole)
        self.deltas = DeltaPlanner(self.bundles, enabled=deltas)
        # messages by kind, duplicates, chunks sent, what was dropped and why (benchmarks, tests)
        self.stats: defaultdict[str, int] = defaultdict(int)
        FleetDB(self.state_dir).close()  # create the schema

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._engine is not None and self._engine.is_alive()

    def start(self, *, wait_connected: float = 15.0) -> "Fleet":
        """Take control of the state directory, connect, and resume every running rollout and job."""
        if not self._lock.acquire():
            raise FleetError(f"another fleet process (pid {self._lock.holder()}) controls {self.state_dir}: "
                             "stop it, or let it do the work (it picks up new rollouts and jobs from the database)")
        try:
            self.db = FleetDB(self.state_dir, create=False)
            self.db.execute("DELETE FROM seen WHERE at < ?", (self.clock() - 30 * 86400,))
            self.registry = Registry(self.db)
            self._rollout_ctl = RolloutController(self.db, self.registry, self._send_install, self._send_rollback,
                                                  self.clock, isolate=self._isolated, deltas=self.deltas)
            self._job_ctl = JobController(self.db, self.registry, self._send_task, self.clock, isolate=self._isolated,
                                          stats=self.stats, max_packet=self._max_packet)
            will = (proto.fleet_topic(), proto.FleetStatus(online=False, session=self.session).to_payload(), 1, True)
            subs = [(proto.subscription("status"), 1), (proto.subscription("heartbeat"), 0),
                    (proto.subscription("up"), 1)]
            self.conn = self._factory(self.settings, self._on_message, subs, will=will, on_connected=self._on_connected)
            self.conn.start()
            self._stop.clear()
            self._engine = threading.Thread(target=self._run, name="edgesdk-fleet-engine", daemon=True)
            self._engine.start()
            if wait_connected and not self.conn.wait_connected(wait_connected):
                raise BrokerError(f"cannot connect to the MQTT broker at {self.settings.host}:{self.settings.port} "
                                  f"within {wait_connected:g} s: check --broker and that the broker runs")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._engine is not None:
            self._engine.join(30)
            self._engine = None
        if self.conn is not None:
            offline = (proto.fleet_topic(), proto.FleetStatus(online=False, session=self.session).to_payload(), 1, True)
            self.conn.stop(publish_before=offline)
            self.conn = None
        if self.db is not None:
            self.db.close()
            self.db = None
        self._lock.release()

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connected(self) -> None:
        status = proto.FleetStatus(online=True, session=self.session)
        try:
            self.conn.publish(proto.fleet_topic(), status.to_payload(), qos=1, retain=True)
        except BrokerError as exc:
            log.warning("could not publish the fleet's presence: %s", exc)
        self._resume.set()  # the engine resends installs in progress

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))  # paho's worker never waits on SQLite

    # --- the engine ---------------------------------------------------------------------------
    def _run(self) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            batch = []
            try:
                batch.append(self._inbox.get(timeout=self.tick_interval))
                while len(batch) < 1000:
                    batch.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            acks: dict[str, list[str]] = defaultdict(list)
            try:
                self.db.begin()
                for topic, payload in batch:
                    self.db.execute("SAVEPOINT message")
                    queued = len(self._outgoing)
                    try:
                        self._process(topic, payload, acks)
                    except sqlite3.OperationalError:
                        raise  # the database's fault, not the message's: the whole step is retried
                    except Exception:  # one bad message must not undo the batch, nor come back forever
                        log.exception("could not process a message on %s; dropped", topic)
                        self.stats["failed_messages"] += 1
                        self.db.execute("ROLLBACK TO message")
                        del self._outgoing[queued:]
                        self._acknowledge_dropped(topic, payload, acks)
                    self.db.execute("RELEASE message")
                if self._unsent_tasks:
                    self.db.executemany("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL "
                                        "WHERE id = ? AND state = 'LEASED'", [(t,) for t in self._unsent_tasks])
                    self._unsent_tasks.clear()
                connected = self.conn is not None and self.conn.connected.is_set()
                if connected and self._resume.is_set():
                    self._resume.clear()
                    self._rollout_ctl.resume()
                now = time.monotonic()
                if connected and (now - last_tick >= self.tick_interval or self._kick.is_set()):
                    self._kick.clear()
                    last_tick = now
                    self._rollout_ctl.tick()
                    self._job_ctl.tick()
                elif connected and batch:
                    self._job_ctl.dispatch()
                self.db.commit()
            except Exception:
                log.exception("fleet engine step failed; retrying")
                self.db.rollback()
                self._outgoing.clear()
                time.sleep(0.5)
                continue
            self._flush(acks)

    def _isolated(self, what: str, step: Callable[[], None], on_failure: Callable[[str], None]) -> bool:
        """Run one job's or one rollout's step in its own SAVEPOINT (see :data:`fleet.state.Isolate`).

        When the step raises, its database changes and the messages it queued are undone and
        ``on_failure(reason)`` marks its job or rollout FAILED; the engine's transaction goes on.
        SQLite's own operational errors (disk full, I/O) are not the unit's fault: they propagate,
        and the engine retries the whole step."""
        self.db.execute("SAVEPOINT unit")
        queued = len(self._outgoing)
        try:
            step()
            return True
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            log.exception("%s could not be processed; it ends FAILED", what)
            self.db.execute("ROLLBACK TO unit")
            del self._outgoing[queued:]
            self.stats["isolated_failures"] += 1
            on_failure(f"the fleet could not process it: {type(exc).__name__}: {exc}"[:500])
            return False
        finally:
            self.db.execute("RELEASE unit")

    def _process(self, topic: str, payload: bytes, acks: dict[str, list[str]]) -> None:
        if topic == proto.fleet_topic():
            return
        try:
            device, msg = read_device_message(topic, payload)
        except SpoofedMessage as exc:
            # the topic is what the broker's ACL vouches for; a message speaking for another device is dropped
            log.warning("ignored %s", exc)
            self.stats["spoofed"] += 1
            return
        except ProtocolError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)
            self.stats["malformed"] += 1
            return
        now = self.clock()
        self.stats[msg.TYPE] += 1
        if isinstance(msg, proto.Status):
            if self.registry.on_status(msg, now):
                self._rollout_ctl.on_device_online(device)
            if not msg.online:
                self._job_ctl.on_device_offline(device)
        elif isinstance(msg, proto.Heartbeat):
            self.registry.on_heartbeat(msg, now)
        elif isinstance(msg, proto.ChunkRequest):
            # sent at once, not after the batch's commit: a chunk answers a read (the bundle, and
            # whether a rollout is sending it there), changes nothing, and must not wait for an fsync
            for chunk in self._chunks_for(msg):
                if self.conn is not None and self._publish(proto.topic(device, "chunk"), chunk, 1):
                    self.stats["chunks_sent"] += 1
        elif isinstance(msg, proto.WorkRequest):
            self._job_ctl.on_work_request(msg)
        elif isinstance(msg, (proto.InstallStatus, proto.TaskResult, proto.Result)):
            if self.db.first_sight(msg.id, now):
                if isinstance(msg, proto.InstallStatus):
                    self.registry.on_install_status(msg, now)
                    self._rollout_ctl.on_install_status(msg)
                    if msg.state in ("SUCCEEDED", "FAILED", "ROLLED_BACK"):
                        self._kick.set()  # the stage may be over: start the next devices, or finish, now
                    if msg.fallback:
                        self.stats["delta_fallbacks"] += 1
                    elif msg.state == "SUCCEEDED" and msg.via == "delta":
                        self.stats["delta_installs"] += 1
                elif isinstance(msg, proto.TaskResult):
                    self._job_ctl.on_result(msg)
                else:
                    self.db.execute("INSERT OR IGNORE INTO results (id, device, model, version, key, outputs, meta, ts) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (msg.id, msg.device, msg.model, msg.version,
                                                                        msg.key, dumps(msg.outputs), dumps(msg.meta), msg.ts))
            else:
                self.stats["duplicates"] += 1
            acks[device].append(msg.id)  # acknowledge re-deliveries too: the agent may not have seen our ack

    @staticmethod
    def _acknowledge_dropped(topic: str, payload: bytes, acks: dict[str, list[str]]) -> None:
        """Acknowledge a durable message whose processing failed, so its agent stops re-sending a
        message that would fail the same way every time (it is logged and counted as dropped)."""
        try:
            device, msg = read_device_message(topic, payload)
        except ProtocolError:
            return
        if isinstance(msg, (proto.InstallStatus, proto.TaskResult, proto.Result)):
            acks[device].append(msg.id)

    def _chunks_for(self, req: proto.ChunkRequest) -> list[bytes]:
        """The chunks to answer ``req`` with: none unless a running rollout is sending that
        bundle to that device (``req.device`` is the device of the topic)."""
        if not self._rollout_ctl.is_sending(req.device, req.bundle_sha256):
            log.warning("dropped a chunk request from %s for bundle %.12s: no running rollout is sending it that bundle",
                        req.device, str(req.bundle_sha256))
            self.stats["rejected_chunk_requests"] += 1
            return []
        try:
            return self.chunks.requested(req.bundle_sha256, req.indices)
        except (OSError, ProtocolError) as exc:
            log.warning("%s asked for chunks of bundle %.12s, which the store cannot give: %s", req.device,
                        str(req.bundle_sha256), exc)
            self.stats["rejected_chunk_requests"] += 1
            return []

    def _flush(self, acks: Mapping[str, list[str]]) -> None:
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
            if task_id is None and topic.endswith("/chunk"):
                self.stats["chunks_sent"] += 1

    def _publish(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        try:
            self.conn.publish(topic, payload, qos=qos)
            return True
        except BrokerError as exc:
            log.warning("could not send on %s: %s", topic, exc)
            return False

    # seams the controllers call (inside the engine's transaction: queued until the commit)
    def _send_install(self, device: str, cmd: proto.InstallCommand) -> None:
        self._outgoing.append((proto.topic(device, "cmd"), cmd.to_payload(), 1, None))

    def _send_rollback(self, device: str, cmd: proto.RollbackCommand) -> None:
        self._outgoing.append((proto.topic(device, "cmd"), cmd.to_payload(), 1, None))

    def _send_task(self, device: str, task_id: str, payload: bytes) -> None:
        self._outgoing.append((proto.topic(device, "task"), payload, 1, task_id))

    # --- registry -------------------------------------------------------------------------------
    def _db(self) -> FleetDB:
        """A short-lived connection for an API call (the schema exists since __init__)."""
        return FleetDB(self.state_dir, create=False)

    def devices(self, tags: Any = None) -> list[DeviceInfo]:
        """Known devices (optionally those whose tags match ``{"k": "v"}`` or ``"k=v,k=v"``)."""
        with self._db() as db:
            return Registry(db).list(parse_tags(tags))

    # --- rollouts -------------------------------------------------------------------------------
    def add_bundle(self, path: Union[str, os.PathLike]) -> tuple[str, dict[str, Any]]:
        """Check a bundle (intact, signed) and keep a copy in the fleet's state; returns (sha256, manifest)."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read bundle {p}: {exc.strerror or exc}") from exc
        bundle = Bundle(raw, source=str(p))
        bundle.check_integrity()
        if not bundle.signed:
            raise BundleError(f"{p} is not signed, and agents refuse unsigned bundles: "
                              "sign it with edgesdk bundle sign BUNDLE --key private.pem")
        sha = bundle.digest
        target = self.bundles.put(sha, raw)
        m = bundle.manifest
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO bundles (sha256, model, version, size, path, manifest, added) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (sha, m.name, m.version, len(raw), str(target), dumps(m.data),
                                                        self.clock()))
        return sha, dict(m.data)

    def deploy(self, bundle: Union[str, os.PathLike], *, to: Any = None, devices: Optional[Sequence[str]] = None,
               **options: Any) -> str:
        """Create a rollout of ``bundle`` to the devices whose tags match ``to`` or to ``devices``
        (see :class:`~fleet.rollout.RolloutOptions` for the options); returns its id."""
        if (to is None) == (devices is None):
            raise RolloutError("say which devices: --to TAG=VALUE or --devices ID,ID")
        opts = RolloutOptions(**options)
        opts.validate()
        sha, manifest = self.add_bundle(bundle)
        if self.running:  # split and framed here, not by the engine when the first device asks
            self.chunks.payloads(sha)
        with self._db() as db:
            registry = Registry(db)
            targets = list(dict.fromkeys(devices)) if devices is not None else [d.id for d in registry.list(parse_tags(to))]
            self.deltas.prepare(db, sha, manifest["name"], targets, self.clock())  # made here, not in the engine
            rid = rollout_mod.create_rollout(db, registry, bundle_sha256=sha, model=manifest["name"],
                                             version=manifest["version"], targets=targets, options=opts, now=self.clock())
        self._kick.set()  # committed: a running engine starts it at once instead of at its next tick
        self._inbox.put((proto.fleet_topic(), b""))  # wakes the engine (messages on that topic are skipped)
        return rid

    def rollout(self, rollout_id: str) -> RolloutView:
        with self._db() as db:
            return rollout_mod.view(db, rollout_id)

    def rollouts(self) -> list[RolloutView]:
        with self._db() as db:
            return rollout_mod.list_rollouts(db)

    def cancel(self, rollout_id: str) -> None:
        """Stop starting devices (those installing finish; none is rolled back)."""
        self._request(rollout_id, "cancel")

    def rollback(self, rollout_id: str) -> None:
        """Cancel what is queued and roll every device that took the version back to its previous one."""
        self._request(rollout_id, "rollback")

    def _request(self, rollout_id: str, action: str) -> None:
        with self._db() as db:
            rollout_mod.request(db, rollout_id, action)

    def wait_rollout(self, rollout_id: str, *, timeout: Optional[float] = None,
                     on_progress: Optional[Callable[[RolloutView], None]] = None, poll: float = 0.2) -> RolloutView:
        """Wait until the rollout has finished (SUCCEEDED, ABORTED, CANCELED, ROLLED_BACK)."""
        return self._wait(lambda: self.rollout(rollout_id), timeout, on_progress, poll, f"rollout {rollout_id}")

    # --- jobs -------------------------------------------------------------------------------------
    def submit(self, model: str, inputs: Inputs, *, to: Any = None, batch_size: int = 64, lease_s: float = 60.0,
               max_attempts: int = 5, output: Optional[Union[str, os.PathLike]] = None, fmt: str = "npz") -> str:
        """Create a batch job: ``inputs`` is a path (``.npz``/``.npy``/image folder) or arrays."""
        arrays = self._load_inputs(model, inputs)
        opts = JobOptions(batch_size=batch_size, lease_s=lease_s, max_attempts=max_attempts, selector=parse_tags(to))
        with self._db() as db:
            return jobs_mod.create_job(db, model, arrays, opts, now=self.clock(), output=str(output) if output else None,
                                       fmt=fmt, max_packet=self._max_packet(), manifest=self._manifest_of(model))

    def _max_packet(self) -> int:
        """The broker's packet limit as the fleet knows it: its own setting, lowered by what the
        broker announced at connect (MQTT 5's Maximum Packet Size)."""
        return self.conn.max_packet if self.conn is not None else self.settings.max_packet_size

    def _manifest_of(self, model: str) -> Optional[dict[str, Any]]:
        """The manifest of the newest bundle of ``model`` this fleet holds (None: none): how the
        job's inputs are encoded (a device running another version re-scales them itself)."""
        import json

        with self._db() as db:
            row = db.one("SELECT manifest FROM bundles WHERE model = ? ORDER BY added DESC LIMIT 1", (model,))
        return None if row is None else json.loads(row["manifest"])

    def job(self, job_id: str) -> JobSummary:
        with self._db() as db:
            return jobs_mod.summary(db, job_id)

    def jobs_list(self) -> list[JobSummary]:
        with self._db() as db:
            return jobs_mod.list_jobs(db)

    def outputs(self, job_id: str) -> list[np.ndarray]:
        with self._db() as db:
            return jobs_mod.collect_outputs(db, job_id)

    def task_log(self, job_id: str) -> list[dict[str, Any]]:
        """Every finished task of a job: device, samples, elapsed_s (on the device), done_at (here)."""
        with self._db() as db:
            return [dict(r) for r in db.all("SELECT idx, device, stop - start AS samples, elapsed_s, done_at FROM tasks "
                                            "WHERE job = ? AND state = 'DONE' ORDER BY done_at", (job_id,))]

    def wait_job(self, job_id: str, *, timeout: Optional[float] = None,
                 on_progress: Optional[Callable[[JobSummary], None]] = None, poll: float = 0.2) -> JobSummary:
        return self._wait(lambda: self.job(job_id), timeout, on_progress, poll, f"job {job_id}")

    def run(self, model: str, inputs: Inputs, *, timeout: Optional[float] = None,
            on_progress: Optional[Callable[[JobSummary], None]] = None, **options: Any) -> JobSummary:
        """Submit a job, wait for it, and return its summary with ``outputs`` (input order)."""
        job_id = self.submit(model, inputs, **options)
        return self.finish_job(job_id, timeout=timeout, on_progress=on_progress)

    def finish_job(self, job_id: str, *, timeout: Optional[float] = None,
                   on_progress: Optional[Callable[[JobSummary], None]] = None) -> JobSummary:
        """Wait for a job (a resumed one too); its summary with outputs, or JobError when it failed."""
        result = self.wait_job(job_id, timeout=timeout, on_progress=on_progress)
        if result.state != "SUCCEEDED":
            raise JobError(f"job {job_id} {result.state}: {result.reason}")
        result.outputs = self.outputs(job_id)
        return result

    def _load_inputs(self, model: str, inputs: Inputs) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            return [inputs]
        if isinstance(inputs, (list, tuple)):
            return [np.asarray(x) for x in inputs]
        from sdk.dataset import InputSpec, load_dataset

        with self._db() as db:
            row = db.one("SELECT manifest FROM bundles WHERE model = ? ORDER BY added DESC LIMIT 1", (model,))
        path = Path(inputs)
        if row is None:
            if path.is_dir():
                raise JobError(f"no bundle of {model!r} is known to this fleet, so image sizes are unknown: "
                               "deploy it first (edgesdk fleet deploy) or pass a .npz/.npy")
            return load_dataset(path, None, what="job input").xs
        import json

        manifest = json.loads(row["manifest"])
        # by signature name (a .npz may hold one array per input name), in the model's own input order;
        # integer/boolean inputs that are not quantized (token ids, masks) keep their dtype
        # an input with a uint8 normalisation takes image folders as uint8 pixels (1 byte a value on the wire)
        specs = [InputSpec(str(t.get("key") or t.get("name", f"x{i}")), tuple(int(d) for d in t["shape"]),
                           "float32" if t.get("scale") or np.dtype(str(t["dtype"])).kind == "f" else str(t["dtype"]),
                           pixels=t.get("normalization") is not None)
                 for i, t in enumerate(manifest["inputs"])]
        vr = tuple(manifest["inputs"][0].get("value_range", (0.0, 1.0)))
        return load_dataset(path, specs, what="job input", value_range=vr).xs  # type: ignore[arg-type]

    def _wait(self, get: Callable[[], Any], timeout: Optional[float], on_progress: Optional[Callable[[Any], None]],
              poll: float, what: str) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = get()
            if on_progress:
                on_progress(current)
            if current.done:
                return current
            if not self.running and not self._lock_is_held_elsewhere():
                raise FleetError(f"{what} is not finished and no fleet process is running: start one "
                                 "(edgesdk fleet serve) or resume it")
            if deadline is not None and time.monotonic() > deadline:
                raise FleetError(f"{what} did not finish within {timeout:g} s (state {current.state})")
            time.sleep(poll)

    def _lock_is_held_elsewhere(self) -> bool:
        probe = _ControllerLock(self._lock.path)
        if probe.acquire():
            probe.release()
            return False
        return True

    def refresh_registry(self, seconds: float = 1.5) -> None:
        """Without a running controller: read the retained presence of every device for a moment
        (``edgesdk fleet devices`` uses this so its listing is current)."""
        if not self._lock.acquire():
            return  # a controller runs and keeps the registry current
        received: "queue.Queue[tuple[str, bytes]]" = queue.Queue()
        settings = dataclasses.replace(self.settings, client_id="", persistent_session=False)
        conn = self._factory(settings, lambda t, p: received.put((t, p)), [(proto.subscription("status"), 1)])
        try:
            conn.start()
            if not conn.wait_connected(10):
                raise BrokerError(f"cannot connect to the MQTT broker at {settings.host}:{settings.port}")
            time.sleep(seconds)
            with self._db() as db:
                registry = Registry(db)
                while not received.empty():
                    topic, payload = received.get()
                    try:
                        _, msg = read_device_message(topic, payload)
                    except ProtocolError as exc:  # malformed, or speaking for another device than its topic's
                        log.warning("ignored a status on %s: %s", topic, exc)
                        continue
                    if isinstance(msg, proto.Status):
                        registry.on_status(msg, self.clock())
        finally:
            conn.stop()
            self._lock.release()
