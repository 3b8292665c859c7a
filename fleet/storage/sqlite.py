"""The SQLite backend: one file in the state directory, blobs as files beside it.

The default, for one machine: nothing to install or run. ``<state_dir>/fleet.sqlite`` in WAL
mode with ``synchronous=FULL``; bundles and deltas under ``<state_dir>/bundles/``, job inputs
under ``<state_dir>/jobs/<job id>/x<i>.npy`` (memory-mapped when a job runs). Blob names become
paths only through :func:`sdk.paths.confined`. One controller at a time holds the state
directory's ``flock`` (:class:`fleet.leader.FileLeadership`).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Optional

from sdk.paths import confined

from . import Blobs, FleetDB, Storage, _check_blob, migrate

__all__ = ["SQLiteStorage", "SQLiteDB", "FileBlobs"]


class SQLiteDB(FleetDB):
    kind = "sqlite"
    Unavailable = (sqlite3.OperationalError,)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, [tuple(r) for r in rows])

    def one(self, sql: str, params: Iterable[Any] = ()) -> Optional[sqlite3.Row]:
        return self.conn.execute(sql, tuple(params)).fetchone()

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def columns(self, table: str) -> set[str]:
        return {r["name"] for r in self.all(f"PRAGMA table_info({table})")}

    def initial_version(self) -> int:
        """The schema version before migrating: the ``schema_version`` table's; for databases
        made before it existed, ``PRAGMA user_version`` (1 when the tables exist but it is 0)."""
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = self.scalar("SELECT version FROM schema_version")
        if version is not None:
            return int(version)
        legacy = int(self.scalar("PRAGMA user_version") or 0)
        return legacy or (1 if self.columns("devices") else 0)

    def close(self) -> None:
        self.conn.close()


class FileBlobs(Blobs):
    """Blobs as files under the state directory (the layout older fleets used)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, name: str) -> Path:
        _check_blob(kind, name)
        if kind == "bundle":
            return confined(self.root, "bundles", name, suffix=".edgebundle")
        if kind == "delta":
            return confined(self.root, "bundles", name, suffix=".delta")
        job, _, index = name.rpartition(".")
        return confined(self.root, "jobs", job, "x" + index, suffix=".npy")

    def put(self, kind: str, name: str, data: bytes, db: Optional[FleetDB] = None) -> None:
        target = self.path(kind, name)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)

    def get(self, kind: str, name: str, db: Optional[FleetDB] = None) -> bytes:
        return self.path(kind, name).read_bytes()

    def array(self, kind: str, name: str, db: Optional[FleetDB] = None) -> Any:
        import numpy as np

        return np.load(self.path(kind, name), mmap_mode="r", allow_pickle=False)

    def put_array(self, kind: str, name: str, array: Any, db: Optional[FleetDB] = None) -> None:
        import numpy as np

        target = self.path(kind, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".tmp"), "wb") as f:
            np.save(f, array, allow_pickle=False)
        target.with_name(target.name + ".tmp").replace(target)

    def delete(self, kind: str, name: str, db: Optional[FleetDB] = None) -> None:
        try:
            self.path(kind, name).unlink()
        except FileNotFoundError:
            pass


class SQLiteStorage(Storage):
    kind = "sqlite"

    def __init__(self, state_dir: Path, path: Optional[Path] = None) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = Path(os.path.expanduser(str(path))) if path else state_dir / "fleet.sqlite"
        self.url = f"sqlite://{self.path}"
        self.blobs = FileBlobs(state_dir)
        with SQLiteDB(self.path) as db:
            migrate(db, lambda step: [step])

    def connect(self) -> SQLiteDB:
        return SQLiteDB(self.path)

    def leadership(self, holder: str, *, ttl: float) -> Any:
        from ..leader import FileLeadership

        return FileLeadership(self.state_dir / "controller.lock")

    def describe(self) -> str:
        return str(self.path)
