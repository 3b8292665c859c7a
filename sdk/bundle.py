"""The bundle: the one artefact that travels from the workstation to devices.

A bundle is a zip file (``.edgebundle``) holding:

``manifest.json``
    What the model is and how it was made: name, version, created-at, source model digest,
    target, quantization recipe, input/output specs (shape, dtype, scale, zero point; per input,
    optionally the uint8 ``normalization`` of :mod:`sdk.encoding`), every op
    with its version and the minimum runtime version, the conversion report, the golden
    input/output check, and the sha256 and size of every other file in the bundle.
``model.tflite`` (and, for the Edge TPU, ``model_edgetpu.tflite`` + the compiler log)
    The model file(s), deflate-compressed inside the zip.
``golden.npz``
    The expected outputs for the golden inputs; the inputs themselves are regenerated from a
    seed (see :mod:`sdk.golden`) so they do not bloat the bundle.
``signature.json``
    Ed25519 signature over the exact bytes of ``manifest.json`` plus the signer's key id.
    Because the manifest records the sha256 of every file, the signature covers them all.

Verification (:meth:`Bundle.verify`) checks the signature against trusted keys, then every
file against its sha256, and refuses files the manifest does not list.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing
from .errors import BundleInvalidError, SignatureError
from .paths import SAFE_NAME

PathLike = Union[str, "os.PathLike[str]"]

BUNDLE_SCHEMA = "edgesdk.bundle/1"
BUNDLE_SUFFIX = ".edgebundle"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
MODEL_NAME = "model.tflite"
EDGETPU_MODEL_NAME = "model_edgetpu.tflite"
GOLDEN_NAME = "golden.npz"

# Fixed timestamp inside the zip so the same inputs give the same bytes.
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)
_REQUIRED = ("schema", "name", "version", "created_at", "target", "model_file", "inputs", "outputs", "files")
# manifest.json and signature.json are read before anything is verified: a bundle may not make us
# inflate more than this for them (real manifests are a few KB).
MAX_METADATA_BYTES = 1024 * 1024

__all__ = [
    "BUNDLE_SCHEMA",
    "MODEL_NAME",
    "EDGETPU_MODEL_NAME",
    "GOLDEN_NAME",
    "Manifest",
    "Bundle",
    "write_bundle",
    "sha256_hex",
]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Manifest:
    """A validated bundle manifest. ``data`` is the plain JSON dict; accessors are read-only."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise BundleInvalidError(f"manifest is missing {', '.join(missing)}: re-create the bundle with edgesdk convert")
        if data["schema"] != BUNDLE_SCHEMA:
            raise BundleInvalidError(
                f"manifest schema {data['schema']!r} is not supported (this edgesdk reads {BUNDLE_SCHEMA}): "
                "upgrade edgesdk or re-create the bundle"
            )
        for key in ("name", "version"):
            if type(data[key]) is not str or not SAFE_NAME.fullmatch(data[key]):
                raise BundleInvalidError(
                    f"manifest {key} {str(data[key])[:80]!r} cannot name a model on devices (letters, digits, '.', '_', "
                    "'-'; at most 128, starting with a letter or digit): re-create the bundle with edgesdk convert --name/"
                    "--model-version")
        from .encoding import check_manifest_inputs

        check_manifest_inputs(data["inputs"])  # e.g. each input's normalization (sdk.encoding)
        self.data: dict[str, Any] = dict(data)

    # --- accessors -------------------------------------------------------------------------
    name = property(lambda self: str(self.data["name"]))
    version = property(lambda self: str(self.data["version"]))
    target = property(lambda self: str(self.data["target"]))
    model_file = property(lambda self: str(self.data["model_file"]))
    inputs = property(lambda self: list(self.data["inputs"]))
    outputs = property(lambda self: list(self.data["outputs"]))
    files = property(lambda self: dict(self.data["files"]))
    golden = property(lambda self: self.data.get("golden"))
    report = property(lambda self: self.data.get("report"))
    ops = property(lambda self: list(self.data.get("ops", [])))
    min_runtime_version = property(lambda self: self.data.get("min_runtime_version"))
    quantization = property(lambda self: self.data.get("quantization", {}))
    latency_limit_ms = property(lambda self: self.data.get("latency_limit_ms"))

    @property
    def model_id(self) -> str:
        """``name@version``: how fleets and agents refer to one build of a model."""
        return f"{self.name}@{self.version}"

    def to_bytes(self) -> bytes:
        return json.dumps(self.data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Manifest":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleInvalidError(f"manifest.json is not valid JSON ({exc}): the bundle is corrupt") from exc
        if not isinstance(data, dict):
            raise BundleInvalidError("manifest.json is not a JSON object: the bundle is corrupt")
        return cls(data)


def write_bundle(
    path: PathLike,
    manifest: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    private_key: Optional[Ed25519PrivateKey] = None,
) -> Path:
    """Write a bundle atomically: record each file's sha256 in the manifest, zip, sign.

    ``manifest`` must not carry ``files``/``schema``; they are filled in here so the recorded
    digests are always those of the bytes written.
    """
    out = Path(path)
    data = dict(manifest)
    data["schema"] = BUNDLE_SCHEMA
    data.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    data["files"] = {
        name: {"sha256": sha256_hex(blob), "size": len(blob)} for name, blob in sorted(files.items())
    }
    if data.get("model_file") not in files:
        raise BundleInvalidError(f"model_file {data.get('model_file')!r} is not among the bundle files")
    man = Manifest(data)
    raw_manifest = man.to_bytes()

    members: list[tuple[str, bytes]] = [(MANIFEST_NAME, raw_manifest)]
    members += sorted(files.items())
    if private_key is not None:
        sig = {
            "algorithm": "ed25519",
            "key_id": signing.key_id(private_key),
            "signature": base64.b64encode(signing.sign(private_key, raw_manifest)).decode(),
        }
        members.append((SIGNATURE_NAME, json.dumps(sig, sort_keys=True).encode()))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for name, blob in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, blob, compresslevel=9)
    os.replace(tmp, out)
    return out


