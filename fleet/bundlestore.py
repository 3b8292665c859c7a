"""The fleet's bundle store: every bundle a rollout sends, kept as ``<root>/<sha256>.edgebundle``,
and every delta made between two of them, as ``<root>/<delta sha256>.delta``.

The sha256 that names a file arrives in messages too (a device's chunk request names the bundle
it wants), so this module is the one place where the fleet turns a bundle digest into a path,
and it does so only through :func:`sdk.paths.confined`: a digest that is not one plain name,
or that would lead out of the store, is refused with :class:`~sdk.errors.ProtocolError`.
(``tests/sdk/test_paths.py`` scans this module for any other way of joining paths.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from sdk.bundle import BUNDLE_SUFFIX
from sdk.paths import confined

__all__ = ["BundleStore", "DELTA_SUFFIX"]

#: a delta between two bundles, named by its own sha256 (see :mod:`fleet.deltas`)
DELTA_SUFFIX = ".delta"


class BundleStore:
    """Bundles by sha256 under ``root`` (created on the first :meth:`put`)."""

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where the bundle ``sha256`` lives (ProtocolError for a digest that cannot name a file)."""
        return confined(self.root, sha256, suffix=BUNDLE_SUFFIX)

    def put(self, sha256: str, data: bytes) -> Path:
        """Keep ``data`` as bundle ``sha256`` (atomically: written aside, then renamed); its path."""
        target = self.path(sha256)
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = confined(self.root, sha256, suffix=".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return target

    def read(self, sha256: str) -> bytes:
        """The bytes of bundle ``sha256``, or of the delta ``sha256`` (a blob chunks are served
        from either way); OSError when the store holds neither."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return self.delta_path(sha256).read_bytes()

    def delta_path(self, sha256: str) -> Path:
        """Where the delta blob ``sha256`` lives (ProtocolError for a digest that cannot name a file)."""
        return confined(self.root, sha256, suffix=DELTA_SUFFIX)

    def put_delta(self, sha256: str, data: bytes) -> Path:
        """Keep ``data`` as delta ``sha256`` (atomically), beside the bundles; its path."""
        target = self.delta_path(sha256)
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = confined(self.root, sha256, suffix=".delta-tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return target
