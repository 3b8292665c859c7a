"""The fleet's state behind one interface, with two backends: SQLite (the default) and PostgreSQL.

Everything the fleet knows lives in one database (schema and migrations: :mod:`.schema`), and
the bytes of bundles, deltas and job inputs in a blob store beside it. A fleet process killed
at any moment resumes from it; any process that reaches it can read the fleet and write
requests (deploy, run, cancel) that the leading controller carries out.

* **SQLite** (``--db PATH`` or nothing: ``<state_dir>/fleet.sqlite``): WAL, ``synchronous=FULL``
  (an agent deletes a result from its outbox once the fleet acknowledges it, so what the fleet
  acknowledged must survive a power cut); blobs are files under the state directory; one
  machine, one controller at a time (an ``flock``, :class:`fleet.leader.FileLeadership`).
* **PostgreSQL** (``--db postgresql://...``, or ``EDGESDK_FLEET_DB``): psycopg 3 with a
  connection pool; blobs in the ``blobs`` table, so a command run on any machine that reaches
  the database (deploy a bundle, submit a job, download results) works whichever controller
  leads; several controllers, one leading under a lease with a fencing epoch
  (:class:`fleet.leader.LeaseLeadership`).

Code above this module writes SQL in one portable dialect: ``?`` placeholders, ``INSERT ... ON
CONFLICT ... DO NOTHING / DO UPDATE``, savepoints, no backend-specific functions. Rows are read
by column name (``row["id"]``) or position.

The database's own failures (connection lost, disk full, I/O) are raised as
:class:`StorageError` subclasses of the backend's errors listed in :attr:`FleetDB.Unavailable`,
so the engine can tell "the database failed, retry the step" from "this message or job is bad".
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence, Union

from .schema import SCHEMA_VERSION

__all__ = ["FleetDB", "Storage", "Blobs", "open_storage", "close_storage", "storage_url", "default_state_dir", "dumps", "loads",
           "Isolate", "SCHEMA_VERSION", "Row"]

#: ``isolate(what, step, on_failure) -> bool``: run ``step`` (one job's or one rollout's work) so
#: that an exception undoes only that step's changes and calls ``on_failure(reason)`` (which
#: marks that job or rollout FAILED) instead of aborting the engine's transaction; True when the
#: step succeeded. The fleet's engine provides it (:meth:`fleet.engine.Engine.isolated`).
Isolate = Callable[[str, Callable[[], None], Callable[[str], None]], bool]

#: a row as both backends give it: by column name or by position, and ``dict(row)``
Row = Any


def default_state_dir() -> Path:
    """``$EDGESDK_FLEET_STATE``, else ``$XDG_DATA_HOME/edgesdk/fleet`` (``~/.local/share/...``)."""
    env = os.environ.get("EDGESDK_FLEET_STATE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "edgesdk" / "fleet"


def storage_url(db: Optional[str]) -> Optional[str]:
    """The database URL a fleet command uses: ``db`` (``--db``), else ``$EDGESDK_FLEET_DB``, else
    None (SQLite in the state directory)."""
    return db or os.environ.get("EDGESDK_FLEET_DB") or None


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def loads(text: Optional[str]) -> Any:
    return json.loads(text) if text else {}


class FleetDB:
    """One connection to the fleet database: small helpers over portable SQL. A connection
    belongs to one thread at a time; a context manager gives it back (closes it, or returns it
    to the pool)."""

    #: the backend's exception types that mean "the database failed" (not the data)
    Unavailable: ClassVar[tuple[type[BaseException], ...]] = ()
    kind: ClassVar[str] = ""

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> Any:
        raise NotImplementedError

    def one(self, sql: str, params: Iterable[Any] = ()) -> Optional[Row]:
        raise NotImplementedError

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def begin(self) -> None:
        """Start a write transaction (SQLite: ``BEGIN IMMEDIATE``, so writers queue here)."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def savepoint(self, name: str) -> None:
        self.execute(f"SAVEPOINT {name}")

    def rollback_to(self, name: str) -> None:
        self.execute(f"ROLLBACK TO SAVEPOINT {name}")

    def release(self, name: str) -> None:
        self.execute(f"RELEASE SAVEPOINT {name}")

    def transaction(self) -> "_Transaction":
        """``with db.transaction():`` begin, commit on success, roll back on any exception."""
        return _Transaction(self)

    def first_sight(self, message_id: str, now: float) -> bool:
        """Record a durable message id; False when it was stored before (a re-delivery)."""
        cur = self.execute("INSERT INTO seen (id, at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING", (message_id, now))
        return cur.rowcount == 1

    def first_sights(self, message_ids: Iterable[str], now: float) -> set[str]:
        """Record many durable message ids in one statement (one round trip); the ids among them
        not stored before."""
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return set()
        rows = self.all(f"INSERT INTO seen (id, at) VALUES {', '.join(['(?, ?)'] * len(ids))} "
                        "ON CONFLICT (id) DO NOTHING RETURNING id", [v for i in ids for v in (i, now)])
        return {r[0] for r in rows}

    def schema_version(self) -> int:
        return int(self.scalar("SELECT version FROM schema_version") or 0)

    def current_version(self) -> Optional[int]:
        """The recorded schema version, without writing (None: not recorded yet)."""
        if "version" not in self.columns("schema_version"):
            return None
        return self.schema_version()

    def columns(self, table: str) -> set[str]:
        """The column names of ``table`` (empty when it does not exist)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "FleetDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    def __init__(self, db: FleetDB) -> None:
        self.db = db

    def __enter__(self) -> FleetDB:
        self.db.begin()
        return self.db

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.db.commit()
        else:
            self.db.rollback()


class Blobs:
    """Bytes by (kind, name): ``bundle`` and ``delta`` named by their sha256, ``input`` named
    ``<job id>.<input index>`` (a job's input array as ``.npy`` bytes). Names come from the
    database or, for bundles and deltas, from devices' chunk requests: every backend refuses a
    name that is not one plain name (:func:`sdk.paths.confined`'s rule)."""

    KINDS = ("bundle", "delta", "input")

    def put(self, kind: str, name: str, data: bytes, db: Optional[FleetDB] = None) -> None:
        """Keep ``data`` (atomically; a blob that exists is kept as it is: blobs are named by content or by job)."""
        raise NotImplementedError

    def get(self, kind: str, name: str, db: Optional[FleetDB] = None) -> bytes:
        """The bytes; :class:`FileNotFoundError` when there is no such blob."""
        raise NotImplementedError

    def array(self, kind: str, name: str, db: Optional[FleetDB] = None) -> Any:
        """A ``.npy`` blob as a numpy array (memory-mapped where the backend can)."""
        import io

        import numpy as np

        return np.load(io.BytesIO(self.get(kind, name, db)), allow_pickle=False)

    def put_array(self, kind: str, name: str, array: Any, db: Optional[FleetDB] = None) -> None:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.put(kind, name, buf.getvalue(), db)

    def delete(self, kind: str, name: str, db: Optional[FleetDB] = None) -> None:
        raise NotImplementedError


class Storage:
    """A fleet database and its blob store, opened from a URL (:func:`open_storage`)."""

    kind: ClassVar[str] = ""
    url: str
    blobs: Blobs

    def connect(self) -> FleetDB:
        """A connection (for one thread; use it as a context manager). The schema exists."""
        raise NotImplementedError

    def leadership(self, holder: str, *, ttl: float) -> Any:
        """The controller lease of this storage (:mod:`fleet.leader`), for ``holder``."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the state is, for messages (no password)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _check_blob(kind: str, name: str) -> None:
    from sdk.errors import ProtocolError
    from sdk.paths import SAFE_NAME

    if kind not in Blobs.KINDS:
        raise ValueError(f"unknown blob kind {kind!r}")
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ProtocolError(f"{name!r} cannot name a {kind}: use letters, digits, '.', '_' and '-'")


def migrate(db: FleetDB, statements: Callable[[str], Sequence[str]]) -> int:
    """Bring ``db`` to :data:`SCHEMA_VERSION` in one write transaction (two processes opening a
    fresh database at once do not both alter it); ``statements(step)`` gives a backend's SQL for a
    portable DDL step. Returns the version the database had."""
    from .schema import MIGRATIONS, AddColumn

    if db.current_version() == SCHEMA_VERSION:  # a read: no write lock for a database that is up to date
        return SCHEMA_VERSION
    with db.transaction():
        current = db.initial_version()  # type: ignore[attr-defined]
        for version in sorted(v for v in MIGRATIONS if v > current):
            for step in MIGRATIONS[version]:
                if isinstance(step, AddColumn):
                    table, column, declaration = step
                    if column in db.columns(table):
                        continue
                    for sql in statements(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}"):
                        db.execute(sql)
                else:
                    for sql in statements(step):
                        db.execute(sql)
        if current < SCHEMA_VERSION:
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    return current


def open_storage(url: Optional[str] = None, state_dir: Optional[Union[str, os.PathLike]] = None) -> Storage:
    """The fleet's storage: ``url`` ``postgresql://...`` (or ``postgres://``), a SQLite path or
    ``sqlite:///path``, or None for ``<state_dir>/fleet.sqlite``. Creates or migrates the schema."""
    from sdk.errors import ConfigError

    state = Path(os.path.expanduser(str(state_dir))) if state_dir else default_state_dir()
    if url and url.split("://", 1)[0] in ("postgresql", "postgres"):
        from .postgres import PostgresStorage

        with _OPEN_LOCK:  # one pool per database and process, shared by every Fleet object
            storage = _OPEN.get(url)
            if storage is None:
                storage = _OPEN[url] = PostgresStorage(url)
        return storage
    if url and "://" in url and not url.startswith("sqlite://"):
        raise ConfigError(f"--db {url.split('://', 1)[0]}://...: use postgresql://USER@HOST:PORT/DB or a SQLite file path")
    from .sqlite import SQLiteStorage

    path = Path(url[len("sqlite://"):]) if url and url.startswith("sqlite://") else Path(url) if url else None
    return SQLiteStorage(state, path)


def close_storage(url: str) -> None:
    """Close the shared storage of ``url`` (its connection pool), e.g. before its database is dropped."""
    with _OPEN_LOCK:
        storage = _OPEN.pop(url, None)
    if storage is not None:
        storage.close()


_OPEN: dict[str, Storage] = {}
_OPEN_LOCK = threading.Lock()
