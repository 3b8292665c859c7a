"""The fleet database's schema, as a numbered list of migrations that both backends apply.

A fresh database runs every migration from the first, so the steps an old database takes are
the steps every test database takes too. Each step is a list of statements in a portable
dialect: ``INTEGER``, ``REAL``, ``TEXT`` and ``BLOB`` columns (the PostgreSQL backend maps them
to ``BIGINT``, ``DOUBLE PRECISION``, ``TEXT`` and ``BYTEA``), or ``ADD COLUMN`` tuples that a
backend applies only when the column is missing (SQLite databases made before migrations were
numbered here already have some of them).

Tables:

* ``devices``: presence, the last status and heartbeat of every device, its tags;
* ``bundles``: every bundle a rollout sends (the bytes are in the blob store), with its manifest;
* ``rollouts`` and ``rollout_devices``: staged rollouts and each target's state;
* ``jobs`` and ``tasks``: batch jobs and their tasks, with each task's accepted outputs;
* ``results``: results agents published outside jobs;
* ``seen``: ids of the agents' durable messages already stored (de-duplication);
* ``device_bundles``, ``deltas``, ``delta_fallbacks``: what each device holds, the deltas made,
  and devices on which a delta did not apply;
* ``leader``: the controller's lease with its epoch (the fencing token, :mod:`fleet.leader`);
* ``desired``: the desired configuration of devices and tags (:mod:`fleet.desired`);
* ``blobs``: bundle, delta and job-input bytes, in backends that keep them in the database.
"""

from __future__ import annotations

from typing import Union

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "AddColumn", "Step"]


class AddColumn(tuple):
    """``(table, column, declaration)``: added when the table lacks the column."""

    def __new__(cls, table: str, column: str, declaration: str) -> "AddColumn":
        return super().__new__(cls, (table, column, declaration))


Step = Union[str, AddColumn]

_BASE = [
    """CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, since REAL, last_seen REAL,
    status TEXT NOT NULL DEFAULT '{}', heartbeat TEXT NOT NULL DEFAULT '{}', heartbeat_at REAL,
    tags TEXT NOT NULL DEFAULT '{}')""",
    """CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, size INTEGER NOT NULL,
    path TEXT NOT NULL, manifest TEXT NOT NULL, added REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, bundle_sha256 TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', options TEXT NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, finished REAL, request TEXT)""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL, device TEXT NOT NULL, stage INTEGER NOT NULL, position INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', failed INTEGER NOT NULL DEFAULT 0,
    installed INTEGER NOT NULL DEFAULT 0, previous_version TEXT, p50_ms REAL, previous_p50_ms REAL,
    started REAL, updated REAL, rollback TEXT, rollback_sent REAL,
    PRIMARY KEY (rollout, device))""",
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    options TEXT NOT NULL, samples INTEGER NOT NULL, tasks INTEGER NOT NULL, output TEXT,
    format TEXT NOT NULL DEFAULT 'npz', created REAL NOT NULL, started REAL, finished REAL)""",
    """CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, job TEXT NOT NULL, idx INTEGER NOT NULL, start INTEGER NOT NULL,
    stop INTEGER NOT NULL, state TEXT NOT NULL, device TEXT, lease_until REAL,
    dispatches INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', elapsed_s REAL, done_at REAL,
    outputs TEXT)""",
    "CREATE INDEX IF NOT EXISTS tasks_job_state ON tasks (job, state)",
    "CREATE INDEX IF NOT EXISTS tasks_device ON tasks (device, state)",
    """CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, key TEXT,
    outputs TEXT NOT NULL, meta TEXT NOT NULL, ts REAL NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS device_bundles (
    device TEXT NOT NULL, sha256 TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (device, sha256))""",
    """CREATE TABLE IF NOT EXISTS deltas (
    base TEXT NOT NULL, target TEXT NOT NULL, method TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    full_size INTEGER NOT NULL, made REAL NOT NULL, PRIMARY KEY (base, target, method))""",
    "CREATE INDEX IF NOT EXISTS deltas_sha ON deltas (sha256)",
    """CREATE TABLE IF NOT EXISTS delta_fallbacks (
    device TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (device, target))""",
]

#: version -> the steps that bring a database of the version before it to this one
MIGRATIONS: dict[int, list[Step]] = {
    1: _BASE,
    2: [AddColumn("tasks", "version", "TEXT"),  # the model version a task was dispatched for
        AddColumn("jobs", "output_spec", "TEXT")],  # dtype and shape of the job's accepted outputs
    3: [AddColumn("jobs", "bytes_sent", "INTEGER NOT NULL DEFAULT 0")],  # task bytes published (all attempts)
    4: [
        # the controller's lease: one row per lease name; ``epoch`` grows with every new holder
        # and every engine transaction checks it (a stalled former leader writes nothing)
        """CREATE TABLE IF NOT EXISTS leader (
        name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch INTEGER NOT NULL, expires REAL NOT NULL,
        acquired REAL NOT NULL)""",
        # bytes of bundles, deltas and job inputs where the backend keeps them in the database
        """CREATE TABLE IF NOT EXISTS blobs (
        kind TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (kind, name))""",
        "CREATE INDEX IF NOT EXISTS tasks_job_pending ON tasks (job, state, idx)",  # the next pending tasks, in order
        "CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices (device, state)",
    ],
    5: [
        # desired configuration per device ("device", id) and per tag ("tag", "key=value") (fleet.desired)
        """CREATE TABLE IF NOT EXISTS desired (
        scope TEXT NOT NULL, target TEXT NOT NULL, config TEXT NOT NULL, revision INTEGER NOT NULL,
        updated REAL NOT NULL, PRIMARY KEY (scope, target))""",
    ],
}

SCHEMA_VERSION = max(MIGRATIONS)
