"""The device side of the fleet protocol, in one place: what every device subscribes to, how it
decodes what arrives, which tasks it holds and what it announces, how its durable messages are
(re)sent until acknowledged, when it replays them, and how an install command's blob is chosen
and a delta turned back into its bundle.

Two kinds of device use it: the agent (:mod:`agent.link`, real inference, an outbox on disk, a
model store) and the simulated devices (:mod:`fleet.sim`, many per process, timed fake inference,
an outbox in memory). What differs between them (where chunks and outbox messages are kept, how a
task runs, what an install does) stays with each; the protocol's rules are these:

* :func:`subscriptions` and :data:`DECODERS`: the channels a device hears and the one decoder of
  :mod:`sdk.protocol` each goes through.
* :class:`WorkSlots`: the tasks a device holds (running or queued) within ``capacity +
  prefetch``, the duplicates it ignores, the tasks it declines, and the :class:`WorkRequest` it
  announces, which also names the tasks whose results wait for the fleet's ack (``done``), so the
  fleet can tell a task lost on the way from one that finished.
* :class:`MemoryOutbox` and :func:`send_due`: durable messages kept until the fleet acknowledges
  them, sent again after ``resend_after`` seconds or after a reconnect (the agent's SQLite outbox,
  :class:`agent.outbox.Outbox`, keeps the same contract).
* :class:`FleetSession`: a new session on the fleet's presence topic (a restarted or new leading
  controller) means "replay the outbox and announce again now".
* :func:`plan_fetch` and :func:`rebuild`: an install command's delta is used only when the device
  holds its base (found by sha256 in its own store, never by a name from the network) and can
  apply its method; a fetched delta becomes the bundle with the output bounded by the bundle's
  declared size and checked against its sha256, or raises :class:`sdk.delta.DeltaError` (the
  device then fetches the full bundle the same command describes).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from . import delta as delta_mod
from . import protocol as proto
from .errors import BrokerError

__all__ = ["subscriptions", "DECODERS", "WorkSlots", "OutboxLike", "OutboxMessage", "MemoryOutbox", "send_due",
           "FleetSession", "plan_fetch", "rebuild", "pin_refusal"]

#: channel -> the decoder of sdk.protocol every message on it goes through
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "cmd": proto.decode, "chunk": proto.Chunk.from_payload, "task": proto.decode_task_channel,
    "fleet": proto.FleetStatus.from_payload,
}


def subscriptions(device: str) -> list[tuple[str, int]]:
    """What a device subscribes to: its commands, chunks and tasks, and the fleet's presence."""
    return [(proto.topic(device, "cmd"), 1), (proto.topic(device, "chunk"), 1), (proto.topic(device, "task"), 1),
            (proto.fleet_topic(), 1)]


class WorkSlots:
    """The batch tasks a device has: held (running or queued, within ``capacity + prefetch``) and
    done (results stored, not yet acknowledged). Thread-safe."""

    def __init__(self, capacity: int, prefetch: int = 0) -> None:
        self.capacity = capacity
        self.prefetch = prefetch
        self._held: set[str] = set()
        self._done: dict[str, str] = {}  # result message id -> task id
        self._lock = threading.Lock()

    def take(self, task_id: str, *, accepting: bool = True, prefetch: Optional[int] = None) -> Optional[bool]:
        """Hold a task that arrived: True when taken, None for a duplicate of one held, False when
        declined (not ``accepting``, or past what the device would hold: ``capacity + prefetch``,
        with as much again for tasks a re-dispatch can send early; ``prefetch``: the most this
        device ever announced, when it varies). A declined task's lease brings it back."""
        with self._lock:
            if task_id in self._held:
                return None
            limit = self.prefetch if prefetch is None else prefetch
            if not accepting or proto.WorkRequest.holds_too_many(len(self._held), self.capacity, limit):
                return False
            self._held.add(task_id)
            return True

    def finished(self, task_id: str, result_id: Optional[str] = None) -> None:
        """A held task is over: its result ``result_id`` is stored (announced as done until it is
        acknowledged), or, without one, it was lost and the fleet will send it again."""
        with self._lock:
            self._held.discard(task_id)
            if result_id is not None:
                self._done[result_id] = task_id

    def release(self, task_ids: Iterable[str]) -> None:
        with self._lock:
            self._held.difference_update(task_ids)

    def acknowledged(self, message_ids: Iterable[str]) -> None:
        """The fleet stored these messages: their tasks are no longer announced as done."""
        with self._lock:
            for m in message_ids:
                self._done.pop(m, None)

    def remember_done(self, done: dict[str, str]) -> None:
        """Results kept from before a restart (message id -> task id), still awaiting their ack."""
        with self._lock:
            self._done.update(done)

    def clear(self) -> None:
        """Everything held is gone (a crash): the fleet sends it again."""
        with self._lock:
            self._held.clear()

    @property
    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._held

    def request(self, device: str, models: dict[str, str], *, accepting: bool = True,
                prefetch: Optional[int] = None) -> proto.WorkRequest:
        """What the device announces: its capacity, free slots, prefetch, the tasks it holds and
        those whose results await the fleet's ack."""
        with self._lock:
            held, done = list(self._held), list(self._done.values())
        return proto.WorkRequest.of_device(device, models, self.capacity, self.prefetch if prefetch is None else prefetch,
                                           held, accepting=accepting, done=done)


