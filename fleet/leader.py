"""Which controller leads: one process at a time writes the fleet's state and talks to devices.

Two kinds of leadership, one per storage backend:

* :class:`FileLeadership` (SQLite, one machine): an exclusive ``flock`` on
  ``<state_dir>/controller.lock``. The kernel drops it the moment its process dies, and a
  stalled holder keeps it (so nobody else writes meanwhile).
* :class:`LeaseLeadership` (PostgreSQL, any number of machines): a row of the ``leader`` table
  with a holder, an expiry timed by the *database server's* clock, and an **epoch** that grows
  with every new holder. The leader renews the lease as the first statement of every engine
  transaction (:meth:`LeaseLeadership.fence`): an ``UPDATE`` that matches only while its epoch
  still holds the lease, and whose row lock keeps a standby from taking over until that
  transaction ends. So a former leader that stalled (SIGSTOP, a long GC pause, a partitioned
  network) and wakes after its lease lapsed finds its epoch gone and writes nothing: its
  transaction is rolled back before any of its changes. The engine's session has
  ``idle_in_transaction_session_timeout`` set to the lease period, so a leader stalled *inside*
  a transaction is disconnected by the server and cannot hold the row lock, and with it the
  lease, for ever. Standbys poll :meth:`LeaseLeadership.acquire`; when the lease has expired,
  one of them takes it with the next epoch (the database serialises the takeover).

Pitfalls this avoids (seen in other projects): session advisory locks die silently with a pooled
connection that is recycled, and a dead session can go unnoticed (split brain); a lease row
renewed in short transactions with an epoch that every write checks has neither problem.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sdk.errors import FleetError
from sdk.locks import ProcessLock

__all__ = ["FileLeadership", "LeaseLeadership", "LostLeadership", "Lease", "new_holder"]

LEASE_NAME = "controller"


class LostLeadership(FleetError):
    """This controller's lease lapsed and another took over (or the lease row is gone): it must
    stop writing and stand by."""


def new_holder() -> str:
    """A name for this controller process: host, pid and a random part (unique across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Lease:
    """The current lease as the database has it."""

    holder: str
    epoch: int
    expires_in: float  # seconds until it lapses (negative: lapsed)

    @property
    def live(self) -> bool:
        return self.expires_in > 0


class FileLeadership:
    """An exclusive ``flock`` on a lock file (:class:`sdk.locks.ProcessLock`): one controlling
    process per state directory."""

    epoch: Optional[int] = None

    def __init__(self, path: Path) -> None:
        self.lock = ProcessLock(path)

    @property
    def held(self) -> bool:
        return self.epoch is not None

    def acquire(self) -> bool:
        if self.lock.acquire():
            self.epoch = 1
        return self.held

    def fence(self, db: Any) -> None:
        """Nothing to check: the lock is held for as long as this process lives."""

    def prepare(self, db: Any) -> None:
        """Nothing to set on the engine's connection."""

    def holder(self) -> str:
        return "pid " + self.lock.holder()

    def held_elsewhere(self) -> bool:
        if self.held:
            return False
        probe = ProcessLock(self.lock.path)
        if probe.acquire():
            probe.release()
            return False
        return True

    def release(self) -> None:
        self.lock.release()
        self.epoch = None


class LeaseLeadership:
    """A lease in the ``leader`` table, timed by the database server (see the module docstring)."""

    def __init__(self, storage: Any, holder: str, *, ttl: float = 10.0) -> None:
        self.storage = storage
        self.me = holder
        self.ttl = float(ttl)
        self.epoch: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.epoch is not None

    def acquire(self) -> bool:
        """Take the lease when it is free or lapsed (a new epoch); True when this process leads."""
        with self.storage.connect() as db, db.transaction():
            now = db.server_time()
            row = db.one("SELECT holder, epoch, expires FROM leader WHERE name = ? FOR UPDATE", (LEASE_NAME,))
            if row is None:
                cur = db.execute("INSERT INTO leader (name, holder, epoch, expires, acquired) VALUES (?, ?, 1, ?, ?) "
                                 "ON CONFLICT (name) DO NOTHING", (LEASE_NAME, self.me, now + self.ttl, now))
                if cur.rowcount != 1:
                    return False
                self.epoch = 1
                return True
            if row["holder"] == self.me and row["epoch"] == self.epoch and row["expires"] > now:
                return True
            if row["expires"] > now:
                return False
            epoch = int(row["epoch"]) + 1
            db.execute("UPDATE leader SET holder = ?, epoch = ?, expires = ?, acquired = ? WHERE name = ?",
                       (self.me, epoch, now + self.ttl, now, LEASE_NAME))
            self.epoch = epoch
            return True

    def prepare(self, db: Any) -> None:
        """Configure the engine's own connection: the server ends it when it idles in a
        transaction for a lease period (a stalled leader must not keep the lease locked)."""
        db.limit_idle_transactions(self.ttl)

    def fence(self, db: Any) -> None:
        """The first statement of every engine transaction: renew the lease, and raise
        :class:`LostLeadership` when this epoch no longer holds it (nothing is written then)."""
        if self.epoch is None:
            raise LostLeadership("this controller does not lead")
        row = db.one("UPDATE leader SET expires = EXTRACT(EPOCH FROM clock_timestamp()) + ? WHERE name = ? AND "
                     "holder = ? AND epoch = ? AND expires >= EXTRACT(EPOCH FROM clock_timestamp()) RETURNING epoch",
                     (self.ttl, LEASE_NAME, self.me, self.epoch))
        if row is None:
            lost, self.epoch = self.epoch, None
            raise LostLeadership(f"the controller lease of epoch {lost} lapsed and another controller leads now")

    def current(self) -> Optional[Lease]:
        with self.storage.connect() as db:
            row = db.one("SELECT holder, epoch, expires - EXTRACT(EPOCH FROM clock_timestamp()) AS left_s "
                         "FROM leader WHERE name = ?", (LEASE_NAME,))
        return None if row is None else Lease(row["holder"], int(row["epoch"]), float(row["left_s"]))

    def holder(self) -> str:
        lease = self.current()
        return "nobody" if lease is None else f"{lease.holder} (epoch {lease.epoch})"

    def held_elsewhere(self) -> bool:
        lease = self.current()
        return lease is not None and lease.live and not (lease.holder == self.me and lease.epoch == self.epoch)

    def release(self) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait for it to lapse."""
        if self.epoch is None:
            return
        try:
            with self.storage.connect() as db:
                db.execute("UPDATE leader SET expires = 0 WHERE name = ? AND holder = ? AND epoch = ?",
                           (LEASE_NAME, self.me, self.epoch))
        finally:
            self.epoch = None
