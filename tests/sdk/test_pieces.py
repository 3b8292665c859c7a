"""Reassembling tasks that travel in pieces (sdk.pieces): whole tasks back exactly, and every hostile
piece refused with bounded memory (a fake clock for the timeout: no waiting)."""

import hashlib

import numpy as np
import pytest

from sdk import protocol as proto
from sdk.pieces import PieceRefused, Reassembler


def _task(task_id: str = "j-0", n: int = 3000) -> tuple[bytes, list[proto.TaskPiece]]:
    frame = proto.Task(task_id, "j", "m", 5.0, [np.arange(n, dtype=np.float32)[None]]).to_payload()
    return frame, proto.split_task(frame, task_id, 1000)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pieces_in_any_order_with_redeliveries_give_the_task_back() -> None:
    frame, pieces = _task()
    r = Reassembler()
    got = [r.add(p) for p in reversed(pieces[1:])] + [r.add(pieces[-1]), r.add(pieces[0])]
    assert got[:-1] == [None] * (len(got) - 1) and got[-1] == frame
    assert proto.Task.from_payload(got[-1]).id == "j-0" and r.pending == 0 and r.held_bytes == 0


def test_a_whole_that_does_not_match_its_sha256_is_refused() -> None:
    frame, pieces = _task()
    wrong = hashlib.sha256(b"other").hexdigest()
    r = Reassembler()
    forged = [proto.TaskPiece(p.task, p.index, p.count, p.total, wrong, p.data) for p in pieces]
    for p in forged[:-1]:
        assert r.add(p) is None
    with pytest.raises(PieceRefused, match="do not match its sha256"):
        r.add(forged[-1])
    assert r.pending == 0


def test_overlapping_and_conflicting_pieces_are_refused_and_the_task_still_completes() -> None:
    frame, pieces = _task()
    r = Reassembler()
    r.add(pieces[0])
    other_cut = proto.split_task(frame, "j-0", 700)  # the same bytes cut otherwise: its pieces would overlap
    with pytest.raises(PieceRefused, match="cuts it into"):
        r.add(other_cut[1])
    with pytest.raises(PieceRefused, match="came twice with different bytes"):
        r.add(proto.TaskPiece("j-0", 0, pieces[0].count, pieces[0].total, pieces[0].sha256, b"\0" * len(pieces[0].data)))
    assert [r.add(p) for p in pieces[1:]][-1] == frame


def test_too_many_or_too_large_partial_tasks_are_bounded() -> None:
    discarded: list[str] = []
    r = Reassembler(max_tasks=2, max_bytes=30_000, on_discard=discarded.append)
    parts = {i: _task(f"j-{i}")[1] for i in range(3)}
    for i in range(3):  # the third partial task evicts the oldest
        r.add(parts[i][0])
    assert r.pending == 2 and len(discarded) == 1 and "j-0" in discarded[0]
    with pytest.raises(PieceRefused, match="exceed the 30000 bytes"):
        r.add(proto.TaskPiece("big", 0, 2, 30_001, "0" * 64, b"x" * 15_001))
    frame, pieces = _task("j-9")
    assert [r.add(p) for p in pieces][-1] == frame  # never stalled by what is held
    assert r.held_bytes <= 30_000


def test_a_partial_task_is_discarded_after_the_timeout() -> None:
    clock, discarded = Clock(), []
    r = Reassembler(timeout_s=10, clock=clock, on_discard=discarded.append)
    _, pieces = _task()
    r.add(pieces[0])
    clock.now = 5
    assert r.expire() == 0 and r.pending == 1
    clock.now = 11
    assert r.expire() == 1 and r.pending == 0 and "incomplete after 10 s" in discarded[0]
