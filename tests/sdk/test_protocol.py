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
    with pytest.raises(ProtocolError, match="needs model"):
        p.InstallCommand(model="m", version="1", bundle_sha256="short", bundle_size=1).to_payload()
    with pytest.raises(ProtocolError, match="is not one of"):
        p.InstallStatus(device="d", state="DONE").to_payload()
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
    with pytest.raises(ProtocolError, match="out of range"):
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
    with pytest.raises(ProtocolError, match="bad task frame"):
        p.Task.from_payload(task.to_payload()[:-4])
    with pytest.raises(ProtocolError, match="expected a task frame"):
        p.Task.from_payload(p.split_bundle(b"abc")[0].to_payload())


def test_work_requests_fleet_status_and_task_results_validate() -> None:
    wr = p.decode(p.WorkRequest(device="d", models={"m": "1"}, capacity=2, free=1, running=["t"]).to_payload())
    assert (wr.capacity, wr.free, wr.running) == (2, 1, ["t"])
    with pytest.raises(ProtocolError, match="non-negative"):
        p.WorkRequest(device="d", capacity=-1).to_payload()
    fs = p.decode(p.FleetStatus(online=True, session="s1").to_payload())
    assert fs.session == "s1" and p.fleet_topic() == "edgesdk/v1/fleet/status"
    with pytest.raises(ProtocolError, match="needs device, job and task"):
        p.TaskResult(device="d").to_payload()
    assert p.topic("d", "task") == "edgesdk/v1/devices/d/task"
