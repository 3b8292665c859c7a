"""Staged rollouts with abort thresholds, latency-regression checks and automatic rollback.

After AWS IoT Jobs and Mender. A rollout sends one bundle to its target devices in stages:

* stage 0: ``canary`` devices (online ones first), then batches of ``batch_percent`` % of the
  remaining targets; a stage opens when every device of the stages before it has finished
  (a device offline when its turn comes does not hold the others up: it gets the bundle when it
  comes back, until the rollout ends);
* at most ``max_per_minute`` devices start per minute;
* each device goes QUEUED → IN_PROGRESS → SUCCEEDED | FAILED | TIMED_OUT (no outcome within
  ``timeout`` s), and CANCELED or ROLLED_BACK later, always with the agent's reason;
* a device whose p50 on the new version exceeds ``max_latency_regression`` × its p50 on the
  version it replaced (the agent measures both, interleaved, during the install) counts as
  FAILED and is rolled back;
* once ``min_executed`` devices have finished, a failure percentage above
  ``max_failure_percent`` aborts the rollout: queued devices are canceled and every device that
  took the new version is rolled back to its previous one (ABORTING → ABORTED).

Rollout states: RUNNING, SUCCEEDED, ABORTING, ABORTED, CANCELED, ROLLING_BACK, ROLLED_BACK,
and FAILED: the fleet could not process the rollout (an unreadable row, a bundle missing from
its store); its reason says what went wrong, its queued devices are canceled, and the fleet
leaves it alone from then on, so one broken rollout never holds up the others.
``cancel`` stops starting devices (those already installing finish); ``rollback`` also rolls
back every device that took the version. Both are requests written to the database, so any
process may make them and the controller acts on them.

Everything is in the fleet database: :class:`RolloutController` keeps no state of its own.
Each rollout's step runs isolated (see :data:`fleet.storage.Isolate`).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from sdk import protocol as proto
from sdk.errors import NotFoundError, RolloutError

from .deltas import DeltaPlanner
from .registry import Registry
from .storage import FleetDB, Isolate, dumps, loads

log = logging.getLogger("edgesdk.fleet.rollout")

__all__ = ["RolloutOptions", "RolloutController", "RolloutView", "create_rollout", "is_sending", "DEVICE_STATES",
           "FINISHED"]

DEVICE_STATES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "ROLLED_BACK", "CANCELED")
EXECUTED = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ROLLED_BACK")
FINISHED = ("SUCCEEDED", "ABORTED", "CANCELED", "ROLLED_BACK", "FAILED")
ACTIVE = ("RUNNING", "ABORTING", "ROLLING_BACK")


@dataclass
class RolloutOptions:
    canary: int = 1
    batch_percent: float = 50.0
    max_per_minute: int = 60
    timeout: float = 600.0
    max_failure_percent: float = 10.0
    min_executed: int = 1
    max_latency_regression: Optional[float] = None

    def validate(self) -> None:
        if self.canary < 0:
            raise RolloutError("--canary must be 0 or more")
        if not 0 < self.batch_percent <= 100:
            raise RolloutError("--batch-percent must be in (0, 100]")
        if self.max_per_minute < 1:
            raise RolloutError("--max-per-minute must be at least 1")
        if self.timeout <= 0:
            raise RolloutError("--timeout must be positive (seconds)")
        if not 0 <= self.max_failure_percent <= 100:
            raise RolloutError("--max-failure-percent must be in [0, 100]")
        if self.min_executed < 1:
            raise RolloutError("--min-executed must be at least 1")
        if self.max_latency_regression is not None and self.max_latency_regression < 1:
            raise RolloutError("--max-latency-regression is a ratio, at least 1 (1.5 = 50 % slower)")


@dataclass
class RolloutView:
    """What ``edgesdk fleet rollout ID`` shows."""

    id: str
    model: str
    version: str
    state: str
    reason: str
    options: dict[str, Any]
    created: float
    finished: Optional[float]
    counts: dict[str, int]
    devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_stages(count: int, canary: int, batch_percent: float) -> list[int]:
    """Stage number for each of ``count`` targets in order: canaries, then batches of P % of the rest."""
    canary = min(canary, count)
    stages = [0] * canary
    rest = count - canary
    size = max(1, math.ceil(rest * batch_percent / 100.0))
    for i in range(rest):
        stages.append(1 + i // size)
    return stages


def create_rollout(db: FleetDB, registry: Registry, *, bundle_sha256: str, model: str, version: str,
                   targets: Sequence[str], options: RolloutOptions, now: float) -> str:
    """Insert a rollout (state RUNNING) and its devices (QUEUED); the controller takes it from there."""
    options.validate()
    if not targets:
        raise RolloutError("no target devices: check --to / --devices against `edgesdk fleet devices`")
    up = registry.online_ids()
    ordered = [d for d in targets if d in up] + [d for d in targets if d not in up]  # canaries from the online devices
    rid = uuid.uuid4().hex[:12]
    db.begin()
    try:
        db.execute("INSERT INTO rollouts (id, model, version, bundle_sha256, state, options, created, updated) "
                   "VALUES (?, ?, ?, ?, 'RUNNING', ?, ?, ?)",
                   (rid, model, version, bundle_sha256, dumps(asdict(options)), now, now))
        db.executemany(
            "INSERT INTO rollout_devices (rollout, device, stage, position, state, updated) VALUES (?, ?, ?, ?, 'QUEUED', ?)",
            [(rid, d, s, i, now) for i, (d, s) in enumerate(zip(ordered, plan_stages(len(ordered), options.canary,
                                                                                    options.batch_percent)))],
        )
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return rid


def view(db: FleetDB, rollout_id: str, *, devices: bool = True) -> RolloutView:
    row = db.one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}: list them with edgesdk fleet rollouts")
    counts = {s: 0 for s in DEVICE_STATES}
    for r in db.all("SELECT state, COUNT(*) AS n FROM rollout_devices WHERE rollout = ? GROUP BY state", (rollout_id,)):
        counts[r["state"]] = r["n"]
    rows = db.all("SELECT device, stage, state, reason, previous_version, p50_ms, previous_p50_ms, started, updated "
                  "FROM rollout_devices WHERE rollout = ? ORDER BY position", (rollout_id,)) if devices else []
    return RolloutView(row["id"], row["model"], row["version"], row["state"], row["reason"],
                       _shown_options(row["options"]), row["created"], row["finished"], counts, [dict(r) for r in rows])


def _shown_options(text: str) -> dict[str, Any]:
    """The options as stored, for display: an unreadable row must not make the listing fail."""
    try:
        options = loads(text)
    except ValueError:
        return {"unreadable": str(text)[:80]}
    return options if isinstance(options, dict) else {"unreadable": str(text)[:80]}


def is_sending(db: FleetDB, device: str, bundle_sha256: str) -> bool:
    """Whether a RUNNING rollout is sending bundle ``bundle_sha256`` (or a delta that rebuilds it)
    to ``device`` now (the device is IN_PROGRESS): the only case in which the fleet answers that
    device's chunk requests."""
    return db.one("SELECT 1 FROM rollouts r JOIN rollout_devices d ON d.rollout = r.id WHERE (r.bundle_sha256 = ? "
                  "OR r.bundle_sha256 IN (SELECT target FROM deltas WHERE sha256 = ? AND size < full_size)) "
                  "AND r.state = 'RUNNING' AND d.device = ? AND d.state = 'IN_PROGRESS' LIMIT 1",
                  (bundle_sha256, bundle_sha256, device)) is not None


