"""Binary deltas between two bundles: what a device that holds version N receives for N+1.

A delta turns the bytes of a *base* bundle (one the device already holds, found by its sha256
in the device's own store, never by a path from the network) into the bytes of a *target*
bundle. Whoever applies one checks the result exactly as a bundle received whole: its size and
sha256 against the install command, then the installer's signature and per-file checks.

Methods (the wire names, :data:`METHODS`):

``zstd-zip``
    the default: ``zstd`` (below) between the bundles' *inflated* forms. A bundle is a zip whose
    model is deflate-compressed, and one changed byte early in a model changes every compressed
    byte after it, so a delta of the zips themselves finds little to reuse. This method diffs
    :func:`inflate` of each (the zip with every deflated member's data replaced by its plain
    bytes) and the device deflates those members again (zlib, raw deflate, at the level the
    member was written with, recorded per member) to rebuild the zip byte for byte. The fleet
    makes it only after rebuilding the target itself; a device whose zlib deflates otherwise
    gets a result that fails the sha256 check, and falls back to the full bundle.
``zstd``
    zstandard with the base as a raw-content dictionary and a window covering base and target:
    the library form of ``zstd --patch-from``, on the bundles' bytes as they are.
``bsdiff4``
    bsdiff (Colin Percival's BSDIFF40 format, the ``bsdiff4`` package). Kept for the
    measurement in ``bench/delta_bench.py``; the agent applies it only when the package is there.

Applying is bounded: the output may not exceed the size the install command declared (zstd is
read through a stream capped at that size plus one byte; a bsdiff patch declares its output
size in its header, checked before anything is allocated), and the decoder's window is capped
at :data:`MAX_WINDOW_LOG`. Every failure is a :class:`DeltaError` saying why, so the caller can
fall back to the full bundle.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from typing import Optional

from .deps import require
from .errors import EdgeSdkError, InstallError

__all__ = ["METHODS", "DEFAULT_METHOD", "MAX_WINDOW_LOG", "DeltaError", "make_delta", "apply_delta", "available",
           "inflate", "deflate_back"]

#: every method the protocol names; :data:`DEFAULT_METHOD` is what the fleet makes (see the bench)
METHODS = ("zstd-zip", "zstd", "bsdiff4")
DEFAULT_METHOD = "zstd-zip"
#: an inflated bundle may be at most this many times its zip (deflate gains ~1.1-3x on models)
MAX_INFLATION = 64
#: segments of an inflated bundle at most (zip members and the bytes around them)
MAX_SEGMENTS = 4096
#: zstd window at most 2 GiB (the decoder's memory bound; bundles are far smaller)
MAX_WINDOW_LOG = 31
_MIN_WINDOW_LOG = 10
_BSDIFF_HEADER = struct.Struct("<8sQQQ")


class DeltaError(InstallError):
    """A delta that cannot be made or applied (base missing, corrupt patch, wrong result)."""


def available(method: str) -> bool:
    """Whether this process can apply ``method`` (its package is installed)."""
    try:
        _module(method)
        return True
    except (EdgeSdkError, ImportError):
        return False


def _module(method: str, extra: str | tuple[str, ...] = ("agent", "fleet")):
    """The package of ``method``; a missing one names ``extra``, the extra of the role asking (the
    fleet makes deltas, devices apply them)."""
    if method in ("zstd", "zstd-zip"):
        return require("zstandard", extra, "for bundle deltas")
    if method == "bsdiff4":
        return require("bsdiff4", "dev", "for bsdiff bundle deltas (measured by bench/delta_bench.py)")
    raise DeltaError(f"unknown delta method {method!r}: use one of {', '.join(METHODS)}")


def _window_log(total: int) -> int:
    """The smallest zstd window log covering ``total`` bytes (base + target), within bounds."""
    return max(_MIN_WINDOW_LOG, min(MAX_WINDOW_LOG, max(1, total - 1).bit_length()))


def make_delta(base: bytes, target: bytes, method: str = DEFAULT_METHOD, *, level: int = 19) -> bytes:
    """The delta turning ``base`` into ``target`` with ``method`` (the fleet makes it once per pair)."""
    mod = _module(method, "fleet")
    if method == "bsdiff4":
        return mod.diff(bytes(base), bytes(target))
    if method == "zstd-zip":
        flat = inflate(target)
        if deflate_back(flat, len(target)) != bytes(target):
            raise DeltaError("the target bundle's deflated members cannot be rebuilt byte for byte here")
        return _zstd_make(mod, inflate(base), flat, level)
    return _zstd_make(mod, base, target, level)


def _zstd_make(mod, base: bytes, target: bytes, level: int) -> bytes:
    wlog = _window_log(len(base) + len(target))
    if wlog >= MAX_WINDOW_LOG and len(base) + len(target) > 1 << MAX_WINDOW_LOG:
        raise DeltaError(f"base and target ({len(base) + len(target)} bytes) exceed a zstd delta's window")
    dictionary = mod.ZstdCompressionDict(bytes(base), dict_type=mod.DICT_TYPE_RAWCONTENT)
    params = mod.ZstdCompressionParameters.from_level(level, source_size=len(target), dict_size=len(base),
                                                      window_log=wlog, enable_ldm=True, write_checksum=True)
    cctx = mod.ZstdCompressor(dict_data=dictionary, compression_params=params)
    return cctx.compress(bytes(target))


def apply_delta(base: bytes, delta: bytes, method: str, *, size: int, sha256: Optional[str] = None) -> bytes:
    """``base`` with ``delta`` applied: at most ``size`` bytes are produced, and the result must be
    exactly ``size`` bytes (and hash to ``sha256`` when given). Raises :class:`DeltaError`."""
    mod = _module(method, "agent")
    try:
        if method == "bsdiff4":
            out = _bspatch(mod, base, delta, size)
        elif method == "zstd-zip":
            flat_base = inflate(base)
            out = deflate_back(_zstd_patch(mod, flat_base, delta, MAX_INFLATION * size), size)
        else:
            out = _zstd_patch(mod, base, delta, size)
    except DeltaError:
        raise
    except Exception as exc:  # the libraries raise their own errors (zstd.ZstdError, ValueError, ...)
        raise DeltaError(f"the {method} delta does not apply to its base ({type(exc).__name__}: {exc}): "
                         "the full bundle is needed") from exc
    if len(out) != size:
        raise DeltaError(f"the {method} delta produced {len(out)} bytes, the bundle has {size}: the full bundle is needed")
    if sha256 is not None and hashlib.sha256(out).hexdigest() != sha256:
        raise DeltaError(f"the bundle rebuilt from the {method} delta does not match its sha256 {sha256[:12]}: "
                         "the full bundle is needed")
    return out


def _zstd_patch(mod, base: bytes, delta: bytes, size: int) -> bytes:
    dictionary = mod.ZstdCompressionDict(bytes(base), dict_type=mod.DICT_TYPE_RAWCONTENT)
    dctx = mod.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << _window_log(len(base) + size))
    with dctx.stream_reader(bytes(delta), read_across_frames=False) as reader:
        out = reader.read(size + 1)
        if len(out) < size + 1:  # a short read: make sure the stream really ended
            rest = reader.read(size + 1 - len(out))
            out += rest
    if len(out) > size:
        raise DeltaError(f"the zstd delta produces more than the bundle's {size} bytes: the full bundle is needed")
    return out


def _bspatch(mod, base: bytes, delta: bytes, size: int) -> bytes:
    if len(delta) < _BSDIFF_HEADER.size:
        raise DeltaError("the bsdiff4 delta is shorter than its header: the full bundle is needed")
    magic, ctrl_len, diff_len, new_size = _BSDIFF_HEADER.unpack_from(delta)
    if magic != b"BSDIFF40" or new_size != size or ctrl_len + diff_len > len(delta):
        raise DeltaError(f"the bsdiff4 delta's header does not describe a {size}-byte bundle: the full bundle is needed")
    return mod.patch(bytes(base), bytes(delta))


# --- a bundle's inflated form (zstd-zip) ------------------------------------------------------------
_FLAT_MAGIC = b"EDZX"
_FLAT_HEAD = struct.Struct("<4sI")
_FLAT_SEG = struct.Struct("<BbQQ")  # kind (0 raw, 1 deflated), zlib level, plain length, stored length
_LEVELS = (9, 6, 8, 7, 5, 4, 3, 2, 1)


def _deflate(data: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)  # what zipfile writes a ZIP_DEFLATED member with
    return c.compress(data) + c.flush()


def inflate(bundle: bytes) -> bytes:
    """``bundle`` (a zip) with every deflated member that deflates back byte for byte at some
    zlib level stored plain: segments of raw bytes and of plain member data, with a header
    saying how to rebuild the zip (:func:`deflate_back`). Bytes that are not a zip are one raw
    segment. Only ever called on a bundle the caller trusts as bytes (the device's own base, the
    fleet's bundles): the result it rebuilds is checked against the bundle's sha256 anyway."""
    data = bytes(bundle)
    spans: list[tuple[int, int, bytes, int]] = []  # offset, stored length, plain data, level
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_DEFLATED:
                    continue
                name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
                start = info.header_offset + 30 + name_len + extra_len
                stored = data[start : start + info.compress_size]
                plain = zlib.decompress(stored, -15)
                level = next((lv for lv in _LEVELS if _deflate(plain, lv) == stored), None)
                if level is not None:
                    spans.append((start, info.compress_size, plain, level))
    except (zipfile.BadZipFile, zlib.error, struct.error, ValueError, EOFError, NotImplementedError):
        spans = []
    spans.sort()
    segments, payload, pos = [], [], 0
    for start, length, plain, level in spans:
        if start < pos:  # overlapping members: not a zip this writes; keep those bytes raw
            continue
        if start > pos:
            segments.append((0, 0, start - pos, start - pos))
            payload.append(data[pos:start])
        segments.append((1, level, len(plain), length))
        payload.append(plain)
        pos = start + length
    if pos < len(data) or not segments:
        segments.append((0, 0, len(data) - pos, len(data) - pos))
        payload.append(data[pos:])
    head = _FLAT_HEAD.pack(_FLAT_MAGIC, len(segments)) + b"".join(_FLAT_SEG.pack(*seg) for seg in segments)
    return head + b"".join(payload)


def deflate_back(flat: bytes, size: int) -> bytes:
    """The zip an inflated form describes, at most ``size`` bytes (exactly ``size`` or DeltaError).
    ``flat`` came out of a delta, so from the network: its header is checked whole (segment count,
    kinds, levels, lengths adding up to the data and to ``size``) before anything is deflated."""
    if len(flat) < _FLAT_HEAD.size:
        raise DeltaError("the inflated bundle is shorter than its header: the full bundle is needed")
    magic, count = _FLAT_HEAD.unpack_from(flat)
    table_end = _FLAT_HEAD.size + count * _FLAT_SEG.size
    if magic != _FLAT_MAGIC or not 1 <= count <= MAX_SEGMENTS or table_end > len(flat):
        raise DeltaError("the inflated bundle's header is malformed: the full bundle is needed")
    segments = [_FLAT_SEG.unpack_from(flat, _FLAT_HEAD.size + i * _FLAT_SEG.size) for i in range(count)]
    if (any(kind not in (0, 1) or (kind == 0 and plain != stored) or (kind == 1 and not 1 <= level <= 9)
            for kind, level, plain, stored in segments)
            or sum(plain for _, _, plain, _ in segments) != len(flat) - table_end
            or sum(stored for _, _, _, stored in segments) != size):
        raise DeltaError(f"the inflated bundle's segments do not describe a {size}-byte bundle: the full bundle is needed")
    out, pos = [], table_end
    for kind, level, plain, stored in segments:
        part = flat[pos : pos + plain]
        pos += plain
        if kind == 1:
            part = _deflate(part, level)
            if len(part) != stored:
                raise DeltaError("a member deflates to another length here than in the bundle: the full bundle is needed")
        out.append(part)
    return b"".join(out)
