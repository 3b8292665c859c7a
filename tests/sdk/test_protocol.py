import json

import pytest

from sdk import protocol as p
from sdk.errors import ProtocolError


def test_topics_come_from_one_template() -> None:
    assert p.topic("pi-7", "status") == "edgesdk/v1/devices/pi-7/status"
    assert p.parse_topic(p.topic("pi-7", "up")) == ("pi-7", "up")
    assert p.subscription("heartbeat") == "edgesdk/v1/devices/+/heartbeat"
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(ProtocolError):
            p.topic(bad, "status")
    with pytest.raises(ProtocolError):
        p.topic("d", "nope")
    with pytest.raises(ProtocolError):
        p.parse_topic("other/v1/devices/d/status")


def test_messages_round_trip_with_schema_and_type() -> None:
    msgs = [
        p.Status(device="d", models={"digits": "1"}, tags={"site": "x"}),
        p.Heartbeat(device="d", models={"digits": {"p50_ms": 0.1}}),
        p.InstallCommand(model="digits", version="2", bundle_sha256="a" * 64, bundle_size=300_000),
        p.RollbackCommand(model="digits"),
        p.Ack(ack_ids=["x", "y"]),
        p.InstallStatus(device="d", model="digits", version="2", state="FAILED", reason="verify failed"),
        p.ChunkRequest(device="d", bundle_sha256="a" * 64, indices=[0, 2]),
    ]
    for m in msgs:
        raw = m.to_payload()
        assert json.loads(raw)["schema"] == p.SCHEMA_VERSION
        again = p.decode(raw)
        assert type(again) is type(m) and again == m
    assert msgs[2].chunks == 3


def test_validation_and_newer_schema_are_refused() -> None:
    with pytest.raises(ProtocolError, match="install.bundle_sha256 must be a sha256"):
        p.InstallCommand(model="m", version="1", bundle_sha256="short", bundle_size=1).to_payload()
    with pytest.raises(ProtocolError, match="install_status.state must be one of"):
        p.InstallStatus(device="d", model="m", state="DONE").to_payload()
    newer = json.dumps({"schema": p.SCHEMA_VERSION + 1, "type": "ack", "ack_ids": []}).encode()
    with pytest.raises(ProtocolError, match="upgrade edgesdk"):
        p.decode(newer)
    with pytest.raises(ProtocolError, match="unknown message type"):
        p.decode(json.dumps({"schema": 1, "type": "launch"}).encode())
    with pytest.raises(ProtocolError, match="not JSON"):
        p.decode(b"\xff")
    with pytest.raises(ProtocolError, match="expected a ack"):
        p.Ack.from_payload(p.RollbackCommand(model="m").to_payload())


def test_chunks_are_binary_framed() -> None:
    data = bytes(range(256)) * 512  # 128 KiB, the maximum
    c = p.Chunk("a" * 64, 3, 5, "b" * 64, data)
    raw = c.to_payload()
    assert len(raw) < len(data) + 300  # a small header, no base64 inflation
    again = p.Chunk.from_payload(raw)
    assert again == c
    with pytest.raises(ProtocolError):
        p.Chunk.from_payload(b"ESDK")
    with pytest.raises(ProtocolError, match="must be below chunk.count"):
        p.Chunk.from_payload(p.Chunk("a" * 64, 5, 5, "b" * 64, b"").to_payload())


def test_task_frames_carry_raw_tensors_and_reject_bad_lengths() -> None:
    import numpy as np

    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    ids = np.array([[1], [2], [3]], dtype=np.int64)
    task = p.Task("job1-0", "job1", "digits", 30.0, [x, ids], attempt=2)
    back = p.Task.from_payload(task.to_payload())
    assert (back.id, back.job, back.model, back.lease_s, back.attempt, back.count) == ("job1-0", "job1", "digits", 30.0, 2, 3)
    np.testing.assert_array_equal(back.inputs[0], x)
    np.testing.assert_array_equal(back.inputs[1], ids)
    with pytest.raises(ProtocolError, match=r"task.inputs\[1\] needs 24 bytes, the frame holds 20"):
        p.Task.from_payload(task.to_payload()[:-4])
    with pytest.raises(ProtocolError, match="expected a task frame"):
        p.Task.from_payload(p.split_bundle(b"abc")[0].to_payload())


