"""The device side of a chunked transfer, shared by the agent and the simulated devices: which
chunks to ask for now (a window), and whether a chunk and the whole are what was announced.

A transfer is "the chunks of blob ``sha256``/``size`` cut at ``chunk_size``": the
:class:`~sdk.protocol.InstallCommand` that names the blob says which (a full bundle, or a delta
against a bundle the device holds; what happens after assembly is not this module's business).

Flow control is pipelined, not request-response: the device keeps at most ``window`` chunks
requested and not yet received (:class:`ChunkWindow`), and asks for more as soon as half of the
window has arrived, so the fleet's next chunks are already on their way while the device checks
the ones it has. The window is what keeps a slow device, or the broker's queue for its
connection (Mosquitto drops QoS-1 messages beyond ``max_queued_messages``, 1000 by default),
from being overrun. A chunk that does not arrive (lost, or the fleet did not answer) is asked
for again when the transfer has made no progress for a while (the caller's watchdog calls
:meth:`ChunkWindow.restart`); a resumed transfer asks only for the indices it does not hold.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from typing import Iterable, Optional

from .protocol import Chunk, InstallCommand

__all__ = ["ChunkWindow", "HashMemo", "chunk_length", "chunk_fits", "blob_matches"]


class HashMemo:
    """Bytes whose sha256 this process has already checked, so bytes equal to them need not be
    hashed again (a comparison is ~20x cheaper than sha256).

    For the simulator, whose many devices share one process and one CPU where real devices each
    hash on their own: with a memo, the second simulated device receiving a chunk compares it
    with the bytes the first one verified, and anything that differs (corrupt, forged) is hashed
    and refused as usual. An agent verifies everything itself and passes no memo. Bounded to
    ``max_bytes``; when full it starts over."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._known: dict[str, bytes] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0  # checks answered by comparison (benchmarks report it)

    def check(self, data: bytes, sha256: str) -> bool:
        """Whether ``data`` has the sha256 ``sha256``."""
        known = self._known.get(sha256)
        # bytes.startswith compares buffers with memcmp (`bytes == memoryview` goes item by item)
        if known is not None and len(known) == len(data) and known.startswith(data):
            self.hits += 1
            return True
        if hashlib.sha256(data).hexdigest() != sha256:
            return False
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                self._known.clear()
                self._bytes = 0
            if len(data) <= self.max_bytes and sha256 not in self._known:
                self._known[sha256] = bytes(data)
                self._bytes += len(data)
        return True


def _sha256_is(data: bytes, sha256: str, memo: Optional[HashMemo]) -> bool:
    return memo.check(data, sha256) if memo is not None else hashlib.sha256(data).hexdigest() == sha256


def chunk_length(command: InstallCommand, index: int) -> int:
    """The length chunk ``index`` of ``command``'s blob must have (the last one may be short)."""
    count, step = command.chunks, command.chunk_size
    return step if index < count - 1 else command.bundle_size - step * (count - 1)


def chunk_fits(command: InstallCommand, chunk: Chunk, memo: Optional[HashMemo] = None) -> bool:
    """Whether ``chunk`` belongs to ``command``'s blob: same blob and count, an index in range, the
    expected length, and data matching the chunk's sha256 (the whole is checked by
    :func:`blob_matches` once every chunk is there). ``memo``: see :class:`HashMemo`."""
    if chunk.bundle_sha256 != command.bundle_sha256 or chunk.count != command.chunks:
        return False
    if not 0 <= chunk.index < command.chunks or len(chunk.data) != chunk_length(command, chunk.index):
        return False
    return _sha256_is(chunk.data, chunk.sha256, memo)


def blob_matches(command: InstallCommand, data: bytes, memo: Optional[HashMemo] = None) -> bool:
    """Whether reassembled ``data`` is the blob ``command`` names (its size and sha256)."""
    return len(data) == command.bundle_size and _sha256_is(data, command.bundle_sha256, memo)


class ChunkWindow:
    """Which chunks of one transfer to request, at most ``window`` outstanding at a time.

    ``held`` are the indices already on hand (a resumed transfer's). :meth:`take` returns the
    indices to ask for now (none while more than half of the window is still outstanding, so
    requests go out in batches of at least half a window); :meth:`received` records an arrival;
    :meth:`restart` forgets what is outstanding (after a reconnect, a new fleet session or a
    stall: those chunks may never come) so the next :meth:`take` asks for them again, first.
    Thread-safe: chunks arrive on the MQTT worker while a watchdog looks for stalls.
    """

    def __init__(self, count: int, window: int, held: Iterable[int] = ()) -> None:
        if count < 1 or window < 1:
            raise ValueError("a chunk window needs count >= 1 and window >= 1")
        self.count = count
        self.window = window
        self._done = {i for i in held if 0 <= i < count}
        self._pending: deque[int] = deque(i for i in range(count) if i not in self._done)
        self._outstanding: dict[int, None] = {}  # requested and not received, in request order
        self._lock = threading.Lock()
        self.requested = 0  # indices asked for so far, re-requests included (tests, benchmarks)

    @property
    def outstanding(self) -> int:
        """Chunks requested and not yet received: never more than :attr:`window`."""
        return len(self._outstanding)

    @property
    def complete(self) -> bool:
        return len(self._done) == self.count

    def received(self, index: int) -> bool:
        """Record chunk ``index`` as held; False when it was held already (a duplicate)."""
        with self._lock:
            self._outstanding.pop(index, None)
            if index in self._done or not 0 <= index < self.count:
                return False
            self._done.add(index)
            return True

    def take(self) -> list[int]:
        """The indices to request now (ascending), already counted as outstanding."""
        with self._lock:
            if len(self._outstanding) > self.window // 2:
                return []
            picked = []
            while self._pending and len(self._outstanding) < self.window:
                i = self._pending.popleft()
                if i in self._done or i in self._outstanding:
                    continue
                self._outstanding[i] = None
                picked.append(i)
            self.requested += len(picked)
            return sorted(picked)

    def restart(self) -> None:
        """Presume every outstanding chunk lost: they are requested again, before the others."""
        with self._lock:
            lost = [i for i in self._outstanding if i not in self._done]
            self._outstanding.clear()
            self._pending.extendleft(reversed(lost))
