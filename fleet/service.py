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
caused (tasks, install and rollback commands); so whatever the fleet acknowledged is on disk,
and a fleet killed at any moment resumes from its database (``Fleet.start`` picks up every
running rollout and job).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import queue
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
from .chunks import ChunkCache
from .jobs import JobController, JobOptions, JobSummary
from .registry import DeviceInfo, Registry, parse_tags
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
        self.conn: Optional[MqttConnection] = None
        self.session = uuid.uuid4().hex
        self.db: Optional[FleetDB] = None
        self.chunks = ChunkCache(self._bundle_path)
        self.stats = defaultdict(int)  # messages by kind, duplicates, chunks sent (benchmarks, tests)
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
            self.rollouts = RolloutController(self.db, self.registry, self._send_install, self._send_rollback, self.clock)
            self.jobs = JobController(self.db, self.registry, self._send_task, self.clock)
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
                    except Exception:  # one bad message must not undo the batch (not acked: the agent keeps it)
                        log.exception("could not process a message on %s", topic)
                        self.stats["failed_messages"] += 1
                        self.db.execute("ROLLBACK TO message")
                        del self._outgoing[queued:]
                    self.db.execute("RELEASE message")
                if self._unsent_tasks:
                    self.db.executemany("UPDATE tasks SET state = 'PENDING', device = NULL, lease_until = NULL "
                                        "WHERE id = ? AND state = 'LEASED'", [(t,) for t in self._unsent_tasks])
                    self._unsent_tasks.clear()
                connected = self.conn is not None and self.conn.connected.is_set()
                if connected and self._resume.is_set():
                    self._resume.clear()
                    self.rollouts.resume()
                now = time.monotonic()
                if connected and now - last_tick >= self.tick_interval:
                    last_tick = now
                    self.rollouts.tick()
                    self.jobs.tick()
                elif connected and batch:
                    self.jobs.dispatch()
                self.db.commit()
            except Exception:
                log.exception("fleet engine step failed; retrying")
                self.db.rollback()
                self._outgoing.clear()
                time.sleep(0.5)
                continue
            self._flush(acks)

    def _process(self, topic: str, payload: bytes, acks: dict[str, list[str]]) -> None:
        if topic == proto.fleet_topic():
            return
        try:
            device, channel = proto.parse_topic(topic)
            msg = proto.decode(payload)
        except ProtocolError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)
            self.stats["malformed"] += 1
            return
        now = self.clock()
        self.stats[msg.TYPE] += 1
        if getattr(msg, "device", device) != device:
            # the topic is what the broker's ACL vouches for; a message speaking for another device is dropped
            log.warning("ignored a %s on %s that claims to come from %r", msg.TYPE, topic, getattr(msg, "device", ""))
            self.stats["spoofed"] += 1
            return
        if isinstance(msg, proto.Status):
            if self.registry.on_status(msg, now):
                self.rollouts.on_device_online(device)
            if not msg.online:
                self.jobs.on_device_offline(device)
        elif isinstance(msg, proto.Heartbeat):
            self.registry.on_heartbeat(msg, now)
        elif isinstance(msg, proto.ChunkRequest):
            for chunk in self._chunks_for(msg):
                self._outgoing.append((proto.topic(device, "chunk"), chunk, 1, None))
        elif isinstance(msg, proto.WorkRequest):
            self.jobs.on_work_request(msg)
        elif isinstance(msg, (proto.InstallStatus, proto.TaskResult, proto.Result)):
            if self.db.first_sight(msg.id, now):
                if isinstance(msg, proto.InstallStatus):
                    self.rollouts.on_install_status(msg)
                elif isinstance(msg, proto.TaskResult):
                    self.jobs.on_result(msg)
                else:
                    self.db.execute("INSERT OR IGNORE INTO results (id, device, model, version, key, outputs, meta, ts) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (msg.id, msg.device, msg.model, msg.version,
                                                                        msg.key, dumps(msg.outputs), dumps(msg.meta), msg.ts))
            else:
                self.stats["duplicates"] += 1
            acks[device].append(msg.id)  # acknowledge re-deliveries too: the agent may not have seen our ack

    def _chunks_for(self, req: proto.ChunkRequest) -> list[bytes]:
        try:
            return self.chunks.requested(req.bundle_sha256, req.indices)
        except (OSError, KeyError) as exc:
            log.warning("%s asked for chunks of an unknown bundle %s: %s", req.device, req.bundle_sha256[:12], exc)
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

    def _bundle_path(self, sha256: str) -> Path:
        return self.state_dir / "bundles" / f"{sha256}.edgebundle"

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
        target = self._bundle_path(sha)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(raw)
            tmp.replace(target)
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
        with self._db() as db:
            registry = Registry(db)
            targets = list(dict.fromkeys(devices)) if devices is not None else [d.id for d in registry.list(parse_tags(to))]
            return rollout_mod.create_rollout(db, registry, bundle_sha256=sha, model=manifest["name"],
                                              version=manifest["version"], targets=targets, options=opts, now=self.clock())

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
        max_packet = self.conn.max_packet if self.conn is not None else self.settings.max_packet_size
        with self._db() as db:
            return jobs_mod.create_job(db, model, arrays, opts, now=self.clock(), output=str(output) if output else None,
                                       fmt=fmt, max_packet=max_packet)

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
        specs = [InputSpec(str(t.get("name", f"x{i}")), tuple(int(d) for d in t["shape"]), "float32")
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
                    try:
                        msg = proto.decode(received.get()[1])
                    except ProtocolError:
                        continue
                    if isinstance(msg, proto.Status):
                        registry.on_status(msg, self.clock())
        finally:
            conn.stop()
            self._lock.release()
