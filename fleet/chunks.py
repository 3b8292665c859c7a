"""Serving bundle chunks: each bundle is split and framed once, then every device's request is
answered from the same encoded payloads (sending a bundle to 1,000 devices costs one split).

Which requests deserve an answer is the fleet's decision (only a bundle that an active rollout
is sending to the asking device, see :meth:`fleet.rollout.RolloutController.is_sending`); this
cache reads bundles only through :class:`~fleet.bundlestore.BundleStore`, the one place where a
digest becomes a path."""

from __future__ import annotations

from typing import Iterable, Optional

from sdk import protocol as proto

from .bundlestore import BundleStore
from .storage import FleetDB

__all__ = ["ChunkCache"]


class ChunkCache:
    def __init__(self, store: BundleStore, max_bundles: int = 8) -> None:
        self.store = store
        self._payloads: dict[str, list[bytes]] = {}
        self.max_bundles = max_bundles
        self.splits = 0  # how many times a bundle was split and framed (a benchmark figure)

    def payloads(self, sha256: str, db: Optional[FleetDB] = None) -> list[bytes]:
        """Every framed chunk of bundle ``sha256`` (OSError or ProtocolError when the store lacks
        it); ``db``: read through this connection (the engine's)."""
        cached = self._payloads.get(sha256)
        if cached is None:
            data = self.store.read(sha256, db)
            cached = [c.to_payload() for c in proto.split_bundle(data)]
            self.splits += 1
            if len(self._payloads) >= self.max_bundles:
                self._payloads.pop(next(iter(self._payloads)))
            self._payloads[sha256] = cached
        return cached

    def requested(self, sha256: str, indices: Iterable[int], db: Optional[FleetDB] = None) -> list[bytes]:
        """The framed chunks a :class:`~sdk.protocol.ChunkRequest` asks for (bad indices skipped)."""
        payloads = self.payloads(sha256, db)
        wanted = {i for i in indices if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(payloads)}
        return [payloads[i] for i in sorted(wanted)]
