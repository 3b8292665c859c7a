"""The PostgreSQL backend: psycopg 3 with a connection pool; blobs in the database.

For fleets past one machine: several controllers share one database (one leads, under a lease
with a fencing epoch: :class:`fleet.leader.LeaseLeadership`), and every fleet command works from
any machine that reaches the database, because bundles, deltas and job inputs are rows of the
``blobs`` table, not files on the controller's disk.

SQL arrives in the portable dialect of :mod:`fleet.storage` and is translated here: ``?``
placeholders become ``%s`` (a literal ``%`` is doubled), and the portable column types of
:mod:`fleet.storage.schema` become ``BIGINT``, ``DOUBLE PRECISION`` and ``BYTEA``. Connections run
in autocommit mode with explicit ``BEGIN``/``COMMIT``, as the SQLite backend does; numeric results
(``SUM`` of integers) load as Python numbers, not ``Decimal``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Optional

from sdk.deps import require
from sdk.errors import ConfigError

from . import Blobs, FleetDB, Storage, _check_blob, migrate

__all__ = ["PostgresStorage", "PostgresDB", "TableBlobs", "translate"]

#: serialises concurrent first-time migrations of one database (pg_advisory_xact_lock key)
_MIGRATION_LOCK = 0x65646765  # "edge"

_TYPES = [(re.compile(r"\bREAL\b"), "DOUBLE PRECISION"), (re.compile(r"\bINTEGER\b"), "BIGINT"),
          (re.compile(r"\bBLOB\b"), "BYTEA")]


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """Portable SQL to psycopg's: ``?`` outside quoted literals becomes ``%s``, ``%`` becomes ``%%``."""
    out = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
            out.append(ch)
        elif ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


def ddl(statement: str) -> list[str]:
    """A portable DDL statement in PostgreSQL's types."""
    for pattern, replacement in _TYPES:
        statement = pattern.sub(replacement, statement)
    return [statement]


