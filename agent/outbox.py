"""The durable outbox: every result and install status waits on disk until the fleet acks it.

A PUBACK only means the broker has a message; the broker can still lose it (SIGKILL before its
autosave, a subscriber queue over ``max_queued_messages``) and paho keeps its QoS-1 state in
memory only. So each message is written to SQLite (WAL, ``synchronous=FULL``: it survives the
agent being killed and a power cut) before it is sent, re-sent after every reconnect and after
``resend_after`` seconds without an acknowledgement, and deleted only when the fleet's
application-level :class:`~sdk.protocol.Ack` names its id. The fleet de-duplicates by id.
Messages stored together (:meth:`Outbox.put_many`: the task results an agent finished while the
last ones were being written) share one transaction and one sync to disk; send times and
acknowledged deletions are committed without a sync of their own (a power cut can only make a
message go out again, which the fleet drops as a duplicate). Payloads are bytes, JSON or binary.

The outbox is bounded: when ``max_messages`` are pending, :meth:`Outbox.put` raises
:class:`~sdk.errors.BackpressureError`, the agent stops accepting new work and says why; nothing
is ever dropped silently.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from sdk.device import OutboxMessage
from sdk.errors import BackpressureError

__all__ = ["Outbox", "OutboxMessage", "outbox_path", "pending_in"]


def outbox_path(state_dir: os.PathLike | str) -> Path:
    """Where an agent with ``state_dir`` keeps its outbox."""
    return Path(state_dir) / "outbox.sqlite"


def pending_in(path: os.PathLike | str) -> Optional[int]:
    """How many messages the outbox at ``path`` holds, read without creating or changing anything
    (a stopped agent's status); 0 when there is no outbox, None when it cannot be read."""
    if not Path(path).exists():
        return 0
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None


class Outbox:
    def __init__(self, path: os.PathLike | str, max_messages: int = 10000,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
            "topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL, sent_at REAL, attempts INTEGER DEFAULT 0)"
        )
        self.changed = threading.Event()

    def put(self, msg_id: str, topic: str, payload: bytes) -> None:
        """Store a message durably; raise BackpressureError when the outbox is full."""
        self.put_many([(msg_id, topic, payload)])

    def put_many(self, messages: Sequence[tuple[str, str, bytes]], *, sending: bool = False) -> None:
        """Store ``(id, topic, payload)`` messages durably in one transaction (one sync to disk for
        all of them: what lets an agent keep up with small tasks); all or none. Raises
        BackpressureError when they do not all fit. ``sending``: the caller publishes them itself
        right after this returns (no read back by the sender thread), so they are stored as sent
        now: due again after ``resend_after``, or at once after a reconnect (:meth:`reset_sent`)."""
        if not messages:
            return
        now = self.clock()
        sent_at, attempts = (now, 1) if sending else (None, 0)
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if count + len(messages) > self.max_messages:
                raise BackpressureError(
                    f"the outbox holds {count} unacknowledged messages (outbox_max {self.max_messages}): "
                    "the fleet has not acknowledged results, so no new work is accepted until it does"
                )
            self._many("INSERT OR IGNORE INTO outbox (id, topic, payload, created, sent_at, attempts) "
                       "VALUES (?, ?, ?, ?, ?, ?)", [(i, t, p, now, sent_at, attempts) for i, t, p in messages])
        if not sending:
            self.changed.set()

    def _many(self, sql: str, rows: list[tuple], durable: bool = True) -> Any:
        """``executemany`` in one transaction (autocommit would sync once per row); under ``_lock``.
        ``durable=False`` skips the sync to disk for this commit: for bookkeeping whose loss in a
        power cut only means a message is sent again (send times, acknowledged deletions; the
        fleet de-duplicates); the next durable commit syncs it along with its own. (``NORMAL``,
        not ``OFF``: in WAL mode NORMAL cannot corrupt the database in a power cut, OFF can.)"""
        if not durable:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        finally:
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")
        return cur

    def due(self, resend_after: float, limit: int = 100) -> list[OutboxMessage]:
        """Messages never sent on this connection, or sent longer than ``resend_after`` ago."""
        cutoff = self.clock() - resend_after
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, topic, payload, sent_at, attempts FROM outbox "
                "WHERE sent_at IS NULL OR sent_at < ? ORDER BY seq LIMIT ?", (cutoff, limit)
            ).fetchall()
        return [OutboxMessage(*r) for r in rows]

    def mark_sent(self, seqs: Iterable[int]) -> None:
        now = self.clock()
        rows = [(now, s) for s in seqs]
        if not rows:
            return
        with self._lock:
            self._many("UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE seq = ?", rows, durable=False)

    def reset_sent(self) -> None:
        """After a reconnect everything unacknowledged is due again (the fleet de-duplicates)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET sent_at = NULL")
        self.changed.set()

    def ack(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        with self._lock:
            removed = (self._many("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids], durable=False).rowcount
                       if ids else 0)
        self.changed.set()
        return removed

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def full(self) -> bool:
        return len(self) >= self.max_messages

    def close(self) -> None:
        with self._lock:
            self._db.close()