def test_work_requests_fleet_status_and_task_results_validate() -> None:
    wr = p.decode(p.WorkRequest(device="d", models={"m": "1"}, capacity=2, free=1, running=["t"]).to_payload())
    assert (wr.capacity, wr.free, wr.running) == (2, 1, ["t"])
    with pytest.raises(ProtocolError, match=r"work_request.capacity must be an integer in 0\.\.4096"):
        p.WorkRequest(device="d", capacity=-1).to_payload()
    fs = p.decode(p.FleetStatus(online=True, session="s1").to_payload())
    assert fs.session == "s1" and p.fleet_topic() == "edgesdk/v1/fleet/status"
    with pytest.raises(ProtocolError, match="task_result.device must be an id"):
        p.TaskResult(device="", job="j", task="t", model="m").to_payload()
    assert p.topic("d", "task") == "edgesdk/v1/devices/d/task"


# --- the trust boundary: every field of every message checked --------------------------------------
import dataclasses  # noqa: E402
import inspect  # noqa: E402

import numpy as np  # noqa: E402

SHA = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4
THIRD = "00112233445566778899aabbccddeeff" * 2


def valid_messages() -> dict[type, object]:
    """One valid instance of every message class, with every field set to something non-default."""
    t = p.Result.encode_tensor(np.ones((2, 3), np.float32))
    return {
        p.Status: p.Status(device="d-1", agent_version="1.0", runtime={"name": "litert"}, delegates=["xnnpack"],
                           models={"digits": "2"}, tags={"site": "lab 4"}, free_disk_bytes=10, accepting_work=False,
                           bundles=[SHA, OTHER], config={"threads": 2, "tags": {"site": "lab 4"}}, config_revision=3,
                           config_note="models.digits: version 9 is not on this device"),
        p.Heartbeat: p.Heartbeat(device="d-1", uptime_s=3.5, models={"digits": {"version": "2", "p50_ms": 0.4,
                                                                              "requests": 10}}, outbox_pending=1),
        p.InstallCommand: p.InstallCommand(model="digits", version="2", bundle_sha256=SHA, bundle_size=5,
                                           chunk_size=2, rollout="r1", min_runtime_version="2.3",
                                           delta={"method": "zstd", "base_sha256": OTHER, "sha256": THIRD, "size": 3},
                                           window=16),
        p.RollbackCommand: p.RollbackCommand(model="digits", to_version="1", rollout="r1"),
        p.ConfigCommand: p.ConfigCommand(revision=3, config={"tags": {"site": "lab 4"}, "threads": 2, "pool_size": 2,
                                                             "heartbeat_interval": 5.0, "work_slots": 1,
                                                             "models": {"digits": "2"}}),
        p.Ack: p.Ack(ack_ids=["a1", "b2"]),
        p.InstallStatus: p.InstallStatus(device="d-1", model="digits", version="2", state="SUCCEEDED", reason="ok",
                                         rollout="r1", previous_version="1", p50_ms=0.5, previous_p50_ms=0.6,
                                         bundle_sha256=SHA, via="full", fallback=True),
        p.ChunkRequest: p.ChunkRequest(device="d-1", bundle_sha256=SHA, indices=[0, 3]),
        p.Chunk: p.Chunk(SHA, 1, 3, SHA, b"xyz"),
        p.Result: p.Result(device="d-1", model="digits", version="2", key="frame 7", outputs=[t],
                           meta={"camera": "front", "n": 3, "ok": True, "none": None}),
        p.FleetStatus: p.FleetStatus(online=False, session="s1"),
        p.WorkRequest: p.WorkRequest(device="d-1", models={"digits": "2"}, capacity=4, free=2, running=["t1"],
                                     prefetch=3, done=["t0"]),
        p.Task: p.Task("j1-0", "j1", "digits", 30.0, [np.ones((2, 8), np.int8), np.zeros((2,), np.bool_)],
                       attempt=3, quant=[[0.05, -3], None]),
        p.TaskPiece: p.TaskPiece("j1-0", 1, 3, 8, SHA, b"xyz"),
        p.TaskResult: p.TaskResult(device="d-1", job="j1", task="j1-0", model="digits", version="2",
                                   outputs=[t], error="", elapsed_s=0.1, samples=2),
    }


def _declared_message_classes() -> set[type]:
    """Every class in sdk.protocol that is a message: a dataclass with a TYPE."""
    return {c for _, c in inspect.getmembers(p, inspect.isclass)
            if c.__module__ == p.__name__ and dataclasses.is_dataclass(c) and getattr(c, "TYPE", "")}