class Bundle:
    """A bundle read into memory (bundles are a few MB). Nothing is trusted until :meth:`verify`."""

    def __init__(self, raw: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self.raw = raw
        try:
            self._zip = zipfile.ZipFile(io.BytesIO(raw))
            names = self._zip.namelist()
        except (zipfile.BadZipFile, zlib.error, ValueError, EOFError) as exc:
            raise BundleInvalidError(
                f"{source} is not a valid .edgebundle (zip: {exc}): re-download it or re-create it with edgesdk convert"
            ) from exc
        if MANIFEST_NAME not in names:
            raise BundleInvalidError(f"{source} has no manifest.json: it is not an edgesdk bundle")
        self._raw_manifest = self._member(MANIFEST_NAME, MAX_METADATA_BYTES)
        self.manifest = Manifest.from_bytes(self._raw_manifest)
        self._names = names
        self.signature: Optional[dict[str, Any]] = None
        if SIGNATURE_NAME in names:
            try:
                self.signature = json.loads(self._member(SIGNATURE_NAME, MAX_METADATA_BYTES))
            except json.JSONDecodeError as exc:
                raise BundleInvalidError(f"{source}: signature.json is not valid JSON") from exc

    @classmethod
    def open(cls, path: PathLike) -> "Bundle":
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError as exc:
            raise BundleInvalidError(f"no bundle at {p}: check the path") from exc
        except OSError as exc:
            raise BundleInvalidError(f"cannot read bundle {p}: {exc.strerror or exc}") from exc
        return cls(raw, source=str(p))

    # --- reading ---------------------------------------------------------------------------
    def _member(self, name: str, limit: int) -> bytes:
        """Decompress one member, refusing it before inflating anything when its zip header
        declares more than ``limit`` bytes, and reading at most ``limit + 1`` bytes in case the
        header lies (a zip bomb must not make us allocate what it declares)."""
        try:
            info = self._zip.getinfo(name)
            if info.file_size > limit:
                raise BundleInvalidError(
                    f"{self.source}: {name} declares {info.file_size} bytes, more than the {limit} allowed: "
                    "the bundle is corrupt or hostile; re-create it with edgesdk convert")
            with self._zip.open(info) as member:
                blob = member.read(limit + 1)
        except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise BundleInvalidError(
                f"{self.source}: {name} cannot be read ({exc}): the bundle is corrupt, re-download it"
            ) from exc
        if len(blob) > limit:
            raise BundleInvalidError(
                f"{self.source}: {name} inflates to more than the {limit} bytes allowed: "
                "the bundle is corrupt or hostile; re-create it with edgesdk convert")
        return blob

    def read(self, name: str) -> bytes:
        """Return a file listed in the manifest, checked against its sha256."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise BundleInvalidError(f"{self.source}: {name} is not listed in the manifest")
        size = entry.get("size") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0:
            raise BundleInvalidError(f"{self.source}: the manifest records no valid size for {name}: the bundle is corrupt")
        blob = self._member(name, size)
        if sha256_hex(blob) != entry["sha256"] or len(blob) != entry["size"]:
            raise BundleInvalidError(
                f"{self.source}: {name} does not match the sha256 recorded in the manifest: "
                "the bundle was corrupted or tampered with; re-download it"
            )
        return blob

    def model_bytes(self, *, edgetpu: bool = False) -> bytes:
        """The model to load: the Edge TPU-compiled variant when asked for and present."""
        if edgetpu and EDGETPU_MODEL_NAME in self.manifest.files:
            return self.read(EDGETPU_MODEL_NAME)
        return self.read(self.manifest.model_file)

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def signer_id(self) -> Optional[str]:
        return None if self.signature is None else str(self.signature.get("key_id"))

    @property
    def digest(self) -> str:
        """sha256 of the whole bundle file: what chunked transfers check the reassembly against."""
        return sha256_hex(self.raw)

    # --- verification ----------------------------------------------------------------------
    def verify(self, trusted_keys: Iterable[Ed25519PublicKey]) -> "Bundle":
        """Check signature, then every file's sha256; raise on the first problem."""
        if self.signature is None:
            raise SignatureError(
                f"{self.source} is unsigned: sign it when converting (edgesdk convert ... --key private.pem) "
                "or with edgesdk bundle sign"
            )
        try:
            sig = base64.b64decode(self.signature["signature"], validate=True)
            signer = str(self.signature["key_id"])
        except (KeyError, ValueError, TypeError) as exc:
            raise SignatureError(f"{self.source}: signature.json is malformed: re-sign the bundle") from exc
        signing.verify(list(trusted_keys), self._raw_manifest, sig, signer)
        self.check_integrity()
        return self

    def check_integrity(self) -> None:
        """Every listed file is present and matches its sha256; nothing unlisted is carried."""
        listed = set(self.manifest.files)
        extra = set(self._names) - listed - {MANIFEST_NAME, SIGNATURE_NAME}
        if extra:
            raise BundleInvalidError(
                f"{self.source} carries files its manifest does not list ({', '.join(sorted(extra))}): "
                "it was tampered with; re-create it"
            )
        for name in sorted(listed):
            if name not in self._names:
                raise BundleInvalidError(f"{self.source}: {name} is listed in the manifest but missing")
            self.read(name)

    def sign(self, private_key: Ed25519PrivateKey, path: PathLike) -> Path:
        """Write a copy of this bundle signed with ``private_key`` (integrity is checked first)."""
        self.check_integrity()
        files = {name: self.read(name) for name in self.manifest.files}
        data = {k: v for k, v in self.manifest.data.items() if k not in ("files", "schema")}
        return write_bundle(path, data, files, private_key=private_key)

    def describe(self) -> dict[str, Any]:
        """What ``edgesdk bundle inspect`` shows: the manifest plus bundle-level facts."""
        return {
            "path": self.source,
            "bundle_bytes": len(self.raw),
            "bundle_sha256": self.digest,
            "signed": self.signed,
            "signer_key_id": self.signer_id,
            "manifest": self.manifest.data,
        }
