"""Receiving a bundle in chunks, resumable across disconnects and agent restarts.

Each chunk (at most 128 KiB) is checked against its own sha256 and written to
``<state_dir>/transfers/<bundle sha256>/<index>.part``; what is on disk is what the agent has, so
after a disconnect or a restart it asks only for the missing indices. When every chunk is there
the bundle is reassembled and checked against the whole-bundle sha256 before it goes to the
installer; a mismatch discards the transfer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from sdk.errors import InstallError
from sdk.protocol import Chunk, InstallCommand

__all__ = ["Transfer"]


class Transfer:
    def __init__(self, state_dir: os.PathLike | str, command: InstallCommand) -> None:
        self.command = command
        self.dir = Path(state_dir) / "transfers" / command.bundle_sha256
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def count(self) -> int:
        return self.command.chunks

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not (self.dir / f"{i}.part").exists()]

    def add(self, chunk: Chunk) -> bool:
        """Store one chunk (idempotent); False when it is not for this transfer or is corrupt."""
        if chunk.bundle_sha256 != self.command.bundle_sha256 or chunk.count != self.count:
            return False
        if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
            return False
        path = self.dir / f"{chunk.index}.part"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(chunk.data)
            os.replace(tmp, path)
        return True

    @property
    def complete(self) -> bool:
        return not self.missing()

    def assemble(self) -> bytes:
        data = b"".join((self.dir / f"{i}.part").read_bytes() for i in range(self.count))
        if len(data) != self.command.bundle_size or hashlib.sha256(data).hexdigest() != self.command.bundle_sha256:
            self.discard()
            raise InstallError(
                f"reassembled bundle does not match its sha256 ({len(data)} of {self.command.bundle_size} bytes): "
                "the transfer was discarded and will start over"
            )
        return data

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
