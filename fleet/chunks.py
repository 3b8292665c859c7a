"""Serving bundle chunks: each bundle is split and framed once, then every device's request is
answered from the same encoded payloads (sending a bundle to 1,000 devices costs one split)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from sdk import protocol as proto

__all__ = ["ChunkCache"]


class ChunkCache:
    def __init__(self, locate: Callable[[str], Path], max_bundles: int = 8) -> None:
        self._locate = locate  # bundle sha256 -> path of the bundle file
        self._payloads: dict[str, list[bytes]] = {}
        self.max_bundles = max_bundles
        self.splits = 0  # how many times a bundle was split and framed (a benchmark figure)

    def payloads(self, sha256: str) -> list[bytes]:
        cached = self._payloads.get(sha256)
        if cached is None:
            data = self._locate(sha256).read_bytes()
            cached = [c.to_payload() for c in proto.split_bundle(data)]
            self.splits += 1
            if len(self._payloads) >= self.max_bundles:
                self._payloads.pop(next(iter(self._payloads)))
            self._payloads[sha256] = cached
        return cached

    def requested(self, sha256: str, indices: Iterable[int]) -> list[bytes]:
        """The framed chunks a :class:`~sdk.protocol.ChunkRequest` asks for (bad indices skipped)."""
        payloads = self.payloads(sha256)
        return [payloads[i] for i in sorted(set(indices)) if 0 <= i < len(payloads)]
