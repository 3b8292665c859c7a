"""The on-device model store: versions on disk and an atomic ``active`` pointer per model.

Layout under ``<state_dir>/models``::

    <name>/<version>/bundle.edgebundle    the verified bundle, as received
    <name>/active.json                    {"version": "2", "previous": "1"}

``active.json`` is replaced with write-to-temp + fsync + ``os.replace`` (atomic on POSIX), so a
power cut leaves either the old or the new pointer, never a torn one. The previous version is
kept for rollback; older ones are pruned. On restart the agent loads every active version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from sdk.errors import InstallError

__all__ = ["ModelStore"]

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
BUNDLE_FILE = "bundle.edgebundle"


def _check(kind: str, value: str) -> str:
    if not _SAFE.match(value) or value in (".", ".."):
        raise InstallError(f"model {kind} {value!r} may only contain letters, digits, '.', '_' and '-'")
    return value


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ModelStore:
    def __init__(self, state_dir: os.PathLike | str) -> None:
        self.root = Path(state_dir) / "models"
        self.root.mkdir(parents=True, exist_ok=True)

    def bundle_path(self, name: str, version: str) -> Path:
        return self.root / _check("name", name) / _check("version", version) / BUNDLE_FILE

    def stage(self, name: str, version: str, bundle: bytes) -> Path:
        """Store a bundle's bytes for ``name@version`` (not active yet)."""
        path = self.bundle_path(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, bundle)
        return path

    def _pointer(self, name: str) -> dict[str, Optional[str]]:
        p = self.root / _check("name", name) / "active.json"
        if not p.exists():
            return {"version": None, "previous": None}
        return json.loads(p.read_text())

    def active(self, name: str) -> Optional[str]:
        return self._pointer(name)["version"]

    def previous(self, name: str) -> Optional[str]:
        return self._pointer(name)["previous"]

    def activate(self, name: str, version: str, *, previous: Optional[str] = "keep") -> None:
        """Point ``name`` at ``version``; the version it replaces becomes ``previous``."""
        if not self.bundle_path(name, version).exists():
            raise InstallError(f"{name}@{version} is not in the store")
        current = self.active(name)
        prev = current if previous == "keep" else previous
        if prev == version:
            prev = self.previous(name)
        pointer = {"version": version, "previous": prev}
        _atomic_write(self.root / name / "active.json", json.dumps(pointer).encode())
        self.prune(name)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "active.json").exists())

    def versions(self, name: str) -> list[str]:
        d = self.root / _check("name", name)
        return sorted(p.name for p in d.iterdir() if (p / BUNDLE_FILE).exists()) if d.exists() else []

    def prune(self, name: str) -> None:
        """Keep only the active and previous versions of ``name``."""
        keep = {v for v in (self.active(name), self.previous(name)) if v}
        for version in self.versions(name):
            if version not in keep:
                shutil.rmtree(self.root / name / version, ignore_errors=True)

    def describe(self) -> list[dict[str, Optional[str]]]:
        return [
            {"name": n, "active": self.active(n), "previous": self.previous(n), "versions": ",".join(self.versions(n))}
            for n in self.names()
        ]
