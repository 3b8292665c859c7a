"""Receiving a bundle in chunks, resumable across disconnects and agent restarts.

Each chunk (at most 128 KiB) is checked against its own sha256 and its expected length, and
written to ``<state_dir>/transfers/<bundle sha256>/<index>.part``; what is on disk is what the
agent has, so after a disconnect or a restart it asks only for the missing indices. When every
chunk is there the bundle is reassembled and checked against the whole-bundle sha256 before it
goes to the installer; a mismatch discards the transfer.

Everything here comes from an install command, that is from the network, so:

* every path is built through :func:`sdk.paths.confined` (the transfer directory from the
  command's ``bundle_sha256``, part files from chunk indices): a hostile sha256 such as
  ``"../../" + "./" * 29`` raises :class:`~sdk.errors.ProtocolError` instead of naming a
  directory outside the state dir, and discarding a transfer only ever removes its own files;
* before anything is written, :meth:`Transfer.open` refuses a bundle larger than the agent's
  ``max_bundle_bytes``, a command cutting it into more than :data:`MAX_CHUNKS` chunks, and a
  bundle the free space under the state dir cannot hold (the chunks, the reassembled copy the
  store keeps, and :data:`~agent.store.SPARE_BYTES`), each with an :class:`~sdk.errors.InstallError`
  saying what to do;
* :attr:`Transfer.lock` serialises adding chunks with reassembling and discarding, so a chunk
  delivered late never writes into a directory being removed.

Which chunks to ask for next is :attr:`Transfer.window` (:class:`sdk.chunkflow.ChunkWindow`, shared
with the simulated devices, as are the chunk and whole-blob checks): at most the install command's
``window`` chunks are requested and not yet received at any time.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from sdk.chunkflow import ChunkWindow, blob_matches, chunk_fits, chunk_length
from sdk.errors import InstallError
from sdk.paths import confined
from sdk.protocol import MAX_CHUNKS, Chunk, InstallCommand

from .store import SPARE_BYTES

__all__ = ["Transfer", "MAX_CHUNKS"]

_PART, _TMP = ".part", ".tmp"


class Transfer:
    """One bundle being received: its directory, the chunk indices held, and a lock."""

    def __init__(self, state_dir: os.PathLike | str, command: InstallCommand) -> None:
        """The transfer of ``command``'s bundle; raises ProtocolError for a sha256 that is not a plain
        name inside ``<state_dir>/transfers``. Nothing is written (see :meth:`open`)."""
        self.command = command
        self.state_dir = Path(state_dir)
        self.dir = confined(self.state_dir / "transfers", command.bundle_sha256)
        self.lock = threading.Lock()
        self.closed = False  # discarded: no chunk is written any more
        self._held = self._scan()
        #: what to request next: the missing chunks, at most ``command.window`` outstanding
        self.window = ChunkWindow(self.count, command.window, self._held)

    @classmethod
    def open(cls, state_dir: os.PathLike | str, command: InstallCommand, *, max_bundle_bytes: int,
             reserved_bytes: int = 0) -> "Transfer":
        """Check the command against the limits and the free disk (less ``reserved_bytes`` that other
        running transfers still need), then create the directory."""
        transfer = cls(state_dir, command)
        transfer.check_limits(max_bundle_bytes)
        transfer.check_space(reserved_bytes)
        transfer.dir.mkdir(parents=True, exist_ok=True)
        return transfer

    @property
    def count(self) -> int:
        return self.command.chunks

    def _part(self, index: int, suffix: str = _PART) -> Path:
        return confined(self.dir, str(index), suffix=suffix)

    def _scan(self) -> set[int]:
        """Indices of the part files already on disk (an earlier run's), read once."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return set()
        held = set()
        for name in names:
            stem, dot, ext = name.partition(".")
            if dot and ext == _PART[1:] and stem.isdigit() and int(stem) < self.count:
                held.add(int(stem))
        return held

    def held_bytes(self) -> int:
        return sum(chunk_length(self.command, i) for i in self._held)

    def check_limits(self, max_bundle_bytes: int) -> None:
        """Refuse a bundle over ``max_bundle_bytes`` or cut into more than :data:`MAX_CHUNKS` chunks."""
        cmd = self.command
        if cmd.bundle_size > max_bundle_bytes:
            raise InstallError(
                f"bundle of {cmd.bundle_size} bytes exceeds this agent's max_bundle_bytes ({max_bundle_bytes}): "
                "raise max_bundle_bytes in the agent's config or install a smaller bundle")
        if self.count > MAX_CHUNKS:
            raise InstallError(
                f"bundle of {cmd.bundle_size} bytes in chunks of {cmd.chunk_size} makes {self.count} chunks, more "
                f"than the {MAX_CHUNKS} an agent takes: send it in larger chunks")

    def needed_bytes(self) -> int:
        """Disk this transfer still needs: the chunks to come and the copy the model store keeps."""
        return (self.command.bundle_size - self.held_bytes()) + self.command.bundle_size

    def check_space(self, reserved_bytes: int = 0) -> None:
        """Refuse a transfer the free space under the state dir cannot hold: the chunks still to come,
        the copy the model store keeps and a spare margin, beside what other transfers reserve."""
        size = self.command.bundle_size
        need = self.needed_bytes() + SPARE_BYTES + reserved_bytes
        free = shutil.disk_usage(self.state_dir).free
        if free < need:
            others = f", {reserved_bytes} for other transfers" if reserved_bytes else ""
            raise InstallError(
                f"not enough disk: {free} bytes free under {self.state_dir}, the bundle needs {need} "
                f"({size - self.held_bytes()} for its chunks, {size} for the installed copy, {SPARE_BYTES} spare"
                f"{others}): free up space on the device or install a smaller bundle")

    def missing(self) -> list[int]:
        held = self._held
        return [i for i in range(self.count) if i not in held]

    def add(self, chunk: Chunk) -> bool:
        """Store one chunk (idempotent); False when it is not for this transfer, has the wrong length,
        is corrupt, or arrives after the transfer was discarded."""
        if not chunk_fits(self.command, chunk):
            return False
        with self.lock:
            if self.closed:
                return False
            if chunk.index not in self._held:
                path, tmp = self._part(chunk.index), self._part(chunk.index, _TMP)
                tmp.write_bytes(chunk.data)
                os.replace(tmp, path)
                self._held.add(chunk.index)
        self.window.received(chunk.index)
        return True

    @property
    def complete(self) -> bool:
        return len(self._held) == self.count

    def assemble(self) -> bytes:
        """The whole bundle, checked against its size and sha256; a mismatch discards the transfer."""
        with self.lock:
            try:
                data = b"".join(self._part(i).read_bytes() for i in range(self.count))
            except OSError as exc:
                self._discard_locked()
                raise InstallError(f"a chunk of the bundle went missing on disk ({exc.strerror or exc}): "
                                   "the transfer was discarded and will start over") from exc
            if not blob_matches(self.command, data):
                self._discard_locked()
                raise InstallError(
                    f"reassembled bundle does not match its sha256 ({len(data)} of {self.command.bundle_size} bytes): "
                    "the transfer was discarded and will start over"
                )
            return data

    def discard(self) -> None:
        """Remove this transfer's directory (only ever ``<state_dir>/transfers/<sha256>``)."""
        with self.lock:
            self._discard_locked()

    def _discard_locked(self) -> None:
        self.closed = True
        self._held.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
