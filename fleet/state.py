"""The fleet's state: one SQLite database, so a fleet process killed at any moment resumes.

Everything the fleet knows lives in ``<state_dir>/fleet.sqlite`` (WAL; ``synchronous=FULL``
because an agent deletes a result from its outbox once the fleet acknowledges it, so what the
fleet acknowledged must survive a power cut): devices, bundles, rollouts and their per-device
states, jobs, tasks and their results, and the ids of the agents' durable messages already
stored (de-duplication). One controller process writes (see :mod:`fleet.service`); any number
of readers (``edgesdk fleet devices``, ``fleet rollout ID``) read at the same time.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["FleetDB", "default_state_dir"]

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
    format TEXT NOT NULL DEFAULT 'npz', created REAL NOT NULL, started REAL, finished REAL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, job TEXT NOT NULL, idx INTEGER NOT NULL, start INTEGER NOT NULL,
    stop INTEGER NOT NULL, state TEXT NOT NULL, device TEXT, lease_until REAL,
    dispatches INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', elapsed_s REAL, done_at REAL,
    outputs TEXT);
CREATE INDEX IF NOT EXISTS tasks_job_state ON tasks (job, state);
CREATE INDEX IF NOT EXISTS tasks_device ON tasks (device, state);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, key TEXT,
    outputs TEXT NOT NULL, meta TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL);
"""


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