def list_rollouts(db: FleetDB) -> list[RolloutView]:
    return [view(db, r["id"], devices=False) for r in db.all("SELECT id FROM rollouts ORDER BY created DESC")]


def request(db: FleetDB, rollout_id: str, action: str) -> None:
    """Ask the controller to ``cancel`` or ``rollback`` a rollout."""
    row = db.one("SELECT state FROM rollouts WHERE id = ?", (rollout_id,))
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}: list them with edgesdk fleet rollouts")
    if row["state"] == "FAILED":
        raise RolloutError(f"rollout {rollout_id} FAILED (the fleet could not process it), and its devices stay as they "
                           "are: deploy the version you want them on as a new rollout")
    if action == "cancel" and row["state"] != "RUNNING":
        raise RolloutError(f"rollout {rollout_id} is {row['state']}: only a RUNNING rollout can be canceled")
    if action == "rollback" and row["state"] in ("ROLLED_BACK", "ROLLING_BACK", "ABORTING", "ABORTED"):
        raise RolloutError(f"rollout {rollout_id} is {row['state']}: its devices are already rolled back or rolling back")
    if action == "rollback" and row["state"] in ("SUCCEEDED", "CANCELED"):  # finished: the controller takes it up again
        db.execute("UPDATE rollouts SET state = 'ROLLING_BACK', reason = 'rollback requested', finished = NULL "
                   "WHERE id = ?", (rollout_id,))
        return
    db.execute("UPDATE rollouts SET request = ? WHERE id = ?", (action, rollout_id))


