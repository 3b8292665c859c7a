"""The fleet's bundle store: every bundle a rollout sends, and every delta made between two of
them, by sha256, in the storage backend's blob store (files beside a SQLite database, rows of a
PostgreSQL one: :mod:`fleet.storage`).

The sha256 that names a bundle arrives in messages too (a device's chunk request names the
bundle it wants). The blob stores refuse a name that is not one plain name
(:func:`fleet.storage._check_blob`), and the file-backed one turns names into paths only
through :func:`sdk.paths.confined` (``tests/sdk/test_paths.py`` scans it for any other way of
joining paths).
"""

from __future__ import annotations

from typing import Optional

from .storage import Blobs, FleetDB

__all__ = ["BundleStore"]


class BundleStore:
    """Bundles and deltas by sha256 in ``blobs``."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs

    def put(self, sha256: str, data: bytes, db: Optional[FleetDB] = None) -> None:
        """Keep ``data`` as bundle ``sha256`` (a bundle that is there already is kept)."""
        self.blobs.put("bundle", sha256, data, db)

    def read(self, sha256: str, db: Optional[FleetDB] = None) -> bytes:
        """The bytes of bundle ``sha256``, or of the delta ``sha256`` (chunks are served from
        either); OSError when the store holds neither, ProtocolError for a digest that cannot
        name a blob."""
        try:
            return self.blobs.get("bundle", sha256, db)
        except FileNotFoundError:
            return self.blobs.get("delta", sha256, db)

    def put_delta(self, sha256: str, data: bytes, db: Optional[FleetDB] = None) -> None:
        """Keep ``data`` as delta ``sha256``, beside the bundles."""
        self.blobs.put("delta", sha256, data, db)