@dataclass
class OutboxMessage:
    """A durable message as an outbox gives it back to be (re)sent."""

    seq: int
    id: str
    topic: str
    payload: bytes
    sent_at: Optional[float] = None
    attempts: int = 0


class OutboxLike(Protocol):
    """What a device keeps durable messages in until the fleet acknowledges them."""

    def put(self, msg_id: str, topic: str, payload: bytes) -> None: ...

    def ack(self, ids: Iterable[str]) -> int: ...

    def due(self, resend_after: float, limit: int = 100) -> Sequence[OutboxMessage]: ...

    def mark_sent(self, seqs: Iterable[int]) -> None: ...

    def reset_sent(self) -> None: ...

    def __len__(self) -> int: ...


class MemoryOutbox:
    """The outbox of a simulated device: in memory (a simulated crash keeps it, as the agent's
    disk outbox survives one). Not thread-safe: its device's lock guards it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._messages: dict[str, OutboxMessage] = {}
        self._seq = 0

    def put(self, msg_id: str, topic: str, payload: bytes) -> None:
        self._seq += 1
        self._messages[msg_id] = OutboxMessage(self._seq, msg_id, topic, payload)

    def ack(self, ids: Iterable[str]) -> int:
        return sum(self._messages.pop(i, None) is not None for i in ids)

    def due(self, resend_after: float, limit: int = 100) -> list[OutboxMessage]:
        now = self.clock()
        out = [m for m in self._messages.values() if m.sent_at is None or now - m.sent_at > resend_after]
        return out[:limit]

    def mark_sent(self, seqs: Iterable[int]) -> None:
        wanted, now = set(seqs), self.clock()
        for m in self._messages.values():
            if m.seq in wanted:
                m.sent_at, m.attempts = now, m.attempts + 1

    def reset_sent(self) -> None:
        for m in self._messages.values():
            m.sent_at = None

    def __len__(self) -> int:
        return len(self._messages)


def send_due(outbox: OutboxLike, publish: Callable[[str, bytes], None], resend_after: float,
             *, limit: int = 200, stop: Optional[threading.Event] = None) -> int:
    """Publish what ``outbox`` holds that is due (never sent, or sent ``resend_after`` seconds ago
    without an ack), in order, until nothing is due or publishing fails (not connected: it is
    sent again after the reconnect); returns how many were sent."""
    total = 0
    while stop is None or not stop.is_set():
        due = outbox.due(resend_after, limit=limit)
        if not due:
            break
        sent = []
        for m in due:
            try:
                publish(m.topic, m.payload)
            except BrokerError:
                break
            sent.append(m.seq)
        outbox.mark_sent(sent)
        total += len(sent)
        if len(sent) < len(due):
            break
    return total


class FleetSession:
    """The fleet's presence as a device follows it: a new session of an online fleet (a restarted
    or newly leading controller) is when to replay the outbox and announce free slots at once."""

    def __init__(self) -> None:
        self.current = ""

    def is_new(self, status: proto.FleetStatus) -> bool:
        if not status.online or status.session == self.current:
            return False
        self.current = status.session
        return True


def pin_refusal(model: str, version: str, pins: dict[str, str]) -> Optional[str]:
    """Why installing ``model``@``version`` is refused when the fleet's desired configuration pins
    the model to another version (``pins``: model -> version); None when it is not."""
    pinned = pins.get(model)
    if pinned is None or pinned == version:
        return None
    return (f"{model} is pinned to version {pinned} by the fleet's desired configuration: {version} refused "
            f"(edgesdk fleet config unset models.{model} lifts the pin)")


def plan_fetch(cmd: proto.InstallCommand, has_base: Callable[[str], bool],
               can_apply: Callable[[str], bool] = delta_mod.available) -> tuple[proto.InstallCommand, str]:
    """What to fetch for ``cmd``: its delta's blob when it offers one, the device holds the base
    (``has_base(sha256)``) and can apply the method; else the full bundle, with why the delta is
    not used ("" when there was none)."""
    d = cmd.delta
    if d is None:
        return cmd, ""
    if not can_apply(d["method"]):
        return cmd, f"this device cannot apply {d['method']} deltas"
    if not has_base(d["base_sha256"]):
        return cmd, f"the delta's base bundle {d['base_sha256'][:12]} is not on this device"
    return cmd.delta_blob(), ""


def rebuild(cmd: proto.InstallCommand, patch: bytes, base: Optional[bytes]) -> bytes:
    """``cmd``'s bundle from its fetched delta and the base's bytes: output bounded by the bundle's
    declared size, checked against its sha256. Raises :class:`sdk.delta.DeltaError`."""
    d = cmd.delta
    if d is None:
        raise delta_mod.DeltaError("the install command offers no delta")
    if base is None:
        raise delta_mod.DeltaError(f"the delta's base bundle {d['base_sha256'][:12]} is no longer on this device")
    return delta_mod.apply_delta(base, patch, d["method"], size=cmd.bundle_size, sha256=cmd.bundle_sha256)