def test_every_message_class_declares_one_check_per_field() -> None:
    declared = _declared_message_classes()
    assert declared == set(p.MESSAGE_CLASSES), "add the new message class to MESSAGE_CLASSES"
    assert declared == set(valid_messages()), "add the new message class to valid_messages() here"
    for cls in declared:
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.CHECKS) == names, f"{cls.__name__}: fields without a check: {names - set(cls.CHECKS)}"


@pytest.mark.parametrize("cls", p.MESSAGE_CLASSES, ids=lambda c: c.__name__)
def testvalid_messages_round_trip(cls: type) -> None:
    msg = valid_messages()[cls]
    back = cls.from_payload(msg.to_payload())
    if cls is p.Task:
        assert (back.id, back.job, back.model, back.lease_s, back.attempt) == ("j1-0", "j1", "digits", 30.0, 3)
        assert back.quant == [[0.05, -3], None] and back.quant_of(0) == (0.05, -3) and back.quant_of(1) is None
        for a, b in zip(back.inputs, msg.inputs):
            np.testing.assert_array_equal(a, b)
    elif cls is p.TaskResult:  # binary: outputs are arrays, compared as such
        assert dataclasses.replace(back, outputs=[]) == dataclasses.replace(msg, outputs=[])
        assert [(a.dtype, a.shape) for a in back.outputs] == [(a.dtype, a.shape) for a in msg.outputs]
        for a, b in zip(back.outputs, msg.outputs):
            np.testing.assert_array_equal(a, b)
    else:
        assert back == msg


# values no field of any message accepts: a map of lists, an integer beyond every bound, a lone surrogate
HOSTILE_VALUES = [{"a": [1]}, 2 ** 64, "\ud800", "../../etc"]


def test_a_configuration_takes_only_known_settings_of_their_types() -> None:
    good = valid_messages()[p.ConfigCommand].to_dict()
    for config, where in [({"threads": 0}, "config.threads"), ({"threads": True}, "config.threads"),
                          ({"heartbeat_interval": 0.1}, "config.heartbeat_interval"), ({"shell": "rm"}, "config"),
                          ({"models": {"digits": "../1"}}, "config.models"), ({"tags": ["a"]}, "config.tags")]:
        with pytest.raises(ProtocolError, match=rf"config\.{where}\b"):
            p.decode(json.dumps({**good, "config": config}).encode())


def _json_cases() -> list[tuple[type, str]]:
    return [(c, f.name) for c in p.MESSAGE_CLASSES if issubclass(c, p.Message) for f in dataclasses.fields(c)]