class PgRow(dict):
    """A row by column name (``row["id"]``), by position (``row[0]``), and as ``dict(row)``."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return dict.__getitem__(self, key)


def _row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description] if cursor.description else []

    def make(values: Any) -> PgRow:
        return PgRow(zip(names, values))

    return make


def _psycopg() -> Any:
    require("psycopg_pool", "fleet", "for a PostgreSQL fleet database")
    return require("psycopg", "fleet", "for a PostgreSQL fleet database")


def _configure(conn: Any) -> None:
    """Numbers from ``numeric`` columns and aggregates as int/float, not Decimal."""
    from psycopg.adapt import Loader

    class NumberLoader(Loader):
        def load(self, data: Any) -> Any:
            text = bytes(data).decode()
            try:
                return int(text)
            except ValueError:
                return float(text)

    conn.adapters.register_loader("numeric", NumberLoader)


class PostgresDB(FleetDB):
    kind = "postgresql"

    def __init__(self, conn: Any, give_back: Any = None) -> None:
        psycopg = _psycopg()
        self.Unavailable = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.SerializationFailure,
                            psycopg.errors.DeadlockDetected)
        self.conn = conn
        self._give_back = give_back

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self.conn.execute(translate(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> Any:
        cur = self.conn.cursor()
        cur.executemany(translate(sql), [tuple(r) for r in rows])
        return cur

    def one(self, sql: str, params: Iterable[Any] = ()) -> Optional[PgRow]:
        return self.conn.execute(translate(sql), tuple(params)).fetchone()

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[PgRow]:
        return self.conn.execute(translate(sql), tuple(params)).fetchall()

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        if self._in_transaction():
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self._in_transaction():
            self.conn.execute("ROLLBACK")

    def _in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)

    def columns(self, table: str) -> set[str]:
        return {r["column_name"] for r in self.all(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?", (table,))}

    def initial_version(self) -> int:
        self.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        return int(self.scalar("SELECT version FROM schema_version") or 0)

    def limit_idle_transactions(self, seconds: float) -> None:
        """Have the server end this session when it sits in a transaction for ``seconds`` (a
        stalled controller must not hold its locks, and so its lease, for ever)."""
        self.execute(f"SET idle_in_transaction_session_timeout = {max(1, int(seconds * 1000))}")

    def server_time(self) -> float:
        """The database server's clock (seconds since the epoch): leases are timed by it, not by
        the clocks of the machines the controllers run on."""
        return float(self.scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp())"))

    def close(self) -> None:
        if self._give_back is not None:
            self.rollback() if not self.conn.closed else None
            self._give_back(self.conn)
            self._give_back = None
        elif not self.conn.closed:
            self.conn.close()


class TableBlobs(Blobs):
    """Blobs in the ``blobs`` table: reachable from every machine that reaches the database."""

    def __init__(self, storage: "PostgresStorage") -> None:
        self.storage = storage

    def put(self, kind: str, name: str, data: bytes, db: Optional[FleetDB] = None) -> None:
        _check_blob(kind, name)
        with self.storage.borrowed(db) as d:
            d.execute("INSERT INTO blobs (kind, name, data) VALUES (?, ?, ?) ON CONFLICT (kind, name) DO NOTHING",
                      (kind, name, bytes(data)))

    def get(self, kind: str, name: str, db: Optional[FleetDB] = None) -> bytes:
        _check_blob(kind, name)
        with self.storage.borrowed(db) as d:
            row = d.one("SELECT data FROM blobs WHERE kind = ? AND name = ?", (kind, name))
        if row is None:
            raise FileNotFoundError(f"no {kind} {name} in the fleet database")
        return bytes(row["data"])

    def delete(self, kind: str, name: str, db: Optional[FleetDB] = None) -> None:
        _check_blob(kind, name)
        with self.storage.borrowed(db) as d:
            d.execute("DELETE FROM blobs WHERE kind = ? AND name = ?", (kind, name))


class _Borrowed:
    """``db`` when given (the caller's transaction), else a pooled connection for the block."""

    def __init__(self, storage: "PostgresStorage", db: Optional[FleetDB]) -> None:
        self.storage, self.db, self.own = storage, db, None

    def __enter__(self) -> FleetDB:
        if self.db is not None:
            return self.db
        self.own = self.storage.connect()
        return self.own

    def __exit__(self, *exc: object) -> None:
        if self.own is not None:
            self.own.close()


class PostgresStorage(Storage):
    kind = "postgresql"

    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        psycopg = _psycopg()
        from psycopg_pool import ConnectionPool

        self.url = url
        try:  # one plain connection first: an unreachable database is one clear line at once
            psycopg.connect(url, connect_timeout=10).close()
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot reach the fleet database at {self.describe()}: {reason}: check --db "
                              "(postgresql://USER@HOST:PORT/DBNAME) and that PostgreSQL runs") from exc
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True, timeout=30,
                                   kwargs={"autocommit": True, "row_factory": _row_factory},
                                   configure=_configure, name="edgesdk-fleet")
        self.blobs = TableBlobs(self)
        with self.connect() as db:
            migrate(db, ddl)

    def connect(self) -> PostgresDB:
        return PostgresDB(self.pool.getconn(), give_back=self.pool.putconn)

    def dedicated(self) -> PostgresDB:
        """A connection outside the pool, for the engine and the lease: kept for the controller's
        life (a pool recycling the connection that holds the lease would end it silently)."""
        psycopg = _psycopg()
        conn = psycopg.connect(self.url, autocommit=True, row_factory=_row_factory)
        _configure(conn)
        return PostgresDB(conn)

    def borrowed(self, db: Optional[FleetDB]) -> _Borrowed:
        return _Borrowed(self, db)

    def leadership(self, holder: str, *, ttl: float) -> Any:
        from ..leader import LeaseLeadership

        return LeaseLeadership(self, holder, ttl=ttl)

    def describe(self) -> str:
        return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", self.url)

    def close(self) -> None:
        self.pool.close()
