"""Delta updates, the fleet's side: which bundle each device holds, and the delta it gets.

A device reports the sha256 of every bundle it holds (:class:`~sdk.protocol.Status` ``bundles``,
and each SUCCEEDED :class:`~sdk.protocol.InstallStatus` names its bundle); the registry keeps
them in ``device_bundles``. When a rollout sends bundle T to a device that holds a bundle B of
the same model which the fleet also has, :meth:`DeltaPlanner.choose` offers the delta B → T in
the install command, but only when it is at most :data:`MAX_RATIO` of T's size (applying a
delta costs the device a decode and a read of its base, which a saving of a few bytes does
not repay: a bundle unrelated to its base gives a "delta" a few hundred bytes smaller than
itself, since only the zip's headers and manifest match). Each delta is made once per
(base, target, method) with :mod:`sdk.delta` (the agents' own apply code is its inverse), kept
in the bundle store under its own sha256 and recorded in ``deltas`` (also when it did not pay,
so it is not made again). A device on which a delta did not apply (its InstallStatus says
``fallback``) is recorded in ``delta_fallbacks`` and gets that target whole from then on.

Chunks of a delta are served like a bundle's, and only to a device that a running rollout of its
target is sending to (:func:`fleet.rollout.is_sending`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

from sdk import delta as delta_mod
from sdk import protocol as proto

from .bundlestore import BundleStore
from .storage import FleetDB

log = logging.getLogger("edgesdk.fleet.deltas")

__all__ = ["DeltaPlanner", "record_held", "held_bundles", "MAX_RATIO"]

#: a delta travels instead of its bundle only when at most this fraction of the bundle's size
MAX_RATIO = 0.9


def record_held(db: FleetDB, device: str, bundles: list[str], now: float, *, replace: bool) -> None:
    """Record that ``device`` holds ``bundles``; ``replace``: these are all it holds (a status)."""
    if replace:
        db.execute("DELETE FROM device_bundles WHERE device = ?", (device,))
    db.executemany("INSERT INTO device_bundles (device, sha256, at) VALUES (?, ?, ?) "
                   "ON CONFLICT (device, sha256) DO UPDATE SET at = excluded.at",
                   [(device, sha, now) for sha in bundles])


def held_bundles(db: FleetDB, device: str) -> list[str]:
    """The sha256s of the bundles ``device`` last reported holding."""
    return [r["sha256"] for r in db.all("SELECT sha256 FROM device_bundles WHERE device = ? ORDER BY sha256", (device,))]


#: the methods the fleet makes, each pair's smallest is offered (bsdiff4: larger and slower, see bench/delta_bench.py)
METHODS = ("zstd-zip", "zstd")


class DeltaPlanner:
    """Makes, caches and chooses deltas with ``methods`` (of :data:`sdk.delta.METHODS`)."""

    def __init__(self, store: BundleStore, methods: tuple[str, ...] = METHODS, *, enabled: bool = True) -> None:
        unknown = [m for m in methods if m not in proto.DELTA_METHODS]
        if unknown:
            raise ValueError(f"unknown delta method {unknown[0]!r}: use one of {', '.join(proto.DELTA_METHODS)}")
        self.store = store
        self.methods = tuple(m for m in methods if delta_mod.available(m))
        self.enabled = enabled and bool(self.methods)

    def delta(self, db: FleetDB, base: str, target: str, now: float, method: str = delta_mod.DEFAULT_METHOD
              ) -> Optional[dict[str, Any]]:
        """The recorded ``method`` delta ``base`` → ``target`` (made now when it never was):
        ``{sha256, size, full_size}``; None when either bundle is not in the store or the delta
        cannot be made (recorded as a delta as big as the bundle, so it is not tried again)."""
        row = db.one("SELECT sha256, size, full_size FROM deltas WHERE base = ? AND target = ? AND method = ?",
                     (base, target, method))
        if row is not None:
            return dict(row)
        try:
            old, new = self.store.read(base, db), self.store.read(target, db)
        except OSError:
            return None
        try:
            blob = delta_mod.make_delta(old, new, method)
        except delta_mod.DeltaError as exc:
            log.warning("no %s delta %.12s -> %.12s: %s", method, base, target, exc)
            blob = b""
        sha = hashlib.sha256(blob).hexdigest()
        size = len(blob) if blob else len(new)
        if blob and len(blob) < len(new):
            self.store.put_delta(sha, blob, db)
        db.execute("INSERT INTO deltas (base, target, method, sha256, size, full_size, made) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (base, target, method) DO NOTHING",
                   (base, target, method, sha, size, len(new), now))
        log.info("%s delta %.12s -> %.12s: %d bytes (the bundle: %d)", method, base, target, size, len(new))
        if not blob:
            return None
        return {"sha256": sha, "size": size, "full_size": len(new)}

    def bases(self, db: FleetDB, device: str, target: str, model: str) -> list[str]:
        """Bundles of ``model`` that ``device`` holds and the fleet has, newest first (not ``target``)."""
        rows = db.all("SELECT b.sha256 FROM device_bundles h JOIN bundles b ON b.sha256 = h.sha256 "
                      "WHERE h.device = ? AND b.model = ? AND b.sha256 != ? ORDER BY b.added DESC",
                      (device, model, target))
        return [r["sha256"] for r in rows]

    def choose(self, db: FleetDB, device: str, target: str, model: str, now: float) -> Optional[dict[str, Any]]:
        """The ``delta`` field of an install command of ``target`` for ``device``: the smallest
        delta from a bundle it holds, when that is at most :data:`MAX_RATIO` of ``target``; else
        None (send it whole)."""
        if not self.enabled or db.one("SELECT 1 FROM delta_fallbacks WHERE device = ? AND target = ?",
                                      (device, target)) is not None:
            return None
        best: Optional[dict[str, Any]] = None
        for base in self.bases(db, device, target, model):
            for method in self.methods:
                d = self.delta(db, base, target, now, method)
                if d is None or d["size"] > MAX_RATIO * d["full_size"] or (best is not None and d["size"] >= best["size"]):
                    continue
                if d["sha256"] in (base, target):
                    continue
                best = {"method": method, "base_sha256": base, "sha256": d["sha256"], "size": d["size"]}
        return best

    def prepare(self, db: FleetDB, target: str, model: str, devices: list[str], now: float) -> int:
        """Make every delta a rollout of ``target`` to ``devices`` may send (at deploy time, so
        the fleet's engine finds them made); how many bases there were."""
        if not self.enabled:
            return 0
        bases = {b for d in devices for b in self.bases(db, d, target, model)}
        for base in sorted(bases):
            for method in self.methods:
                self.delta(db, base, target, now, method)
        return len(bases)

    @staticmethod
    def record_fallback(db: FleetDB, device: str, target: str, reason: str, now: float) -> None:
        """``device`` could not use a delta of ``target``: it gets ``target`` whole from now on."""
        db.execute("INSERT INTO delta_fallbacks (device, target, reason, at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (device, target) DO UPDATE SET reason = excluded.reason, at = excluded.at",
                   (device, target, reason[:500], now))
