"""``Fleet``: the fleet's Python API, and the controller that does its work while it leads.

Python use::

    from fleet import Fleet

    with Fleet("~/.local/share/edgesdk/fleet", "mqtt://broker:1883") as fleet:        # SQLite
        print([d.id for d in fleet.devices() if d.online])
        rid = fleet.deploy("digits-2.edgebundle", to={"site": "berlin"}, canary=1, max_latency_regression=1.5)
        print(fleet.wait_rollout(rid).state)
        job = fleet.run("digits", "frames.npz", batch_size=64)   # JobSummary with .outputs
        print(job.samples_per_s, job.efficiency)

    Fleet(broker="mqtt://broker:1883", db="postgresql://fleet@db/fleet").start(standby=True)  # HA

A ``Fleet`` object is two things:

* the **API facade**: every method below reads and writes the fleet's storage
  (:mod:`fleet.storage`) through short-lived connections, so it works in any process that
  reaches the storage, whether or not a controller runs there; requests (deploy, run, cancel,
  rollback) are rows the leading controller picks up;
* once started, a **controller**: it stands for leadership (:mod:`fleet.leader`) and, while it
  leads, runs an :class:`~fleet.engine.Engine` (the one thread that writes and talks to
  devices). ``start()`` leads or fails at once; ``start(standby=True)`` (what ``edgesdk fleet
  serve`` does) waits for the lease, takes over when the leader dies, and stands by again if
  it loses the lease or its database connection.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from sdk.bundle import Bundle
from sdk.errors import BundleError, FleetError, JobError, RolloutError
from sdk.mqtt import MqttConnection, MqttSettings

from . import desired as desired_mod
from . import jobs as jobs_mod
from . import rollout as rollout_mod
from .bundlestore import BundleStore
from .chunks import ChunkCache
from .deltas import DeltaPlanner
from .engine import Engine
from .inputs import Inputs, load_job_inputs
from .jobs import JobOptions, JobSummary
from .leader import new_holder
from .registry import DeviceInfo, Registry, parse_tags, read_retained_statuses
from .rollout import RolloutOptions, RolloutView
from .storage import FleetDB, dumps, loads, open_storage, storage_url

log = logging.getLogger("edgesdk.fleet")

__all__ = ["Fleet"]


class Fleet:
    """The fleet: its API over the storage, and (once started) its controller.

    ``state_dir`` holds the SQLite database (unless ``db`` names another), the bundle and input
    files of the SQLite backend, and credentials; ``db`` is a PostgreSQL URL (or a SQLite path;
    default ``$EDGESDK_FLEET_DB``, else ``<state_dir>/fleet.sqlite``). ``clock`` is the time every
    controller step uses (tests pass a fake one to step over time-outs); ``lease_s`` is the
    controller lease's period with PostgreSQL (a standby takes over within it)."""

    def __init__(
        self,
        state_dir: Optional[Union[str, os.PathLike]] = None,
        broker: str = "mqtt://127.0.0.1:1883",
        *,
        db: Optional[str] = None,
        settings: Optional[MqttSettings] = None,
        name: str = "edgesdk-fleet",
        tick: float = 0.2,
        clock: Callable[[], float] = time.time,
        deltas: bool = True,
        lease_s: float = 10.0,
        **mqtt_options: Any,
    ) -> None:
        self.storage = open_storage(storage_url(db), state_dir)
        self.state_dir = Path(getattr(self.storage, "state_dir", None) or _state_dir(state_dir))
        self.settings = settings or MqttSettings.from_url(broker, client_id=name, extra="fleet", **mqtt_options)
        if not self.settings.client_id:
            self.settings.client_id = name
        self.tick_interval = tick
        self.clock = clock
        self.lease_s = lease_s
        self.bundles = BundleStore(self.storage.blobs)
        self.chunks = ChunkCache(self.bundles)
        #: delta updates (``deltas=False``: always send bundles whole)
        self.deltas = DeltaPlanner(self.bundles, enabled=deltas)
        self.leadership = self.storage.leadership(new_holder(), ttl=lease_s)
        # messages by kind, duplicates, chunks sent, what was dropped and why (benchmarks, tests, metrics)
        self.stats: defaultdict[str, int] = defaultdict(int)
        #: called after each committed engine transaction with (seconds, messages): metrics
        self.on_batch: Optional[Callable[[float, int], None]] = None
        self.engine: Optional[Engine] = None
        self._stop = threading.Event()
        self._controller: Optional[threading.Thread] = None
        self._seen_controller = time.monotonic()

    # --- the controller ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether this process's controller runs (leading or standing by)."""
        return self._controller is not None and self._controller.is_alive()

    @property
    def leading(self) -> bool:
        return self.engine is not None

    @property
    def conn(self) -> Optional[MqttConnection]:
        """The leading engine's broker connection (None while not leading)."""
        engine = self.engine
        return engine.conn if engine is not None else None

    def start(self, *, standby: bool = False, wait_connected: float = 15.0) -> "Fleet":
        """Start the controller. Without ``standby``: lead now (FleetError when another
        controller leads, BrokerError when the broker does not answer within ``wait_connected``
        seconds). With ``standby``: return at once and lead whenever the lease is free."""
        if self.running:
            return self
        self._stop.clear()
        engine = None
        if not standby:
            if not self.leadership.acquire():
                raise FleetError(f"another fleet controller ({self.leadership.holder()}) leads {self.storage.describe()}: "
                                 "stop it, or let it do the work (it picks up new rollouts and jobs from the database)")
            try:
                engine = self._new_engine().open(wait_connected=wait_connected)
            except BaseException:
                if engine is not None:
                    engine.close()
                self.engine = None
                self.leadership.release()
                raise
        self._controller = threading.Thread(target=self._control, args=(engine,), name="edgesdk-fleet-controller",
                                            daemon=True)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop the controller (a leader says offline and gives its lease up)."""
        self._stop.set()
        if self._controller is not None:
            self._controller.join(30)
            self._controller = None

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _new_engine(self) -> Engine:
        self.engine = Engine(self.storage, self.leadership, self.settings, bundles=self.bundles, chunks=self.chunks,
                             deltas=self.deltas, stats=self.stats, tick=self.tick_interval, clock=self.clock,
                             on_batch=lambda s, n: self.on_batch(s, n) if self.on_batch else None)
        return self.engine

    def _control(self, engine: Optional[Engine]) -> None:
        """Lead while the lease is ours; stand by (polling for the lease) otherwise, until stopped."""
        poll = min(1.0, self.lease_s / 4)
        while not self._stop.is_set():
            if engine is None:
                engine = self._take_over()
                if engine is None:
                    self._stop.wait(poll)
                    continue
            try:
                why = engine.run(self._stop)
            except Exception:  # never leave the lease held by a dead engine
                log.exception("the fleet engine failed")
                why = "the engine failed"
            finally:
                engine.close()
                self.engine = None
            if why:
                log.warning("fleet controller stood down: %s", why)
            self.leadership.release()
            engine = None

    def _take_over(self) -> Optional[Engine]:
        try:
            if not self.leadership.acquire():
                return None
        except Exception as exc:  # the database is unreachable for now: keep standing by
            log.warning("cannot stand for the fleet's lease: %s", exc)
            return None
        try:
            engine = self._new_engine().open(wait_connected=0)
        except Exception as exc:
            log.warning("took the fleet's lease but could not start: %s", exc)
            if self.engine is not None:
                self.engine.close()
            self.engine = None
            self.leadership.release()
            return None
        log.warning("this controller leads the fleet now (%s, epoch %s)", self.storage.describe(), self.leadership.epoch)
        return engine

    def controller_elsewhere(self) -> bool:
        """Whether another process's controller leads this storage now."""
        return self.leadership.held_elsewhere()

    # --- storage ----------------------------------------------------------------------------------
    def database(self) -> FleetDB:
        """A short-lived connection to the fleet's storage (use it as a context manager)."""
        return self.storage.connect()

    # --- registry ---------------------------------------------------------------------------------
    def devices(self, tags: Any = None) -> list[DeviceInfo]:
        """Known devices (optionally those whose tags match ``{"k": "v"}`` or ``"k=v,k=v"``), each
        with its desired configuration and where what it reports differs."""
        with self.database() as db:
            found = Registry(db).list(parse_tags(tags))
            all_entries = desired_mod.entries(db)
        for d in found:
            wanted = desired_mod.desired_for(all_entries, d.id, d.tags)
            d.desired, d.desired_revision = wanted.config, wanted.revision
            d.drift = desired_mod.drift(wanted.config, d.config)
            d.config_state = desired_mod.config_state(d)
        return found

    # --- desired state -----------------------------------------------------------------------------
    def set_config(self, *, device: Optional[str] = None, tag: Optional[str] = None, **settings: Any) -> int:
        """Desire ``settings`` (:data:`sdk.protocol.CONFIG_FIELDS`) for a device or for every device
        with a tag (``tag="site=berlin"``); returns the revision. The leading controller sends it."""
        with self.database() as db:
            revision = desired_mod.set_config(db, device=device, tag=tag, settings=settings, now=self.clock())
        if self.engine is not None:
            self.engine.wake()
        return revision

    def unset_config(self, *keys: str, device: Optional[str] = None, tag: Optional[str] = None) -> int:
        """Stop desiring ``keys`` (``threads``, ``tags.site``, ``models.digits``; none: all of it)."""
        with self.database() as db:
            revision = desired_mod.unset_config(db, device=device, tag=tag, keys=keys, now=self.clock())
        if self.engine is not None:
            self.engine.wake()
        return revision

    def configs(self) -> list[desired_mod.ConfigEntry]:
        """Every desired-configuration entry, per tag and per device."""
        with self.database() as db:
            return desired_mod.entries(db)

    def refresh_registry(self, seconds: float = 1.5) -> None:
        """Without a controller leading: read the retained presence of every device for a moment
        (``edgesdk fleet devices`` uses this so its listing is current)."""
        if self.leading or self.controller_elsewhere():
            return  # a controller keeps the registry current
        statuses = read_retained_statuses(self.settings, seconds)
        with self.database() as db, db.transaction():
            registry = Registry(db)
            for status in statuses:
                registry.on_status(status, self.clock())

    # --- rollouts ---------------------------------------------------------------------------------
    def add_bundle(self, path: Union[str, os.PathLike]) -> tuple[str, dict[str, Any]]:
        """Check a bundle (intact, signed) and keep it in the fleet's storage; returns (sha256, manifest)."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read bundle {p}: {exc.strerror or exc}") from exc
        return self.add_bundle_bytes(raw, source=str(p))

    def add_bundle_bytes(self, raw: bytes, *, source: str = "upload") -> tuple[str, dict[str, Any]]:
        """:meth:`add_bundle` for bundle bytes (an upload)."""
        bundle = Bundle(raw, source=source)
        bundle.check_integrity()
        if not bundle.signed:
            raise BundleError(f"{source} is not signed, and agents refuse unsigned bundles: "
                              "sign it with edgesdk bundle sign BUNDLE --key private.pem")
        sha = bundle.digest
        m = bundle.manifest
        with self.database() as db, db.transaction():
            self.bundles.put(sha, raw, db)
            db.execute("INSERT INTO bundles (sha256, model, version, size, path, manifest, added) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                       (sha, m.name, m.version, len(raw), sha, dumps(m.data), self.clock()))
        return sha, dict(m.data)

    def deploy(self, bundle: Union[str, os.PathLike, bytes], *, to: Any = None, devices: Optional[Sequence[str]] = None,
               **options: Any) -> str:
        """Create a rollout of ``bundle`` (a path, or its bytes) to the devices whose tags match
        ``to`` or to ``devices`` (see :class:`~fleet.rollout.RolloutOptions` for the options);
        returns its id."""
        if (to is None) == (devices is None):
            raise RolloutError("say which devices: --to TAG=VALUE or --devices ID,ID")
        opts = RolloutOptions(**options)
        opts.validate()
        sha, manifest = self.add_bundle_bytes(bundle) if isinstance(bundle, bytes) else self.add_bundle(bundle)
        engine = self.engine
        if engine is not None:  # split and framed here, not by the engine when the first device asks
            self.chunks.payloads(sha)
        with self.database() as db:
            registry = Registry(db)
            targets = list(dict.fromkeys(devices)) if devices is not None else [d.id for d in registry.list(parse_tags(to))]
            with db.transaction():
                self.deltas.prepare(db, sha, manifest["name"], targets, self.clock())  # made here, not in the engine
            rid = rollout_mod.create_rollout(db, registry, bundle_sha256=sha, model=manifest["name"],
                                             version=manifest["version"], targets=targets, options=opts, now=self.clock())
        if engine is not None:
            engine.wake()  # committed: the engine starts it now instead of at its next tick
        return rid

    def rollout(self, rollout_id: str) -> RolloutView:
        with self.database() as db:
            return rollout_mod.view(db, rollout_id)

    def rollouts(self) -> list[RolloutView]:
        with self.database() as db:
            return rollout_mod.list_rollouts(db)

    def cancel(self, rollout_id: str) -> None:
        """Stop starting devices (those installing finish; none is rolled back)."""
        self._request(rollout_id, "cancel")

    def rollback(self, rollout_id: str) -> None:
        """Cancel what is queued and roll every device that took the version back to its previous one."""
        self._request(rollout_id, "rollback")

    def _request(self, rollout_id: str, action: str) -> None:
        with self.database() as db:
            rollout_mod.request(db, rollout_id, action)
        if self.engine is not None:
            self.engine.wake()

    def wait_rollout(self, rollout_id: str, *, timeout: Optional[float] = None,
                     on_progress: Optional[Callable[[RolloutView], None]] = None, poll: float = 0.2) -> RolloutView:
        """Wait until the rollout has finished (SUCCEEDED, ABORTED, CANCELED, ROLLED_BACK, FAILED)."""
        return self._wait(lambda: self.rollout(rollout_id), timeout, on_progress, poll, f"rollout {rollout_id}")

    # --- jobs -------------------------------------------------------------------------------------
    def submit(self, model: str, inputs: Inputs, *, to: Any = None, batch_size: int = 64, lease_s: float = 60.0,
               max_attempts: int = 5, output: Optional[Union[str, os.PathLike]] = None, fmt: str = "npz") -> str:
        """Create a batch job: ``inputs`` is a path (``.npz``/``.npy``/image folder) or arrays.
        ``output``: the file :meth:`finish_job` writes the results to."""
        manifest = self._manifest_of(model)
        arrays = load_job_inputs(model, inputs, manifest)
        opts = JobOptions(batch_size=batch_size, lease_s=lease_s, max_attempts=max_attempts, selector=parse_tags(to))
        with self.database() as db:
            job_id = jobs_mod.create_job(db, self.storage.blobs, model, arrays, opts, now=self.clock(),
                                         output=str(output) if output else None, fmt=fmt,
                                         max_packet=self._max_packet(), manifest=manifest)
        if self.engine is not None:
            self.engine.wake()
        return job_id

    def _max_packet(self) -> int:
        engine = self.engine
        return engine.max_packet() if engine is not None else self.settings.max_packet_size

    def _manifest_of(self, model: str) -> Optional[dict[str, Any]]:
        """The manifest of the newest bundle of ``model`` this fleet holds (None: none): how the
        job's inputs are encoded (a device running another version re-scales them itself)."""
        with self.database() as db:
            row = db.one("SELECT manifest FROM bundles WHERE model = ? ORDER BY added DESC LIMIT 1", (model,))
        return None if row is None else loads(row["manifest"])

    def job(self, job_id: str) -> JobSummary:
        with self.database() as db:
            return jobs_mod.summary(db, job_id)

    def jobs_list(self) -> list[JobSummary]:
        with self.database() as db:
            return jobs_mod.list_jobs(db)

    def outputs(self, job_id: str) -> list[np.ndarray]:
        with self.database() as db:
            return jobs_mod.collect_outputs(db, job_id)

    def write_outputs(self, job_id: str, path: Union[str, os.PathLike], fmt: str = "npz") -> Path:
        """Write a finished job's results to ``path`` (``.npz`` or JSON lines), in input order."""
        with self.database() as db:
            outputs = jobs_mod.collect_outputs(db, job_id)
            names = jobs_mod.output_names(db, job_id)
        try:
            return jobs_mod.write_results(outputs, Path(path), fmt, names)
        except OSError as exc:
            raise JobError(f"cannot write the results of job {job_id} to {path}: {exc.strerror or exc}") from exc

    def task_log(self, job_id: str) -> list[dict[str, Any]]:
        """Every finished task of a job: device, samples, elapsed_s (on the device), done_at (here)."""
        with self.database() as db:
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
        """Wait for a job (a resumed one too); its summary with outputs, or JobError when it
        failed. A job submitted with ``output`` has its results written there, by this process
        (the controller may run on another machine)."""
        result = self.wait_job(job_id, timeout=timeout, on_progress=on_progress)
        if result.state != "SUCCEEDED":
            raise JobError(f"job {job_id} {result.state}: {result.reason}")
        result.outputs = self.outputs(job_id)
        if result.output:
            with self.database() as db:
                fmt = db.scalar("SELECT format FROM jobs WHERE id = ?", (job_id,)) or "npz"
            self.write_outputs(job_id, result.output, fmt)
        return result

    def _wait(self, get: Callable[[], Any], timeout: Optional[float], on_progress: Optional[Callable[[Any], None]],
              poll: float, what: str) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._seen_controller = time.monotonic()
        while True:
            current = get()
            if on_progress:
                on_progress(current)
            if current.done:
                return current
            self._check_controller(what, current.state)
            if deadline is not None and time.monotonic() > deadline:
                raise FleetError(f"{what} did not finish within {timeout:g} s (state {current.state})")
            time.sleep(poll)

    def _check_controller(self, what: str, state: str) -> None:
        """FleetError when no controller has led for a while: nobody will finish ``what``. A
        standby polls for the lease every second at most, and a lease lapses before a standby
        can take it, so a lease-led fleet is given two lease periods, a lock-led one 3 s."""
        if self.running or self.controller_elsewhere():
            self._seen_controller = time.monotonic()
            return
        grace = 2 * self.lease_s + 1 if self.storage.kind == "postgresql" else 3.0
        if time.monotonic() - self._seen_controller > grace:
            raise FleetError(f"{what} is not finished ({state}) and no fleet controller is running: start one "
                             "(edgesdk fleet serve) or resume it")


def _state_dir(state_dir: Optional[Union[str, os.PathLike]]) -> Path:
    from .storage import default_state_dir

    return Path(os.path.expanduser(str(state_dir))) if state_dir else default_state_dir()
