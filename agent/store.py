"""The on-device model store: versions on disk and an atomic ``active`` pointer per model.

Layout under ``<state_dir>/models``::

    <name>/<version>/bundle.edgebundle    the verified bundle, as received
    <name>/<version>/bundle.sha256        its sha256 (written by the agent: the index of delta bases)
    <name>/active.json                    {"version": "2", "previous": "1"}
    .last-install.json                    the last install's outcome (``edgesdk agent status``)

``active.json`` is replaced with write-to-temp + fsync + ``os.replace`` (atomic on POSIX), so a
power cut leaves either the old or the new pointer, never a torn one. The previous version is
kept for rollback; older ones are pruned. On restart the agent loads every active version.
The last install record starts with a dot, so no model (names start with a letter or digit) can
be called that.

Names and versions come from bundles and from commands, so every path built from one goes
through :func:`sdk.paths.confined` (one plain name, resolving inside ``models``); anything else
is an :class:`~sdk.errors.InstallError` naming the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from sdk.errors import InstallError, ProtocolError
from sdk.paths import SAFE_NAME, confined

__all__ = ["ModelStore", "SPARE_BYTES"]

#: free disk the agent keeps beyond what an install writes (SQLite outbox, logs, the next pointer)
SPARE_BYTES = 16 << 20
_SHA_FILE = "bundle.sha256"
_LAST_INSTALL = ".last-install.json"


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

    def _dir(self, name: str, version: Optional[str] = None) -> Path:
        """``models/<name>`` or ``models/<name>/<version>``, confined to the store."""
        parts = (name,) if version is None else (name, version)
        try:
            return confined(self.root, *parts)
        except ProtocolError as exc:
            for kind, value in (("name", name), ("version", version)):
                if value is not None and not (isinstance(value, str) and SAFE_NAME.fullmatch(value)):
                    raise InstallError(f"model {kind} {value!r} may only contain letters, digits, '.', '_' and '-' "
                                       "(at most 128, starting with a letter or digit)") from exc
            raise InstallError(f"{name}@{version or ''}: {exc}") from exc

    def _pointer_file(self, name: str) -> Path:
        return self._dir(name) / "active.json"

    def bundle_path(self, name: str, version: str) -> Path:
        return self._dir(name, version) / "bundle.edgebundle"

    def stage(self, name: str, version: str, bundle: bytes) -> Path:
        """Store a bundle's bytes for ``name@version`` (not active yet), and its sha256 beside it."""
        path = self.bundle_path(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, bundle)
        _atomic_write(path.with_name(_SHA_FILE), hashlib.sha256(bundle).hexdigest().encode())
        return path

    def _sha256_of(self, name: str, version: str) -> Optional[str]:
        """The recorded sha256 of a stored bundle (hashed and recorded when a store made before the
        record has none); None when the bundle is gone."""
        path = self.bundle_path(name, version)
        record = path.with_name(_SHA_FILE)
        try:
            text = record.read_text().strip()
            if len(text) == 64:
                return text
        except OSError:
            pass
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        try:
            _atomic_write(record, digest.encode())
        except OSError:
            pass
        return digest

    def held(self) -> dict[str, tuple[str, str]]:
        """``{sha256: (name, version)}`` of every bundle in the store: what the device can take a
        delta against (the status reports these sha256s to the fleet)."""
        out: dict[str, tuple[str, str]] = {}
        for name in self.names():
            for version in self.versions(name):
                digest = self._sha256_of(name, version)
                if digest:
                    out[digest] = (name, version)
        return out

    def find(self, name: str, sha256: str) -> Optional[bytes]:
        """The bytes of the stored bundle of model ``name`` whose sha256 is ``sha256``, or None.
        Looked up by digest among this model's own versions (never a path from the network),
        and the bytes read are hashed again, so a record that lies finds nothing."""
        for version in self.versions(name):
            if self._sha256_of(name, version) != sha256:
                continue
            try:
                data = self.bundle_path(name, version).read_bytes()
            except OSError:
                return None
            return data if hashlib.sha256(data).hexdigest() == sha256 else None
        return None

    def _pointer(self, name: str) -> dict[str, Optional[str]]:
        p = self._pointer_file(name)
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
        _atomic_write(self._pointer_file(name), json.dumps(pointer).encode())
        self.prune(name)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "active.json").exists())

    def versions(self, name: str) -> list[str]:
        d = self._dir(name)
        return sorted(p.name for p in d.iterdir() if (p / "bundle.edgebundle").exists()) if d.exists() else []

    def prune(self, name: str) -> None:
        """Keep only the active and previous versions of ``name``."""
        keep = {v for v in (self.active(name), self.previous(name)) if v}
        for version in self.versions(name):
            if version not in keep:
                shutil.rmtree(self._dir(name, version), ignore_errors=True)

    def record_install(self, record: dict[str, Any]) -> None:
        """Keep ``record`` (model, version, outcome, reason, when, how) as the last install."""
        _atomic_write(self.root / _LAST_INSTALL, json.dumps(record, sort_keys=True).encode())

    def last_install(self) -> Optional[dict[str, Any]]:
        """The last install's record, or None when there has been none (or it cannot be read)."""
        try:
            record = json.loads((self.root / _LAST_INSTALL).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def describe(self) -> list[dict[str, Optional[str]]]:
        return [
            {"name": n, "active": self.active(n), "previous": self.previous(n), "versions": ",".join(self.versions(n))}
            for n in self.names()
        ]
