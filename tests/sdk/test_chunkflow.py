"""The device side of chunked transfers (shared by the agent and the simulator): the window,
and the chunk and whole-blob checks, with and without the simulator's hash memo."""

import hashlib

from sdk import protocol as p
from sdk.chunkflow import ChunkWindow, HashMemo, blob_matches, chunk_fits, chunk_length


def test_the_window_bounds_what_is_outstanding_and_refills_at_half() -> None:
    w = ChunkWindow(20, 4)
    assert w.take() == [0, 1, 2, 3] and w.outstanding == 4
    assert w.take() == []  # the window is full
    w.received(0)
    assert w.take() == []  # more than half still outstanding: no request for a single chunk
    w.received(1)
    assert w.take() == [4, 5] and w.outstanding == 4
    asked = [0, 1, 2, 3, 4, 5]
    for i in range(2, 20):
        w.received(i)
        got = w.take()
        assert w.outstanding <= 4
        asked += got
    assert w.complete and sorted(asked) == list(range(20)) and w.requested == 20


def test_a_restart_asks_again_for_what_was_in_flight_first_and_never_for_what_is_held() -> None:
    w = ChunkWindow(10, 4, held=[0, 1])
    assert w.take() == [2, 3, 4, 5]
    w.received(3)
    w.received(4)
    w.received(9)  # arrived unasked (an earlier session's request): held, never asked for
    w.restart()  # 2 and 5 are presumed lost
    assert w.take() == [2, 5, 6, 7]
    assert w.received(2) and not w.received(2)  # a duplicate is reported as such
    for i in (5, 6, 7):
        w.received(i)
    assert w.take() == [8] and not w.complete
    w.received(8)
    assert w.complete and w.take() == []


def test_chunk_and_blob_checks_refuse_what_was_not_announced_with_or_without_a_memo() -> None:
    blob = bytes(range(256)) * 40  # 10,240 bytes in chunks of 4,096: 4096, 4096, 2048
    sha = hashlib.sha256(blob).hexdigest()
    cmd = p.InstallCommand(model="m", version="1", bundle_sha256=sha, bundle_size=len(blob), chunk_size=4096)
    chunks = p.split_bundle(blob, 4096)
    assert [chunk_length(cmd, i) for i in range(3)] == [4096, 4096, 2048]
    memo = HashMemo()
    for m in (None, memo, memo):  # the second pass with the memo compares instead of hashing
        assert all(chunk_fits(cmd, c, m) for c in chunks) and blob_matches(cmd, blob, m)
        forged = p.Chunk(sha, 1, 3, chunks[1].sha256, b"\xff" + chunks[1].data[1:])  # same claim, other bytes
        assert not chunk_fits(cmd, forged, m)
        assert not chunk_fits(cmd, p.Chunk(sha, 2, 3, hashlib.sha256(b"x").hexdigest(), b"x"), m)  # wrong length
        assert not chunk_fits(cmd, p.Chunk("0" * 64, 0, 3, chunks[0].sha256, chunks[0].data), m)  # other blob
        assert not chunk_fits(cmd, p.Chunk(sha, 0, 4, chunks[0].sha256, chunks[0].data), m)  # other count
        assert not blob_matches(cmd, blob[:-1] + b"\1", m) and not blob_matches(cmd, blob[:-1], m)
    assert memo.hits >= 4


def test_decoded_chunks_view_their_payload_and_share_only_checked_headers() -> None:
    import pytest

    from sdk.errors import ProtocolError

    (chunk,) = p.split_bundle(b"one chunk for many devices")
    payload = chunk.to_payload()
    a, b = p.Chunk.from_payload(payload), p.Chunk.from_payload(bytes(bytearray(payload)))
    assert a == b == chunk and isinstance(a.data, memoryview) and a.data == chunk.data  # no copy of the data
    a.index = 5  # a decoded chunk is the caller's own: the next decode of that header is unchanged
    assert p.Chunk.from_payload(payload).index == 0
    assert bytes(p.Chunk.from_payload(bytearray(payload)).data) == chunk.data  # a mutable buffer is copied
    bad = p._frame({"type": "chunk", "bundle_sha256": chunk.bundle_sha256, "index": 1, "count": 1,
                    "sha256": chunk.sha256}, b"x")
    for _ in range(2):  # a refused header is refused every time (failures are not cached)
        with pytest.raises(ProtocolError, match="chunk.index 1 must be below chunk.count 1"):
            p.Chunk.from_payload(bad)
