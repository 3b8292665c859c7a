"""Bundle format, signing and tamper detection, on a real converted model."""

import io
import json
import zipfile
import zlib

import numpy as np
import pytest

from sdk import golden
from sdk.bundle import GOLDEN_NAME, MODEL_NAME, Bundle, Manifest, write_bundle
from sdk.errors import BundleError, BundleInvalidError, SignatureError
from sdk.runtime import open_engine
from sdk.signing import key_id, load_private_key, load_public_key


def rezip(src, dst, replace=None, add=None, drop=()):
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename in drop:
                continue
            zout.writestr(item.filename, replace.get(item.filename, zin.read(item.filename)))
        for name, data in add.items():
            zout.writestr(name, data)
    return dst


@pytest.fixture
def trusted(signing_keys):
    return [load_public_key(signing_keys.public)]


def test_manifest_records_what_agents_and_fleets_need(digits_bundle, trusted) -> None:
    b = Bundle.open(digits_bundle.path).verify(trusted)
    m = b.manifest
    assert m.name == "digits" and m.version == "1" and m.target == "cpu"
    assert m.quantization["recipe"] == "int8" and m.quantization["io_dtype"] == "int8"
    assert m.data["source"]["sha256"] and m.data["created_at"]
    (inp,) = m.inputs
    assert inp["dtype"] == "int8" and inp["shape"] == [1, 8, 8, 1] and inp["scale"] > 0
    assert "zero_point" in inp and inp["value_range"] == [0.0, 1.0]
    assert {o["op"] for o in m.ops} >= {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"}
    assert all(o["version"] >= 1 for o in m.ops)
    assert m.min_runtime_version
    assert set(m.files) == {MODEL_NAME, GOLDEN_NAME}
    assert m.report["chosen"] == "int8 (int8 I/O)"
    assert b.read(MODEL_NAME) == digits_bundle.model
    assert b.signer_id == key_id(trusted[0])


def test_bundle_stays_within_a_few_kb_of_its_compressed_model(digits_bundle) -> None:
    size = digits_bundle.path.stat().st_size
    compressed_model = len(zlib.compress(digits_bundle.model, 9))
    assert size - compressed_model < 8 * 1024, (size, compressed_model)


def test_golden_pairs_replay_on_the_device_runtime(digits_bundle) -> None:
    m = Bundle.open(digits_bundle.path).manifest
    g = m.golden
    engine = open_engine(digits_bundle.model, "cpu")
    expected = golden.decode_outputs(Bundle.open(digits_bundle.path).read(g["file"]), g["pairs"], len(m.outputs))
    for pair in range(g["pairs"]):
        inputs = golden.golden_inputs(g["seed"], pair, m.inputs)
        ok, worst, why = golden.compare_outputs(expected[pair], engine.run(inputs), g["tolerance"])
        assert ok, why
    # outputs off by a few quantization steps (a different model, a broken kernel) must not pass
    wrong = [np.clip(e.astype(np.int32) + 10, -128, 127).astype(e.dtype) for e in expected[0]]
    assert not golden.compare_outputs(expected[0], wrong, g["tolerance"])[0]


def test_golden_inputs_are_deterministic_and_in_range() -> None:
    spec = [{"shape": [1, 4, 4, 3], "dtype": "float32", "value_range": [-1.0, 1.0]},
            {"shape": [1, 10], "dtype": "uint8", "value_range": [0.0, 1.0], "scale": 1 / 255, "zero_point": 0}]
    a, b = golden.golden_inputs(7, 0, spec), golden.golden_inputs(7, 0, spec)
    c = golden.golden_inputs(7, 1, spec)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32 and a[0].min() >= -1 and a[0].max() <= 1
    assert a[1].dtype == np.uint8 and a[1].shape == (1, 10)


def test_unsigned_bundle_fails_verification(digits_bundle, trusted, tmp_path) -> None:
    unsigned = rezip(digits_bundle.path, tmp_path / "u.edgebundle", drop=("signature.json",))
    with pytest.raises(SignatureError, match="unsigned"):
        Bundle.open(unsigned).verify(trusted)


def test_bundle_signed_by_another_key_fails(digits_bundle, other_keys, trusted, tmp_path) -> None:
    resigned = Bundle.open(digits_bundle.path).sign(load_private_key(other_keys.private), tmp_path / "o.edgebundle")
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        Bundle.open(resigned).verify(trusted)
    Bundle.open(resigned).verify([load_public_key(other_keys.public)])  # and verifies with its own key


def test_changed_manifest_fails_verification(digits_bundle, trusted, tmp_path) -> None:
    raw = zipfile.ZipFile(digits_bundle.path).read("manifest.json")
    data = json.loads(raw)
    data["version"] = "2"
    bad = rezip(digits_bundle.path, tmp_path / "m.edgebundle", replace={"manifest.json": json.dumps(data, indent=1, sort_keys=True).encode()})
    with pytest.raises(SignatureError, match="changed after signing"):
        Bundle.open(bad).verify(trusted)


@pytest.mark.parametrize("offset", [0, 100, 5000, -1])
def test_changed_model_byte_fails_verification(digits_bundle, trusted, tmp_path, offset) -> None:
    model = bytearray(digits_bundle.model)
    model[offset] ^= 0x01
    bad = rezip(digits_bundle.path, tmp_path / "b.edgebundle", replace={MODEL_NAME: bytes(model)})
    with pytest.raises(BundleInvalidError, match="does not match the sha256"):
        Bundle.open(bad).verify(trusted)


def test_extra_file_fails_verification(digits_bundle, trusted, tmp_path) -> None:
    bad = rezip(digits_bundle.path, tmp_path / "x.edgebundle", add={"evil.so": b"\x7fELF"})
    with pytest.raises(BundleInvalidError, match="does not list"):
        Bundle.open(bad).verify(trusted)


def test_no_flipped_byte_of_stored_data_changes_content_unnoticed(digits_bundle, trusted, tmp_path) -> None:
    raw = digits_bundle.path.read_bytes()
    zf = zipfile.ZipFile(io.BytesIO(raw))
    original = {n: zf.read(n) for n in zf.namelist()}
    # the compressed bytes of manifest.json and model.tflite: flip a spread of them, one at a time
    positions = []
    for info in zf.infolist():
        if info.filename in ("manifest.json", MODEL_NAME):
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            positions += list(np.linspace(start, start + info.compress_size - 1, 12).astype(int))
    caught = 0
    for pos in positions:
        data = bytearray(raw)
        data[pos] ^= 0xFF
        try:
            Bundle(bytes(data)).verify(trusted)
        except BundleError:
            caught += 1
            continue
        # verification passed: then the content must be exactly the signed content (a flip in the
        # deflate stream's trailing padding bits changes no byte of any file)
        flipped = zipfile.ZipFile(io.BytesIO(bytes(data)))
        assert {n: flipped.read(n) for n in flipped.namelist()} == original, f"byte {pos} changed content unnoticed"
    assert caught >= len(positions) - 2


def test_not_a_bundle_and_truncated_bundle_are_invalid(digits_bundle, trusted, tmp_path) -> None:
    (tmp_path / "n.edgebundle").write_bytes(b"hello")
    with pytest.raises(BundleInvalidError, match="not a valid .edgebundle"):
        Bundle.open(tmp_path / "n.edgebundle")
    raw = digits_bundle.path.read_bytes()
    (tmp_path / "t.edgebundle").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BundleInvalidError):
        Bundle.open(tmp_path / "t.edgebundle").verify(trusted)
    with pytest.raises(BundleInvalidError, match="no bundle at"):
        Bundle.open(tmp_path / "missing.edgebundle")