class RolloutController:
    """Drives every active rollout from the fleet database; called by the fleet's engine thread.

    ``send_install(device, InstallCommand)`` and ``send_rollback(device, RollbackCommand)`` are
    the seams to MQTT; ``clock`` gives the time; ``isolate`` runs one rollout's work so that its
    failure marks that rollout FAILED and leaves the others alone.
    """

    def __init__(self, db: FleetDB, registry: Registry, send_install: Callable[[str, proto.InstallCommand], None],
                 send_rollback: Callable[[str, proto.RollbackCommand], None], clock: Callable[[], float], *,
                 isolate: Isolate, deltas: Optional[DeltaPlanner] = None) -> None:
        self.db = db
        self.deltas = deltas
        self.registry = registry
        self.send_install = send_install
        self.send_rollback = send_rollback
        self.clock = clock
        self.isolate = isolate

    def _isolated(self, rid: str, step: Callable[[], None]) -> bool:
        return self.isolate(f"rollout {rid}", step, lambda reason: self.fail(rid, reason))

    def fail(self, rid: str, reason: str) -> None:
        """The fleet cannot process this rollout: FAILED with ``reason``, its queued devices canceled."""
        log.error("rollout %s FAILED: %s", rid, reason)
        self._cancel_queued(rid, "rollout failed")
        self._finish(rid, "FAILED", reason)

    def is_sending(self, device: str, bundle_sha256: str) -> bool:
        return is_sending(self.db, device, bundle_sha256)

    # --- events ---------------------------------------------------------------------------------
    def on_install_status(self, msg: proto.InstallStatus) -> None:
        """An agent's install or rollback status (``msg.device`` is the topic's device)."""
        if msg.rollout:
            self._isolated(msg.rollout, lambda: self._record_install_status(msg))

    def _record_install_status(self, msg: proto.InstallStatus) -> None:
        row = self.db.one("SELECT d.*, r.state AS rstate, r.options, r.version AS rversion FROM rollout_devices d "
                          "JOIN rollouts r ON r.id = d.rollout WHERE d.rollout = ? AND d.device = ?",
                          (msg.rollout, msg.device))
        if row is None or row["rstate"] == "FAILED":
            return  # not a device of that rollout, or a rollout the fleet gave up on
        now = self.clock()
        opts = RolloutOptions(**loads(row["options"]))
        key = (msg.rollout, msg.device)
        if msg.fallback and msg.bundle_sha256:  # a delta did not apply there: that target goes whole from now on
            DeltaPlanner.record_fallback(self.db, msg.device, msg.bundle_sha256, msg.reason, now)
        if msg.state in ("DOWNLOADING", "VERIFYING"):
            if row["state"] == "IN_PROGRESS":
                self._set(key, reason=f"{msg.state.lower()}: {msg.reason}".rstrip(": "), updated=now)
            return
        if msg.state == "ROLLED_BACK":
            self._set(key, state="ROLLED_BACK", rollback="DONE", updated=now,
                      reason=(row["reason"] + "; " if row["reason"] else "") + f"rolled back to {msg.version}")
            return
        if msg.state == "FAILED" and row["rollback"] == "SENT":
            self._set(key, rollback="FAILED", updated=now, reason=f"{row['reason']}; rollback failed: {msg.reason}")
            return
        if row["state"] not in ("IN_PROGRESS", "TIMED_OUT", "QUEUED"):
            return  # a late or repeated outcome for a device already settled
        if msg.state == "FAILED":
            self._set(key, state="FAILED", failed=1, reason=msg.reason or "failed", updated=now)
            return
        # SUCCEEDED: the device runs the new version now
        had_it = msg.reason == "already active" and not row["previous_version"]  # nothing to roll back
        fields: dict[str, Any] = dict(state="SUCCEEDED", failed=0, installed=0 if had_it else 1, updated=now,
                                      reason=msg.reason,
                                      p50_ms=msg.p50_ms, previous_p50_ms=msg.previous_p50_ms)
        if msg.previous_version and msg.previous_version != row["rversion"]:
            fields["previous_version"] = msg.previous_version
        r = opts.max_latency_regression
        if r and msg.p50_ms and msg.previous_p50_ms and msg.p50_ms > r * msg.previous_p50_ms:
            fields.update(state="FAILED", failed=1, reason=(
                f"latency regression: p50 {msg.p50_ms:.3f} ms on {row['rversion']} vs {msg.previous_p50_ms:.3f} ms on "
                f"{msg.previous_version} ({msg.p50_ms / msg.previous_p50_ms:.2f}x > {r:g}x)"))
        self._set(key, **fields)
        if fields["installed"] and (fields["state"] == "FAILED" or row["rstate"] in ("ABORTING", "ABORTED", "ROLLING_BACK", "ROLLED_BACK")):
            self._rollback_device(msg.rollout, msg.device)

    def on_device_online(self, device: str) -> None:
        """A device came (back) online: resend what it may have missed."""
        for row in self.db.all("SELECT d.rollout FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout "
                               "WHERE d.device = ? AND d.state = 'IN_PROGRESS' AND r.state = 'RUNNING'", (device,)):
            self._isolated(row["rollout"], lambda rid=row["rollout"]: self._send_install(rid, device))

    def resume(self) -> None:
        """After a fleet restart: resend install commands to devices that were installing (the
        agent answers at once when it already has the version; a transfer resumes its chunks)."""
        up = self.registry.online_ids()
        for row in self.db.all("SELECT d.rollout, d.device FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout "
                               "WHERE d.state = 'IN_PROGRESS' AND r.state = 'RUNNING'"):
            if row["device"] in up:
                self._isolated(row["rollout"], lambda r=row: self._send_install(r["rollout"], r["device"]))

    # --- the periodic step ------------------------------------------------------------------------
    def tick(self) -> None:
        for r in self.db.all("SELECT * FROM rollouts WHERE state IN ('RUNNING', 'ABORTING', 'ROLLING_BACK')"):
            self._isolated(r["id"], lambda r=r: self._step(r))

    def _step(self, r: Any) -> None:
        rid, now = r["id"], self.clock()
        opts = RolloutOptions(**loads(r["options"]))
        if r["request"] == "cancel" and r["state"] == "RUNNING":
            self._cancel_queued(rid, "rollout canceled")
            self._finish(rid, "CANCELED", "canceled by request")
            return
        if r["request"] == "rollback" and r["state"] == "RUNNING":
            self._cancel_queued(rid, "rollout rolled back")
            self._set_rollout(rid, state="ROLLING_BACK", reason="rollback requested", request=None)
            r = self.db.one("SELECT * FROM rollouts WHERE id = ?", (rid,))
        if r["state"] in ("ABORTING", "ROLLING_BACK"):
            self._drive_rollbacks(rid, r, opts, now)
            return
        # RUNNING: time-outs, abort threshold, next devices, end
        self.db.execute("UPDATE rollout_devices SET state = 'TIMED_OUT', failed = 1, updated = ?, "
                        "reason = 'no outcome within ' || ? || ' s' WHERE rollout = ? AND state = 'IN_PROGRESS' "
                        "AND started < ?", (now, f"{opts.timeout:g}", rid, now - opts.timeout))
        executed = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND state IN "
                                  "('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'ROLLED_BACK')", (rid,))
        failed = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND failed = 1", (rid,))
        if executed >= opts.min_executed and executed and 100.0 * failed / executed > opts.max_failure_percent:
            reasons = [x["reason"] for x in self.db.all(
                "SELECT reason FROM rollout_devices WHERE rollout = ? AND failed = 1 ORDER BY updated LIMIT 3", (rid,))]
            reason = (f"aborted: {failed} of {executed} devices failed ({100.0 * failed / executed:.0f} % > "
                      f"{opts.max_failure_percent:g} %); first: {reasons[0] if reasons else '?'}")
            self._cancel_queued(rid, "rollout aborted")
            self._set_rollout(rid, state="ABORTING", reason=reason)
            self._drive_rollbacks(rid, self.db.one("SELECT * FROM rollouts WHERE id = ?", (rid,)), opts, now)
            return
        self._start_devices(rid, opts, now)
        left = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND state IN ('QUEUED', 'IN_PROGRESS')",
                              (rid,))
        if left == 0:
            total = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ?", (rid,))
            ok = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND state = 'SUCCEEDED'", (rid,))
            self._finish(rid, "SUCCEEDED", f"{ok} of {total} devices succeeded")

    def _start_devices(self, rid: str, opts: RolloutOptions, now: float) -> None:
        """Start the queued online devices of the open stage: the first stage with a device
        still to finish (an offline queued device does not hold its stage open). In SQL, so a
        tick costs the same for 10 devices as for 10,000."""
        open_stage = self.db.scalar(
            "SELECT MIN(rd.stage) FROM rollout_devices rd LEFT JOIN devices d ON d.id = rd.device WHERE rd.rollout = ? "
            "AND (rd.state = 'IN_PROGRESS' OR (rd.state = 'QUEUED' AND d.online = 1))", (rid,))
        if open_stage is None:
            return  # nothing in progress, nothing queued online
        started_last_minute = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND started > ?",
                                             (rid, now - 60.0))
        budget = opts.max_per_minute - started_last_minute
        if budget <= 0:
            return
        for x in self.db.all("SELECT rd.device FROM rollout_devices rd JOIN devices d ON d.id = rd.device "
                             "WHERE rd.rollout = ? AND rd.state = 'QUEUED' AND rd.stage <= ? AND d.online = 1 "
                             "ORDER BY rd.position LIMIT ?", (rid, open_stage, budget)):
            self._set((rid, x["device"]), state="IN_PROGRESS", started=now, updated=now, reason="install sent")
            self._send_install(rid, x["device"])

    def _drive_rollbacks(self, rid: str, r: Any, opts: RolloutOptions, now: float) -> None:
        for x in self.db.all("SELECT device FROM rollout_devices WHERE rollout = ? AND installed = 1 AND rollback IS NULL",
                             (rid,)):
            self._rollback_device(rid, x["device"])
        self.db.execute("UPDATE rollout_devices SET rollback = 'TIMED_OUT', updated = ?, reason = reason || "
                        "'; rollback timed out' WHERE rollout = ? AND rollback = 'SENT' AND rollback_sent < ?",
                        (now, rid, now - opts.timeout))
        self.db.execute("UPDATE rollout_devices SET state = 'TIMED_OUT', failed = 1, updated = ?, reason = "
                        "'no outcome within ' || ? || ' s' WHERE rollout = ? AND state = 'IN_PROGRESS' AND started < ?",
                        (now, f"{opts.timeout:g}", rid, now - opts.timeout))
        pending = self.db.scalar("SELECT COUNT(*) FROM rollout_devices WHERE rollout = ? AND (rollback = 'SENT' OR "
                                 "state = 'IN_PROGRESS')", (rid,))
        if pending == 0:
            self._finish(rid, "ABORTED" if r["state"] == "ABORTING" else "ROLLED_BACK", r["reason"])

    def _rollback_device(self, rid: str, device: str) -> None:
        row = self.db.one("SELECT d.previous_version, r.model FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout "
                          "WHERE d.rollout = ? AND d.device = ?", (rid, device))
        if row is None:
            return
        self._set((rid, device), rollback="SENT", rollback_sent=self.clock())
        self.send_rollback(device, proto.RollbackCommand(model=row["model"], to_version=row["previous_version"], rollout=rid))

    def _send_install(self, rid: str, device: str) -> None:
        r = self.db.one("SELECT r.model, r.version, b.sha256, b.size, b.manifest FROM rollouts r "
                        "JOIN bundles b ON b.sha256 = r.bundle_sha256 WHERE r.id = ?", (rid,))
        if r is None:
            raise RolloutError(f"rollout {rid}: its bundle is not in the fleet's bundle store any more")
        manifest = loads(r["manifest"])
        delta = self.deltas.choose(self.db, device, r["sha256"], r["model"], self.clock()) if self.deltas else None
        cmd = proto.InstallCommand(model=r["model"], version=r["version"], bundle_sha256=r["sha256"],
                                   bundle_size=int(r["size"]), rollout=rid,
                                   min_runtime_version=manifest.get("min_runtime_version"), delta=delta)
        prev = loads(self.db.scalar("SELECT status FROM devices WHERE id = ?", (device,))).get("models", {}).get(r["model"])
        if prev and prev != r["version"]:
            self._set((rid, device), previous_version=prev)
        self.send_install(device, cmd)

    def _cancel_queued(self, rid: str, reason: str) -> None:
        self.db.execute("UPDATE rollout_devices SET state = 'CANCELED', reason = ?, updated = ? "
                        "WHERE rollout = ? AND state = 'QUEUED'", (reason, self.clock(), rid))

    def _finish(self, rid: str, state: str, reason: str) -> None:
        self._set_rollout(rid, state=state, reason=reason, finished=self.clock(), request=None)

    def _set_rollout(self, rid: str, **fields: Any) -> None:
        fields["updated"] = self.clock()
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE rollouts SET {cols} WHERE id = ?", (*fields.values(), rid))

    def _set(self, key: tuple[str, str], **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout = ? AND device = ?", (*fields.values(), *key))
