"""One process at a time on a state directory: an exclusive ``flock`` on a lock file.

The kernel releases a ``flock`` when its holder exits, however it exits (SIGKILL, power cut:
the file stays, the lock does not), so a stale lock never blocks anyone. The holder's pid is
written into the file for the messages of those who find it held.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["ProcessLock"]


class ProcessLock:
    """An exclusive ``flock`` on ``path`` (created when missing)."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self, *, blocking: bool = False) -> bool:
        """Take the lock; without ``blocking``, return False at once when another process holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the process holding (or that last held) the lock, or ``?``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ProcessLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