def test_write_bundle_is_reproducible_and_checks_model_file(tmp_path, signing_keys) -> None:
    key = load_private_key(signing_keys.private)
    man = {"name": "m", "version": "1", "created_at": "2026-01-01T00:00:00+00:00", "target": "cpu",
           "model_file": "model.tflite", "inputs": [], "outputs": []}
    a = write_bundle(tmp_path / "a.edgebundle", man, {"model.tflite": b"TFL3" * 10}, private_key=key)
    b = write_bundle(tmp_path / "b.edgebundle", man, {"model.tflite": b"TFL3" * 10}, private_key=key)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(BundleInvalidError, match="model_file"):
        write_bundle(tmp_path / "c.edgebundle", {**man, "model_file": "other.tflite"}, {"model.tflite": b"x"})
    with pytest.raises(BundleInvalidError, match="schema"):
        Manifest({**man, "schema": "edgesdk.bundle/99", "files": {}})


@pytest.mark.parametrize(("key", "value"), [("name", "../m"), ("name", "my model"), ("version", ".."), ("version", 2),
                                            ("name", "x" * 129)])
def test_manifest_names_and_versions_are_ids(key: str, value: object) -> None:
    man = {"schema": "edgesdk.bundle/1", "name": "m", "version": "1", "created_at": "2026-01-01T00:00:00+00:00",
           "target": "cpu", "model_file": "model.tflite", "inputs": [], "outputs": [], "files": {}}
    assert Manifest(man).name == "m"
    with pytest.raises(BundleInvalidError, match=f"manifest {key} .* cannot name a model on devices"):
        Manifest({**man, key: value})