@pytest.mark.parametrize(("cls", "name"), _json_cases(), ids=lambda v: getattr(v, "__name__", v))
def test_every_json_field_refuses_hostile_values_naming_the_field(cls: type, name: str) -> None:
    good = valid_messages()[cls].to_dict()
    refused = 0
    for value in HOSTILE_VALUES:
        if name in ("reason", "error", "key", "agent_version", "min_runtime_version", "config_note") and value == "../../etc":
            continue  # free text may say anything printable
        raw = json.dumps({**good, name: value}).encode()
        with pytest.raises(ProtocolError, match=rf"{cls.TYPE}\.{name}\b"):
            p.decode(raw)
        refused += 1
    assert refused >= 3


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,                                   # nesting deeper than the parser
    b'{"schema":1,"type":"ack","ack_ids":[' + b"9" * 5000 + b"]}",     # past Python's int-digit limit
    b'{"schema":1,"type":"install","model":"m","version":"1","bundle_sha256":"' + SHA.encode()
    + b'","bundle_size":NaN}',
    b'{"schema":1,"type":"chunk_request","device":"d","bundle_sha256":"' + SHA.encode() + b'","indices":[Infinity]}',
    b'{"schema":1,"type":"install","model":"m","version":"1","bundle_sha256":"' + SHA.encode()
    + b'","bundle_size":"NaN"}',
    b'{"schema":1,"type":"status","device":"d","free_disk_bytes":"12"}',
    b'{"schema":1,"type":"status","device":{}}',
    b'{"schema":1,"type":"status","device":"d","online":"yes"}',
    b'{"schema":1,"type":"status","device":"d","ts":18446744073709551616}',
    b'{"schema":1,"type":"install","model":"m","version":"1","bundle_sha256":"' + b"./" * 32 + b'","bundle_size":9}',
    b'{"schema":1,"type":"install","model":"m","version":"..","bundle_sha256":"' + SHA.encode() + b'","bundle_size":9}',
    b'{"schema":1,"type":"ack","ack_ids":[{}]}',
    b'{"schema":true,"type":"ack"}',
    b'{"schema":1,"type":["ack"]}',
    b'"just a string"',
    b"\xed\xa0\x80",
])
def test_hostile_json_payloads_raise_protocol_error_only(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode(raw)


def _result_with(tensor: object) -> bytes:
    return json.dumps({**valid_messages()[p.TaskResult].to_dict(), "outputs": [tensor]}).encode()


@pytest.mark.parametrize(("tensor", "why"), [
    ({"dtype": "object", "shape": [1], "b64": "AAAAAAAAAAA="}, "dtype must be one of"),
    ({"dtype": "V8", "shape": [1], "b64": "AAAAAAAAAAA="}, "dtype must be one of"),
    ({"dtype": "float32", "shape": [1] * 9, "b64": "AAAAAA=="}, "shape must be a list of 0..8"),
    ({"dtype": "float32", "shape": [-1], "b64": ""}, "shape must hold integers"),
    ({"dtype": "float32", "shape": [1 << 20, 1 << 20], "b64": ""}, "must hold at most"),
    ({"dtype": "float32", "shape": [2], "b64": "AAAAAA=="}, r"b64 must be the base64 of exactly 8 bytes"),
    ({"dtype": "float32", "shape": [1], "b64": "AA!A"}, r"b64 must be the base64 of exactly 4 bytes"),
    ({"dtype": "float32", "shape": [1], "b64": "AAAAAAAA"}, r"b64 must be the base64 of exactly 4 bytes"),
    ({"dtype": "float32", "shape": [1], "b64": "AAAAAAA="}, r"b64 must be the base64"),
    ({"dtype": "float32", "shape": [1]}, "exactly dtype, shape and b64"),
    ([1, 2], "exactly dtype, shape and b64"),
])
def test_tensor_specs_are_numeric_bounded_and_match_their_bytes(tensor: object, why: str) -> None:
    with pytest.raises(ProtocolError, match=rf"task_result\.outputs\[0\].*{why}"):
        p.decode(_result_with(tensor))
    with pytest.raises(ProtocolError):
        p.Result.decode_tensor(tensor)  # type: ignore[arg-type]


def test_decoded_tensors_are_exact() -> None:
    for a in (np.arange(7, dtype=np.uint8), np.ones((2, 3), np.float16), np.array(True), np.zeros((0, 4), np.int64)):
        enc = p.Result.encode_tensor(a)
        back = p.Result.decode_tensor(json.loads(_result_with(enc))["outputs"][0])
        assert back.dtype == a.dtype and back.shape == a.shape and (back == a).all()


def _task_frame(header: dict, data: bytes) -> bytes:
    return p._frame({"type": "task", **header}, data)


@pytest.mark.parametrize(("header", "data", "why"), [
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "O", "shape": [1]}]}, b"x" * 8,
     r"task.inputs\[0\].dtype must be one of"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "uint8", "shape": []}]}, b"x",
     r"task.inputs\[0\].shape must be a list of 1..8"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "uint8", "shape": [0]}]}, b"",
     "batch size of at least 1"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "uint8", "shape": [2]},
                                                                     {"dtype": "uint8", "shape": [3]}]}, b"x" * 5,
     "share one batch size"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "uint8", "shape": [2]}]}, b"x" * 3,
     "1 bytes beyond its inputs"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": []}, b"", "at least one tensor"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": float("inf"), "inputs": [{"dtype": "uint8", "shape": [1]}]},
     b"x", "not a number JSON allows"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "attempt": 2 ** 70,
      "inputs": [{"dtype": "uint8", "shape": [1]}]}, b"x", "task.attempt must be an integer"),
    ({"id": "../t", "job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "uint8", "shape": [1]}]}, b"x",
     "task.id must be an id"),
    ({"job": "j", "model": "m", "lease_s": 5, "inputs": [{"dtype": "uint8", "shape": [1]}]}, b"x",
     "task frame lacks id"),
    ({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [["uint8", [1]]]}, b"x",
     r"task.inputs\[0\] must be a tensor spec"),
])
def test_task_frames_refuse_bad_specs_naming_the_field(header: dict, data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.Task.from_payload(_task_frame(header, data))


@pytest.mark.parametrize("raw", [
    b"ESDK\x01\xff\xff\xff\xff{}",                          # header length past the message
    b"ESDK\x00\x00\x00\x00\x02{}",                          # schema 0
    b"ESDK\x01\x00\x00\x00\x02[]",
    p._frame({"type": "chunk", "bundle_sha256": SHA, "index": True, "count": 2, "sha256": SHA}, b""),
    p._frame({"type": "chunk", "bundle_sha256": SHA, "index": 0, "count": 2 ** 64, "sha256": SHA}, b""),
    p._frame({"type": "chunk", "bundle_sha256": SHA.upper(), "index": 0, "count": 2, "sha256": SHA}, b""),
    p._frame({"type": "chunk", "bundle_sha256": SHA, "index": 0, "count": 2, "sha256": SHA}, b"x" * (p.CHUNK_SIZE + 1)),
    "not bytes",
])
def test_chunk_frames_refuse_bad_headers(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.Chunk.from_payload(raw)  # type: ignore[arg-type]


def test_topics_take_only_ids() -> None:
    for bad in ("..", "a b", "\ud800", "x" * 129, ".hidden"):
        with pytest.raises(ProtocolError, match="device id must be an id"):
            p.topic(bad, "status")
        with pytest.raises(ProtocolError):
            p.parse_topic(f"edgesdk/v1/devices/{bad}/status")
    assert p.subscription("up") == "edgesdk/v1/devices/+/up" and p.subscription("up", "d-1").endswith("d-1/up")


def test_clip_text_keeps_reasons_within_the_limit() -> None:
    assert p.clip_text("x" * 10) == "x" * 10
    long = p.clip_text("x" * (p.MAX_TEXT + 50))
    assert len(long) == p.MAX_TEXT and long.endswith("...")
    p.InstallStatus(device="d", model="m", version="1", state="FAILED", reason=long).to_payload()


def _install_with_delta(**delta) -> bytes:
    good = {"method": "zstd", "base_sha256": OTHER, "sha256": THIRD, "size": 1000}
    cmd = valid_messages()[p.InstallCommand].to_dict()
    cmd.update(bundle_size=300_000, chunk_size=p.CHUNK_SIZE, delta={**good, **delta})
    return json.dumps({k: v for k, v in cmd.items()}).encode()


@pytest.mark.parametrize(("delta", "why"), [
    ({"method": "xdelta3"}, r"install.delta.method must be one of zstd-zip, zstd, bsdiff4"),
    ({"method": ["zstd"]}, r"install.delta.method must be one of"),
    ({"base_sha256": "../../models/digits/1/bundle"}, r"install.delta.base_sha256 must be a sha256"),
    ({"base_sha256": SHA.upper()}, r"install.delta.base_sha256 must be a sha256"),
    ({"sha256": None}, r"install.delta.sha256 must be a sha256"),
    ({"size": 0}, r"install.delta.size must be an integer in 1\.\."),
    ({"size": 2 ** 64}, r"install.delta.size must be an integer"),
    ({"size": True}, r"install.delta.size must be an integer"),
    ({"size": 1000.5}, r"install.delta.size must be an integer"),
    ({"size": 300_000}, r"install.delta.size 300000 must be below the bundle's 300000 bytes"),
    ({"size": 10 ** 9}, r"install.delta.size 1000000000 must be below the bundle's"),
    ({"base_sha256": SHA}, r"three different sha256s"),  # the base is the bundle itself
    ({"sha256": OTHER}, r"three different sha256s"),
    ({"path": "/etc/passwd"}, r"install.delta must be an object with exactly base_sha256, method, sha256, size"),
])
def test_install_deltas_are_checked_totally(delta: dict, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.decode(_install_with_delta(**delta))


def test_install_delta_shapes_and_blob() -> None:
    for bad in ([], "zstd", {"method": "zstd"}, {"method": "zstd", "base_sha256": OTHER, "sha256": THIRD}):
        raw = json.loads(_install_with_delta())
        raw["delta"] = bad
        with pytest.raises(ProtocolError, match=r"install.delta must be an object with exactly"):
            p.decode(json.dumps(raw).encode())
    cmd = p.decode(_install_with_delta())
    blob = cmd.delta_blob()  # what the agent's transfer fetches: the delta's own chunks
    assert (blob.bundle_sha256, blob.bundle_size, blob.delta, blob.chunks) == (THIRD, 1000, None, 1)
    assert (blob.model, blob.version, blob.rollout, blob.chunk_size) == (cmd.model, cmd.version, cmd.rollout, cmd.chunk_size)
    assert cmd.without_delta().delta is None and cmd.without_delta().bundle_sha256 == SHA
    with pytest.raises(ProtocolError, match="has no delta"):
        cmd.without_delta().delta_blob()


def test_status_bundles_and_install_status_fallback_are_checked() -> None:
    with pytest.raises(ProtocolError, match=r"status.bundles\[1\] must be a sha256"):
        p.Status(device="d", bundles=[SHA, "../x"]).to_payload()
    with pytest.raises(ProtocolError, match=r"status.bundles must be a list of at most 256"):
        p.Status(device="d", bundles=[SHA] * 257).to_payload()
    with pytest.raises(ProtocolError, match=r"install_status.via must be one of full, delta"):
        p.InstallStatus(device="d", model="m", version="1", state="DOWNLOADING", via="patch").to_payload()
    with pytest.raises(ProtocolError, match="fallback means the full bundle"):
        p.InstallStatus(device="d", model="m", version="1", state="DOWNLOADING", via="delta", fallback=True).to_payload()


# --- tasks in pieces, fleet-quantised task inputs ---------------------------------------------------------
def _piece_frame(**header: object) -> bytes:
    head = {"task": "j-0", "index": 0, "count": 2, "total": 5, "sha256": SHA, **header}
    data = head.pop("data", b"xyz")
    return p._frame({"type": "task_piece", **head}, data)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "why"), [
    (_piece_frame(index=2), "task_piece.index 2 must be below task_piece.count 2"),
    (_piece_frame(index=-1), "task_piece.index must be an integer"),
    (_piece_frame(count=0), "task_piece.count must be an integer"),
    (_piece_frame(count=6), "task_piece.count 6 cuts 5 bytes into empty pieces"),
    (_piece_frame(count=4, total=5, index=3, data=b"x"), "leaves piece 3 of 5 bytes empty"),
    (_piece_frame(data=b"xy"), "holds 2 bytes; piece 0 of 2 of 5 bytes holds 3"),
    (_piece_frame(index=1, data=b"xyz"), "holds 3 bytes; piece 1 of 2 of 5 bytes holds 2"),
    (_piece_frame(total=p.MAX_TASK_BYTES + 1), "task_piece.total must be an integer"),
    (_piece_frame(total=True), "task_piece.total must be an integer"),
    (_piece_frame(sha256="x" * 64), "task_piece.sha256 must be a sha256"),
    (_piece_frame(task="../etc"), "task_piece.task must be an id"),
    (p._frame({"type": "task_piece", "index": 0, "count": 1, "total": 1, "sha256": SHA}, b"x"), "lacks task"),
])
def test_task_pieces_are_checked_together_naming_the_field(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.TaskPiece.from_payload(raw)
    with pytest.raises(ProtocolError):
        p.decode_task_channel(raw)


def test_a_task_splits_into_pieces_that_rebuild_it_exactly() -> None:
    task = p.Task("j-3", "j", "m", 5.0, [np.arange(3000, dtype=np.float32).reshape(3, 1000)])
    frame = task.to_payload()
    pieces = p.split_task(frame, task.id, 1000)
    assert len(pieces) == -(-len(frame) // 1000) and all(len(x.data) <= 1000 for x in pieces)
    decoded = [p.decode_task_channel(x.to_payload()) for x in pieces]
    assert all(isinstance(x, p.TaskPiece) for x in decoded)
    assert b"".join(x.data for x in decoded) == frame  # type: ignore[union-attr]
    assert isinstance(p.decode_task_channel(frame), p.Task)
    with pytest.raises(ProtocolError, match="raise the broker's packet limit"):
        p.split_task(b"x" * (p.MAX_PIECES + 1), "j-3", 1)


@pytest.mark.parametrize(("spec", "why"), [
    ({"dtype": "float32", "shape": [1], "quant": [0.1, 0]}, r"task.inputs\[0\].quant is allowed only on a int8"),
    ({"dtype": "int8", "shape": [4], "quant": [0.1, 128]}, r"task.inputs\[0\].quant\[1\] \(the zero point\)"),
    ({"dtype": "uint8", "shape": [4], "quant": [0.1, -1]}, r"quant\[1\] \(the zero point\) must be in 0..255"),
    ({"dtype": "int8", "shape": [4], "quant": [0.0, 0]}, r"task.quant\[0\]\[0\] must be a number"),
    ({"dtype": "int8", "shape": [4], "quant": [0.1]}, r"task.quant\[0\] must be \[scale, zero_point\]"),
    ({"dtype": "int8", "shape": [4], "quant": [0.1, 1.5]}, r"task.quant\[0\]\[1\] must be an integer"),
    ({"dtype": "int8", "shape": [4], "quant": [0.1, 0], "extra": 1}, "must hold only dtype, shape and quant"),
])
def test_fleet_quantised_task_inputs_are_checked(spec: dict, why: str) -> None:
    n = 4 if spec["shape"] == [4] else 4
    with pytest.raises(ProtocolError, match=why):
        p.Task.from_payload(_task_frame({"id": "t", "job": "j", "model": "m", "lease_s": 5, "inputs": [spec]}, b"x" * n))


def _install_raw(**fields) -> bytes:
    return json.dumps({"schema": 1, "type": "install", "model": "m", "version": "1", "bundle_sha256": SHA,
                       "bundle_size": 300_000, **fields}).encode()


@pytest.mark.parametrize(("window", "why"), [
    (0, r"install.window must be an integer in 1\.\.64"),
    (-1, r"install.window must be an integer in 1\.\.64"),
    (65, r"install.window must be an integer in 1\.\.64"),
    (2 ** 63, r"install.window must be an integer"),
    (True, r"install.window must be an integer"),
    (8.0, r"install.window must be an integer"),
    ("8", r"install.window must be an integer"),
    (None, r"install.window must be an integer"),
    ([8], r"install.window must be an integer"),
])
def test_install_window_is_checked(window: object, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.decode(_install_raw(window=window))


def test_install_window_defaults_and_chunk_requests_stay_within_the_largest_window() -> None:
    assert p.decode(_install_raw()).window == p.CHUNK_WINDOW  # an older fleet's command: the default window
    assert p.decode(_install_raw(window=p.MAX_WINDOW)).window == p.MAX_WINDOW
    ok = p.ChunkRequest(device="d", bundle_sha256=SHA, indices=list(range(p.MAX_WINDOW)))
    assert p.decode(ok.to_payload()).indices == list(range(p.MAX_WINDOW))
    raw = ok.to_dict()
    for indices, why in ((list(range(p.MAX_WINDOW + 1)), r"chunk_request.indices must be a list of at most 64"),
                         ([0, p.MAX_CHUNKS], r"chunk_request.indices\[1\] must be an integer"),
                         ([0, -1], r"chunk_request.indices\[1\] must be an integer"),
                         ([True], r"chunk_request.indices\[0\] must be an integer"),
                         ("0,1", r"chunk_request.indices must be a list")):
        with pytest.raises(ProtocolError, match=why):
            p.decode(json.dumps({**raw, "indices": indices}).encode())


# --- binary task results ---------------------------------------------------------------------------
def _result_frame(header: dict, data: bytes) -> bytes:
    good = {k: v for k, v in valid_messages()[p.TaskResult].to_dict().items() if k not in ("schema", "outputs")}
    return p._frame({**good, "outputs": [{"dtype": "float32", "shape": [2, 3]}], **header}, data)


def test_task_results_travel_as_binary_frames_and_the_json_form_still_decodes() -> None:
    msg = p.TaskResult(device="d-1", job="j1", task="j1-0", model="digits", version="2", samples=3,
                       outputs=[np.arange(30, dtype=np.float32).reshape(3, 10), np.array([1, 0, 1], np.int8)])
    raw = msg.to_payload()
    assert raw[:4] == b"ESDK" and b"b64" not in raw  # raw bytes after the header, no base64
    assert len(raw) < 30 * 4 + 3 + 600
    back = p.decode(raw)  # what the fleet calls for every message on "up"
    assert isinstance(back, p.TaskResult) and (back.id, back.ts, back.samples) == (msg.id, msg.ts, 3)
    np.testing.assert_array_equal(back.outputs[0], msg.outputs[0])
    assert back.outputs[1].dtype == np.int8 and back.outputs[1].tolist() == [1, 0, 1]
    legacy = p.decode(json.dumps(msg.to_dict()).encode())  # an agent from before binary results
    np.testing.assert_array_equal(legacy.outputs[0], msg.outputs[0])
    error = p.decode(p.TaskResult(device="d-1", job="j1", task="j1-0", model="m", error="no model").to_payload())
    assert error.outputs == [] and error.error == "no model"


@pytest.mark.parametrize(("header", "data", "why"), [
    ({}, b"x" * 23, r"task_result.outputs\[0\] needs 24 bytes, the frame holds 23"),
    ({}, b"x" * 25, "1 bytes beyond its outputs"),
    ({"outputs": [{"dtype": "object", "shape": [1]}]}, b"x" * 8, r"outputs\[0\].dtype must be one of"),
    ({"outputs": [{"dtype": "float32", "shape": [1] * 9}]}, b"x" * 4, r"outputs\[0\].shape must be a list of 0..8"),
    ({"outputs": [{"dtype": "float32", "shape": [-1]}]}, b"", "shape must hold integers"),
    ({"outputs": [{"dtype": "float32", "shape": [1 << 20, 1 << 20]}]}, b"", "must hold at most"),
    ({"outputs": [{"dtype": "float32", "shape": [2], "b64": ""}]}, b"x" * 8, "exactly dtype and shape"),
    ({"outputs": [["float32", [2]]]}, b"x" * 8, "exactly dtype and shape"),
    ({"outputs": {"dtype": "float32"}}, b"", "task_result.outputs must be a list"),
    ({"outputs": [{"dtype": "uint8", "shape": [1]}] * (p.MAX_TENSORS + 1)}, b"x" * (p.MAX_TENSORS + 1),
     "task_result.outputs must be a list of at most"),
    ({"samples": -1}, b"x" * 24, "task_result.samples must be an integer"),
    ({"samples": True}, b"x" * 24, "task_result.samples must be an integer"),
    ({"elapsed_s": "0.1"}, b"x" * 24, "task_result.elapsed_s must be a number"),
    ({"device": "../d"}, b"x" * 24, "task_result.device must be an id"),
    ({"task": ""}, b"x" * 24, "task_result.task must be an id"),
    ({"error": "\ud800"}, b"x" * 24, "task_result.error must be valid Unicode"),
    ({"ts": 2.0 ** 41}, b"x" * 24, "task_result.ts must be a number"),
    ({"id": None}, b"x" * 24, "task_result.id must be an id"),
    ({"type": "task"}, b"x" * 24, "expected a task_result frame"),
])
def test_binary_task_results_refuse_bad_headers_naming_the_field(header: dict, data: bytes, why: str) -> None:
    raw = _result_frame(header, data)
    with pytest.raises(ProtocolError, match=why):
        p.TaskResult.from_payload(raw)
    with pytest.raises(ProtocolError):
        p.decode(raw)


def test_binary_task_results_need_every_header_field() -> None:
    good = {k: v for k, v in valid_messages()[p.TaskResult].to_dict().items() if k not in ("schema", "outputs")}
    for name in good:
        if name == "type":
            continue
        head = {k: v for k, v in good.items() if k != name}
        raw = p._frame({**head, "outputs": []}, b"")
        with pytest.raises(ProtocolError, match=rf"task_result frame lacks {name}"):
            p.decode(raw)
    for raw in (b"ESDK", b"ESDK\x01\xff\xff\xff\xff{}", b"ESDK\x07\x00\x00\x00\x02{}", b"ESDK\x01\x00\x00\x00\x02[]"):
        with pytest.raises(ProtocolError):
            p.decode(raw)


def test_task_results_refuse_outputs_that_are_not_numeric_arrays() -> None:
    with pytest.raises(ProtocolError, match=r"task_result.outputs\[0\] must be an object with exactly dtype"):
        p.TaskResult(device="d", job="j", task="t", model="m", outputs=[[1.0]])
    msg = p.TaskResult(device="d", job="j", task="t", model="m", outputs=[np.zeros(2)])
    msg.outputs = ["not an array"]
    with pytest.raises(ProtocolError, match=r"task_result.outputs\[0\] must be a numpy array"):
        msg.to_payload()
    with pytest.raises(ProtocolError, match=r"task_result.outputs\[0\].dtype must be one of"):
        p.TaskResult(device="d", job="j", task="t", model="m", outputs=[np.array(["a"])]).to_payload()


def test_work_requests_announce_prefetch_within_bounds() -> None:
    wr = p.WorkRequest.of_device("d", {"m": "1"}, capacity=2, prefetch=3, held=["a", "b", "c"])
    assert (wr.capacity, wr.prefetch, wr.free, wr.running) == (2, 3, 2, ["a", "b", "c"])  # free <= capacity
    assert p.WorkRequest.of_device("d", {"m": "1"}, 2, 3, ["t"] * 5).free == 0
    assert p.WorkRequest.of_device("d", {}, 2, 3, []).free == 0
    assert p.WorkRequest.of_device("d", {"m": "1"}, 2, 3, [], accepting=False).free == 0
    assert not p.WorkRequest.holds_too_many(9, 2, 3) and p.WorkRequest.holds_too_many(10, 2, 3)
    with pytest.raises(ProtocolError, match=r"work_request.prefetch must be an integer in 0\.\.64"):
        p.WorkRequest(device="d", prefetch=65).to_payload()
    old = json.loads(p.WorkRequest(device="d", capacity=1, free=1).to_payload())
    del old["prefetch"]  # an agent from before prefetch: 0
    assert p.decode(json.dumps(old).encode()).prefetch == 0
