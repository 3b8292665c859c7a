"""Reassembling a task that travelled in pieces (:class:`~sdk.protocol.TaskPiece`), with bounded
memory: the device side of the protocol, shared by the agent and the simulated devices.

A task frame larger than the broker's packet limit is cut by the fleet into pieces
(:func:`sdk.protocol.split_task`). :class:`Reassembler` holds the pieces of each ``(task,
sha256)`` until all are there, checks the whole against its sha256 and returns it, to be
decoded as a :class:`~sdk.protocol.Task` like one that came whole. Nothing a peer sends can make
it hold more than it was told to:

* at most ``max_bytes`` declared (``total``) bytes of partial tasks at once, and at most
  ``max_tasks`` partial tasks: a piece of a task larger than ``max_bytes`` is refused, and one
  that would start a partial task beyond either cap discards the oldest partial tasks first (so
  pieces that never complete cannot block the tasks behind them);
* a piece whose ``count`` or ``total`` disagrees with the pieces already held for its task and
  sha256 (another cut of the bytes: pieces that would overlap) is refused, and so is one that
  brings other bytes for an index already held; an identical re-delivery (QoS 1) is ignored;
* a whole that does not match its sha256 is refused and discarded;
* a partial task not completed within ``timeout_s`` of its first piece is discarded
  (:meth:`Reassembler.expire`, also run on every piece).

Every refusal is a :class:`PieceRefused`; the receiver drops it and counts it, and the pieces
behind it are processed as usual. Every partial task discarded (evicted or timed out) is passed
to ``on_discard`` with the reason, for the same count.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import ProtocolError
from .protocol import TaskPiece

__all__ = ["PieceRefused", "Reassembler"]


class PieceRefused(ProtocolError):
    """A task piece that is not taken (the message says why); the receiver drops and counts it."""


@dataclass
class _Partial:
    count: int
    total: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Pieces in, whole task frames out; see the module docstring. Thread-safe."""

    def __init__(self, *, max_bytes: int = 64 << 20, max_tasks: int = 8, timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_discard: Callable[[str], None] = lambda why: None) -> None:
        if max_bytes < 1 or max_tasks < 1 or timeout_s <= 0:
            raise ValueError("a reassembler needs positive max_bytes, max_tasks and timeout_s")
        self.max_bytes, self.max_tasks, self.timeout_s, self.clock = max_bytes, max_tasks, timeout_s, clock
        self.on_discard = on_discard
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes reserved for partial tasks (their declared totals)."""
        with self._lock:
            return sum(p.total for p in self._partials.values())

    @property
    def pending(self) -> int:
        """Partial tasks held."""
        with self._lock:
            return len(self._partials)

    def expire(self) -> int:
        """Discard partial tasks older than ``timeout_s`` (each passed to ``on_discard``); return how many."""
        now = self.clock()
        with self._lock:
            old = [k for k, p in self._partials.items() if now - p.started > self.timeout_s]
            for k in old:
                del self._partials[k]
        for task, sha in old:
            self.on_discard(f"task {task} ({sha[:12]}): incomplete after {self.timeout_s:g} s, discarded")
        return len(old)

    def add(self, piece: TaskPiece) -> Optional[bytes]:
        """Take one piece; return the whole frame when it completes and matches its sha256, else
        None. Raises :class:`PieceRefused` for a piece that is not taken."""
        self.expire()
        key = (piece.task, piece.sha256)
        evicted: list[tuple[str, str]] = []
        try:
            with self._lock:
                partial = self._partials.get(key)
                if partial is None:
                    if piece.count == 1:
                        return self._verified(piece, piece.data)
                    if piece.total > self.max_bytes:
                        raise PieceRefused(f"task {piece.task}: {piece.total} bytes exceed the {self.max_bytes} bytes "
                                           "this device holds for reassembly: raise max_task_bytes")
                    while self._partials and (len(self._partials) >= self.max_tasks or piece.total + sum(
                            p.total for p in self._partials.values()) > self.max_bytes):
                        oldest = min(self._partials, key=lambda k: self._partials[k].started)
                        del self._partials[oldest]
                        evicted.append(oldest)
                    partial = self._partials[key] = _Partial(piece.count, piece.total, self.clock())
                else:
                    partial = self._check_consistent(piece, partial)
                have = partial.pieces.get(piece.index)
                if have is not None:
                    if have == piece.data:
                        return None  # a re-delivery
                    raise PieceRefused(f"task {piece.task}: piece {piece.index} came twice with different bytes; "
                                       "the first is kept")
                partial.pieces[piece.index] = piece.data
                if len(partial.pieces) < partial.count:
                    return None
                del self._partials[key]
        finally:
            for task, sha in evicted:
                self.on_discard(f"task {task} ({sha[:12]}): discarded to make room for task {piece.task} (at most "
                                f"{self.max_tasks} tasks and {self.max_bytes} bytes are held for reassembly)")
        whole = b"".join(partial.pieces[i] for i in range(partial.count))
        return self._verified(piece, whole)

    @staticmethod
    def _check_consistent(piece: TaskPiece, partial: _Partial) -> _Partial:
        if (piece.count, piece.total) != (partial.count, partial.total):
            raise PieceRefused(f"task {piece.task}: piece {piece.index} cuts it into {piece.count} pieces of "
                               f"{piece.total} bytes, its other pieces into {partial.count} of {partial.total}")
        return partial

    @staticmethod
    def _verified(piece: TaskPiece, whole: bytes) -> bytes:
        if len(whole) != piece.total or hashlib.sha256(whole).hexdigest() != piece.sha256:
            raise PieceRefused(f"task {piece.task}: the reassembled {len(whole)} bytes do not match its sha256 "
                               f"{piece.sha256[:12]}: discarded")
        return whole