# --- zip bombs: nothing is inflated beyond what is allowed, whatever the zip declares ----------------

BOMB = 64 * 1024 * 1024  # what each hostile member inflates to; the bundle itself is ~64 KB


def bomb_zip(members: dict) -> bytes:
    """A zip whose members are ``name -> bytes`` or ``name -> int`` (that many spaces inside a JSON
    string, streamed in so building it does not allocate them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            with zf.open(name, "w") as out:
                if isinstance(body, bytes):
                    out.write(body)
                    continue
                out.write(b'{"pad": "')
                chunk = b" " * (1024 * 1024)
                for _ in range(body // len(chunk)):
                    out.write(chunk)
                out.write(b'"}')
    return buf.getvalue()


def declare_size(raw: bytes, name: str, size: int) -> bytes:
    """Make the central directory lie: ``name`` declares ``size`` uncompressed bytes."""
    data = bytearray(raw)
    pos = data.find(b"PK\x01\x02")
    while data[pos + 46: pos + 46 + len(name)] != name.encode():  # the central entry naming ``name``
        pos = data.find(b"PK\x01\x02", pos + 4)
    data[pos + 24: pos + 28] = size.to_bytes(4, "little")  # its uncompressed size
    return bytes(data)


def small_manifest(model_size: int) -> bytes:
    return json.dumps({"schema": "edgesdk.bundle/1", "name": "m", "version": "1", "created_at": "2026-01-01",
                       "target": "cpu", "model_file": MODEL_NAME, "inputs": [], "outputs": [],
                       "files": {MODEL_NAME: {"sha256": "0" * 64, "size": model_size}}}).encode()


def refused_within(raw: bytes, match: str, *, read_model: bool = False) -> int:
    """Open ``raw`` as a bundle (and read its model), expect BundleInvalidError; return the peak
    number of bytes Python allocated meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(BundleInvalidError, match=match):
            bundle = Bundle(raw, source="bomb.edgebundle")
            if read_model:
                bundle.read(MODEL_NAME)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["manifest.json", "signature.json"])
def test_huge_metadata_is_refused_before_it_is_inflated(name) -> None:
    members = {"manifest.json": small_manifest(4), name: BOMB}
    raw = bomb_zip(members)
    assert len(raw) < BOMB // 100
    peak = refused_within(raw, rf"{name} declares {BOMB + 11} bytes, more than the 1048576 allowed")
    assert peak < BOMB // 16, peak


def test_member_larger_than_its_manifest_entry_is_refused_before_it_is_inflated() -> None:
    raw = bomb_zip({"manifest.json": small_manifest(4), MODEL_NAME: BOMB})
    peak = refused_within(raw, rf"{MODEL_NAME} declares {BOMB + 11} bytes, more than the 4 allowed", read_model=True)
    assert peak < BOMB // 16, peak


def test_member_whose_zip_header_lies_about_its_size_inflates_no_further() -> None:
    lying_manifest = declare_size(bomb_zip({"manifest.json": BOMB}), "manifest.json", 100)
    assert refused_within(lying_manifest, "manifest.json cannot be read") < BOMB // 16
    lying_model = declare_size(bomb_zip({"manifest.json": small_manifest(100), MODEL_NAME: BOMB}), MODEL_NAME, 100)
    assert refused_within(lying_model, f"{MODEL_NAME} cannot be read", read_model=True) < BOMB // 16


def test_manifest_entry_without_a_valid_size_is_refused() -> None:
    manifest = json.loads(small_manifest(4))
    manifest["files"][MODEL_NAME]["size"] = "4"
    with pytest.raises(BundleInvalidError, match="no valid size for model.tflite"):
        Bundle(bomb_zip({"manifest.json": json.dumps(manifest).encode(), MODEL_NAME: b"TFL3"})).read(MODEL_NAME)
