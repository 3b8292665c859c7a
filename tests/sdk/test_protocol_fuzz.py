"""Property tests of the trust boundary: whatever arrives, a decoder returns a message whose
every field passed its check, or raises ProtocolError; nothing else ever leaves it.

Inputs are random bytes, valid messages with one field (or several) replaced by arbitrary JSON,
and binary frames with arbitrary headers. A message that decodes must also re-encode and decode
to itself, which shows the checks on the way in are the ones on the way out.
"""

from __future__ import annotations

import json
import string

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from sdk import protocol as p
from sdk.errors import ProtocolError

from test_protocol import valid_messages  # tests/sdk is on sys.path (pytest prepend mode)

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
                | st.sampled_from(["", "..", "../x", "a" * 129, "\ud800", "0" * 64, "A" * 64, "float32", "object"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
JSON_CLASSES = [c for c in p.MESSAGE_CLASSES if issubclass(c, p.Message)]


def _decode_only_protocol_errors(raw: bytes) -> p.Message | None:
    try:
        msg = p.decode(raw)
    except ProtocolError:
        return None
    again = p.decode(msg.to_payload())  # accepted means valid both ways
    assert type(again) is type(msg) and again == msg
    return msg


@SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes(raw: bytes) -> None:
    _decode_only_protocol_errors(raw)
    for cls in (p.Chunk, p.Task):
        try:
            cls.from_payload(raw)
        except ProtocolError:
            pass


@SETTINGS
@given(st.sampled_from(JSON_CLASSES), st.data())
def testvalid_messages_with_fields_replaced_by_arbitrary_json(cls: type, data: st.DataObject) -> None:
    good = valid_messages()[cls].to_dict()
    names = sorted(good)
    changes = data.draw(st.dictionaries(st.sampled_from(names + ["extra"]), JSON_VALUES, min_size=1, max_size=3))
    _decode_only_protocol_errors(json.dumps({**good, **changes}).encode())
    dropped = data.draw(st.sampled_from(names))
    _decode_only_protocol_errors(json.dumps({k: v for k, v in good.items() if k != dropped}).encode())


TENSOR_SPECS = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(p.TENSOR_DTYPES) + ["object", "V4", "<U3", "complex64", "float128", "M8"])
    | JSON_VALUES,
    "shape": st.lists(st.integers(min_value=-2, max_value=70), max_size=10) | JSON_VALUES,
})


@SETTINGS
@given(st.lists(TENSOR_SPECS | JSON_VALUES, max_size=3), st.binary(max_size=600),
       st.dictionaries(st.sampled_from(["id", "job", "model", "lease_s", "attempt"]), JSON_VALUES, max_size=2))
def test_task_frames_with_arbitrary_specs_and_headers(specs: list, data: bytes, changes: dict) -> None:
    head = {"type": "task", "id": "t-1", "job": "j", "model": "m", "lease_s": 5.0, "inputs": specs, **changes}
    try:
        task = p.Task.from_payload(p._frame(head, data))
    except ProtocolError:
        return
    assert sum(a.nbytes for a in task.inputs) == len(data)
    assert all(a.dtype.name in p.TENSOR_DTYPES and a.shape[0] == task.count >= 1 for a in task.inputs)
    back = p.Task.from_payload(task.to_payload())
    for a, b in zip(back.inputs, task.inputs):
        np.testing.assert_array_equal(a, b)


def _task_result_frame() -> bytes:
    """A valid binary TaskResult frame (two samples of one float output)."""
    return valid_messages()[p.TaskResult].to_payload()


@SETTINGS
@given(st.lists(TENSOR_SPECS | JSON_VALUES, max_size=3), st.binary(max_size=600),
       st.dictionaries(st.sampled_from(sorted(p.TaskResult.CHECKS) + ["type", "schema", "extra"]), JSON_VALUES,
                       max_size=2))
