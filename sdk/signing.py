"""Ed25519 keys that sign bundles on the workstation and verify them on devices.

A key pair is two PEM files: ``private.pem`` (PKCS#8, kept on the build machine, mode 0600) and
``public.pem`` (SubjectPublicKeyInfo, copied to every device's trusted keys). A key is named by
its *key id*: the first 16 hex digits of the sha256 of the raw public key, recorded next to each
signature so a device holding several trusted keys knows which one to check against.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError, SigningKeyError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "generate_keys",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "key_id",
    "sign",
    "verify",
]


def generate_keys(directory: PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair to ``directory/private.pem`` and ``directory/public.pem``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / "private.pem", out / "public.pem"
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise SigningKeyError(
            f"{private_path} or {public_path} already exists: choose another directory "
            "or pass --force to replace the keys (bundles signed with the old key stop verifying)"
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _read(path: PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"cannot read {what} {path}: {exc.strerror or exc}; "
            "create a key pair with: edgesdk keys generate DIR"
        ) from exc


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    """Load an unencrypted Ed25519 private key from a PEM file."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{path} is not an unencrypted PEM private key: pass the private.pem written by "
            "edgesdk keys generate"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{path} is not a PEM public key: pass the public.pem written by edgesdk keys generate"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_keys(paths: Iterable[PathLike]) -> list[Ed25519PublicKey]:
    """Load several trusted public keys (a device may trust more than one signer)."""
    return [load_public_key(p) for p in paths]


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The 16-hex-digit id of a key (sha256 of the raw public key)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Sign ``data`` (64-byte Ed25519 signature)."""
    return key.sign(data)


def verify(trusted: Iterable[Ed25519PublicKey], data: bytes, signature: bytes, signer_id: str) -> str:
    """Check ``signature`` over ``data`` against the trusted key named ``signer_id``.

    Returns the key id on success, raises SignatureError otherwise.
    """
    keys = {key_id(k): k for k in trusted}
    if not keys:
        raise SignatureError("no trusted public key given: pass --public-key DIR/public.pem")
    key = keys.get(signer_id)
    if key is None:
        raise SignatureError(
            f"bundle is signed by key {signer_id}, which is not among the trusted keys "
            f"({', '.join(sorted(keys))}): add its public.pem to the trusted keys or re-sign the bundle"
        )
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureError(
            "bundle signature does not match its manifest: the manifest was changed after signing; "
            "re-create the bundle from its source"
        ) from exc
    return signer_id
