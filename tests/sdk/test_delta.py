"""``sdk.delta``: deltas rebuild the target byte for byte, and every way a delta can be wrong (too
big, corrupt, against another base, a hostile inflated form) is a DeltaError, never more output."""

import hashlib
import struct

import numpy as np
import pytest

from sdk import delta
from sdk.bundle import Bundle


@pytest.fixture(scope="module")
def pair(tmp_path_factory, signing_keys):
    """Two signed bundles whose models differ in 2 KB of 300 KB (deflated inside the zip)."""
    from sdk.bundle import write_bundle
    from sdk.signing import load_private_key

    rng = np.random.default_rng(3)
    text = b"".join(b"weight %d\n" % i for i in range(30_000))  # compressible, so deflate really runs
    key = load_private_key(signing_keys.private)
    root = tmp_path_factory.mktemp("delta")
    out = []
    for version, model in (("1", text), ("2", text[:100_000] + rng.bytes(2000) + text[102_000:])):
        manifest = {"name": "m", "version": version, "target": "cpu", "model_file": "model.tflite",
                    "inputs": [], "outputs": []}
        out.append(write_bundle(root / f"{version}.edgebundle", manifest, {"model.tflite": model},
                                private_key=key).read_bytes())
    return out


@pytest.mark.parametrize("method", [m for m in delta.METHODS if delta.available(m)])
def test_a_delta_rebuilds_the_target_exactly_and_is_small(pair, method) -> None:
    base, target = pair
    d = delta.make_delta(base, target, method)
    out = delta.apply_delta(base, d, method, size=len(target), sha256=hashlib.sha256(target).hexdigest())
    assert out == target
    Bundle(out).check_integrity()
    assert len(d) < len(target) / 4


@pytest.mark.parametrize("method", [m for m in delta.METHODS if delta.available(m)])
def test_wrong_deltas_are_refused_without_more_output(pair, method) -> None:
    base, target = pair
    d = delta.make_delta(base, target, method)
    sha = hashlib.sha256(target).hexdigest()
    with pytest.raises(delta.DeltaError):
        delta.apply_delta(base, d, method, size=len(target) - 1)  # the declared size is a hard bound
    corrupt = bytearray(d)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(delta.DeltaError):
        delta.apply_delta(base, bytes(corrupt), method, size=len(target), sha256=sha)
    with pytest.raises(delta.DeltaError):
        delta.apply_delta(base[::-1], d, method, size=len(target), sha256=sha)  # against another base
    with pytest.raises(delta.DeltaError):
        delta.apply_delta(base, b"", method, size=len(target))


def test_the_zstd_zip_method_gains_on_deflated_models(pair) -> None:
    base, target = pair
    assert len(delta.make_delta(base, target, "zstd-zip")) < len(delta.make_delta(base, target, "zstd")) / 2
    flat = delta.inflate(target)
    assert len(flat) > len(target) and delta.deflate_back(flat, len(target)) == target
    assert delta.deflate_back(delta.inflate(b"not a zip"), 9) == b"not a zip"  # one raw segment


def test_hostile_inflated_forms_are_refused_before_deflating(pair) -> None:
    flat = delta.inflate(pair[0])
    head = struct.Struct("<4sI")
    seg = struct.Struct("<BbQQ")
    _, count = head.unpack_from(flat)
    one = seg.unpack_from(flat, head.size)
    cases = [
        flat[:6],  # shorter than its header
        b"EDZY" + flat[4:],  # another magic
        head.pack(b"EDZX", 0) + flat[head.size:],  # no segment
        head.pack(b"EDZX", 10 ** 6) + flat[head.size:],  # more segments than allowed
        flat[: head.size] + seg.pack(7, *one[1:]) + flat[head.size + seg.size:],  # unknown kind
        flat[: head.size] + seg.pack(1, 12, *one[2:]) + flat[head.size + seg.size:],  # no such zlib level
        flat[: head.size] + seg.pack(one[0], one[1], one[2] + 1, one[3]) + flat[head.size + seg.size:],  # lengths
        flat + b"x",  # data beyond the segments
    ]
    for bad in cases:
        with pytest.raises(delta.DeltaError):
            delta.deflate_back(bad, len(pair[0]))
    with pytest.raises(delta.DeltaError):
        delta.deflate_back(flat, len(pair[0]) + 1)  # not the declared size
    assert count >= 3