def test_task_result_frames_with_arbitrary_specs_and_headers(specs: list, data: bytes, changes: dict) -> None:
    head, _ = p._unframe(_task_result_frame(), p.TaskResult.TYPE)
    frame = p._frame({**head, "outputs": specs, **changes}, data)
    try:
        result = p.TaskResult.from_payload(frame)
    except ProtocolError:
        assert _decode_only_protocol_errors(frame) is None  # decode() refuses it the same way
        return
    assert sum(a.nbytes for a in result.outputs) == len(data)
    assert all(a.dtype.name in p.TENSOR_DTYPES for a in result.outputs)
    assert _decode_only_protocol_errors(frame) == result  # and it re-encodes to itself


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "header_length"]), st.integers(0, 10 ** 6),
                          st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
def test_mutated_task_result_frames(mutations: list) -> None:
    frame = bytearray(_task_result_frame())
    for kind, at, junk in mutations:
        i = at % (len(frame) + 1)
        if kind == "flip" and i < len(frame):
            frame[i] ^= junk[0] or 0xFF
        elif kind == "cut":
            del frame[i:]
        elif kind == "insert":
            frame[i:i] = junk
        elif kind == "header_length" and len(frame) >= 9:  # the frame's own count of header bytes lies
            frame[5:9] = (at % (2 ** 32)).to_bytes(4, "big")
    raw = bytes(frame)
    _decode_only_protocol_errors(raw)
    try:
        p.TaskResult.from_payload(raw)
    except ProtocolError:
        pass


@SETTINGS
@given(st.dictionaries(st.sampled_from(["bundle_sha256", "index", "count", "sha256", "type"]), JSON_VALUES,
                       max_size=3), st.binary(max_size=64))
def test_chunk_frames_with_arbitrary_headers(changes: dict, data: bytes) -> None:
    head = {"type": "chunk", "bundle_sha256": "a" * 64, "index": 0, "count": 1, "sha256": "b" * 64, **changes}
    try:
        chunk = p.Chunk.from_payload(p._frame(head, data))
    except ProtocolError:
        return
    assert p.Chunk.from_payload(chunk.to_payload()) == chunk


IDS = st.text(alphabet=string.printable + "\ud800é/", max_size=140)


@SETTINGS
@given(IDS)
def test_ids_are_exactly_the_safe_names(value: str) -> None:
    ok = bool(p.ID_PATTERN.fullmatch(value))
    try:
        p.topic(value, "status")
        assert ok
    except ProtocolError:
        assert not ok
    if ok:
        assert ".." != value and "/" not in value and not value.startswith((".", "-"))


@SETTINGS
@given(st.dictionaries(st.sampled_from(["task", "index", "count", "total", "sha256", "type"]), JSON_VALUES, max_size=3),
       st.integers(min_value=1, max_value=5), st.binary(min_size=1, max_size=300))
def test_task_piece_frames_with_arbitrary_headers(changes: dict, count: int, data: bytes) -> None:
    head = {"type": "task_piece", "task": "t-1", "index": 0, "count": count, "total": len(data) * count,
            "sha256": "ab" * 32, **changes}
    try:
        piece = p.decode_task_channel(p._frame(head, data))
    except ProtocolError:
        return
    assert isinstance(piece, p.TaskPiece)
    assert len(piece.data) == p.piece_span(piece.index, piece.count, piece.total)[1] > 0
    assert p.TaskPiece.from_payload(piece.to_payload()) == piece


@SETTINGS
@given(st.sampled_from(sorted(p.TENSOR_DTYPES)), JSON_VALUES | st.lists(st.integers(-300, 300) | st.floats(), max_size=3))
def test_task_inputs_with_arbitrary_quant(dtype: str, quant: object) -> None:
    head = {"type": "task", "id": "t-1", "job": "j", "model": "m", "lease_s": 5.0,
            "inputs": [{"dtype": dtype, "shape": [1], "quant": quant}]}
    try:
        task = p.Task.from_payload(p._frame(head, b"\0" * np.dtype(dtype).itemsize))
    except ProtocolError:
        return
    q = task.quant_of(0)
    assert q is None or (dtype in p.QUANT_DTYPES and q[0] > 0 and p.QUANT_DTYPES[dtype][0] <= q[1] <= p.QUANT_DTYPES[dtype][1])
    p.Task.from_payload(task.to_payload())
