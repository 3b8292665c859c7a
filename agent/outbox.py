"""The durable outbox: every result and install status waits on disk until the fleet acks it.

A PUBACK only means the broker has a message; the broker can still lose it (SIGKILL before its
autosave, a subscriber queue over ``max_queued_messages``) and paho keeps its QoS-1 state in
memory only. So each message is written to SQLite (WAL, ``synchronous=FULL``: it survives the
agent being killed and a power cut) before it is sent, re-sent after every reconnect and after
``resend_after`` seconds without an acknowledgement, and deleted only when the fleet's
application-level :class:`~sdk.protocol.Ack` names its id. The fleet de-duplicates by id.

The outbox is bounded: when ``max_messages`` are pending, :meth:`Outbox.put` raises
:class:`~sdk.errors.BackpressureError`, the agent stops accepting new work and says why; nothing
is ever dropped silently.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from sdk.errors import BackpressureError

__all__ = ["Outbox", "OutboxMessage"]


@dataclass
class OutboxMessage:
    seq: int
    id: str
    topic: str
    payload: bytes
    sent_at: Optional[float]
    attempts: int


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
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if count >= self.max_messages:
                raise BackpressureError(
                    f"the outbox holds {count} unacknowledged messages (outbox_max {self.max_messages}): "
                    "the fleet has not acknowledged results, so no new work is accepted until it does"
                )
            self._db.execute("INSERT OR IGNORE INTO outbox (id, topic, payload, created) VALUES (?, ?, ?, ?)",
                             (msg_id, topic, payload, self.clock()))
        self.changed.set()

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
        with self._lock:
            self._db.executemany("UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE seq = ?",
                                 [(now, s) for s in seqs])

    def reset_sent(self) -> None:
        """After a reconnect everything unacknowledged is due again (the fleet de-duplicates)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET sent_at = NULL")
        self.changed.set()

    def ack(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        with self._lock:
            cur = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            removed = cur.rowcount
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
