"""The fleet's state: one SQLite database, so a fleet process killed at any moment resumes.

Everything the fleet knows lives in ``<state_dir>/fleet.sqlite`` (WAL; ``synchronous=FULL``
because an agent deletes a result from its outbox once the fleet acknowledges it, so what the
fleet acknowledged must survive a power cut): devices, bundles, rollouts and their per-device
states, jobs, tasks and their results, the ids of the agents' durable messages already
stored (de-duplication), the bundles each device reported holding (``device_bundles``), the
deltas made between bundles (``deltas``; their bytes live in the bundle store) and the devices
on which a delta did not apply (``delta_fallbacks``: they get full bundles of that target).
One controller process writes (see :mod:`fleet.service`); any number of readers (``edgesdk
fleet devices``, ``fleet rollout ID``) read at the same time.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

__all__ = ["FleetDB", "default_state_dir", "SCHEMA_VERSION", "Isolate"]

#: ``isolate(what, step, on_failure) -> bool``: run ``step`` (one job's or one rollout's work) so
#: that an exception undoes only that step's changes and calls ``on_failure(reason)`` (which
#: marks that job or rollout FAILED) instead of aborting the engine's transaction; True when the
#: step succeeded. The fleet's engine provides it (:meth:`fleet.Fleet._isolated`).
Isolate = Callable[[str, Callable[[], None], Callable[[str], None]], bool]

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, since REAL, last_seen REAL,
    status TEXT NOT NULL DEFAULT '{}', heartbeat TEXT NOT NULL DEFAULT '{}', heartbeat_at REAL,
    tags TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, size INTEGER NOT NULL,
    path TEXT NOT NULL, manifest TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, bundle_sha256 TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', options TEXT NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, finished REAL, request TEXT);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL, device TEXT NOT NULL, stage INTEGER NOT NULL, position INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', failed INTEGER NOT NULL DEFAULT 0,
    installed INTEGER NOT NULL DEFAULT 0, previous_version TEXT, p50_ms REAL, previous_p50_ms REAL,
    started REAL, updated REAL, rollback TEXT, rollback_sent REAL,
    PRIMARY KEY (rollout, device));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    options TEXT NOT NULL, samples INTEGER NOT NULL, tasks INTEGER NOT NULL, output TEXT,
    format TEXT NOT NULL DEFAULT 'npz', created REAL NOT NULL, started REAL, finished REAL, output_spec TEXT,
    bytes_sent INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, job TEXT NOT NULL, idx INTEGER NOT NULL, start INTEGER NOT NULL,
    stop INTEGER NOT NULL, state TEXT NOT NULL, device TEXT, lease_until REAL,
    dispatches INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', elapsed_s REAL, done_at REAL,
    outputs TEXT, version TEXT);
CREATE INDEX IF NOT EXISTS tasks_job_state ON tasks (job, state);
CREATE INDEX IF NOT EXISTS tasks_device ON tasks (device, state);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, key TEXT,
    outputs TEXT NOT NULL, meta TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS device_bundles (
    device TEXT NOT NULL, sha256 TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (device, sha256));
CREATE TABLE IF NOT EXISTS deltas (
    base TEXT NOT NULL, target TEXT NOT NULL, method TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    full_size INTEGER NOT NULL, made REAL NOT NULL, PRIMARY KEY (base, target, method));
CREATE INDEX IF NOT EXISTS deltas_sha ON deltas (sha256);
CREATE TABLE IF NOT EXISTS delta_fallbacks (
    device TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (device, target));
"""

#: ``PRAGMA user_version`` of a database with :data:`SCHEMA`. Databases made before a version get
#: the columns it added through :data:`MIGRATIONS` (SQLite's ``CREATE TABLE IF NOT EXISTS`` does
#: not add columns to a table that exists).
SCHEMA_VERSION = 3

#: version -> the columns it added, as (table, column, declaration)
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("tasks", "version", "TEXT"),  # the model version a task was dispatched for
        ("jobs", "output_spec", "TEXT")],  # dtype and shape of the job's accepted outputs
    3: [("jobs", "bytes_sent", "INTEGER NOT NULL DEFAULT 0")],  # task bytes published for the job (all attempts)
}


def default_state_dir() -> Path:
    """``$EDGESDK_FLEET_STATE``, else ``$XDG_DATA_HOME/edgesdk/fleet`` (``~/.local/share/...``)."""
    env = os.environ.get("EDGESDK_FLEET_STATE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "edgesdk" / "fleet"


class FleetDB:
    """A connection to the fleet database (one per thread; SQLite connections are not shared).
    ``create=True`` makes the schema (once per process is enough); a context manager closes it."""

    def __init__(self, state_dir: os.PathLike | str, *, create: bool = True) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "fleet.sqlite"
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        if create:
            self.conn.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an older edgesdk to :data:`SCHEMA_VERSION` (in one write
        transaction, so two processes opening it at once do not both alter it)."""
        self.begin()
        try:
            current = self.scalar("PRAGMA user_version") or 0
            for version in sorted(v for v in MIGRATIONS if v > current):
                for table, column, declaration in MIGRATIONS[version]:
                    if column not in {r["name"] for r in self.all(f"PRAGMA table_info({table})")}:
                        self.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            if current < SCHEMA_VERSION:
                self.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def __enter__(self) -> "FleetDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- small helpers -----------------------------------------------------------------------
    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, [tuple(r) for r in rows])

    def one(self, sql: str, params: Iterable[Any] = ()) -> Optional[sqlite3.Row]:
        return self.conn.execute(sql, tuple(params)).fetchone()

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def first_sight(self, message_id: str, now: float) -> bool:
        """Record a durable message id; False when it was stored before (a re-delivery)."""
        cur = self.conn.execute("INSERT OR IGNORE INTO seen (id, at) VALUES (?, ?)", (message_id, now))
        return cur.rowcount == 1

    def close(self) -> None:
        self.conn.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def loads(text: Optional[str]) -> Any:
    return json.loads(text) if text else {}
