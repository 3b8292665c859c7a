"""sdk.device: the device side of the protocol that the agent and the simulated devices share."""

from __future__ import annotations

import hashlib

import pytest

from sdk import delta as delta_mod
from sdk import protocol as proto
from sdk.device import FleetSession, MemoryOutbox, WorkSlots, plan_fetch, rebuild, send_due, subscriptions
from sdk.errors import BrokerError


def test_slots_hold_within_capacity_and_prefetch_and_announce_what_they_have() -> None:
    slots = WorkSlots(capacity=1, prefetch=2)
    assert [slots.take(t) for t in ("a", "b", "c")] == [True, True, True]
    assert slots.take("a") is None  # a duplicate delivery
    assert slots.take("d") is True and slots.take("e") is True and slots.take("f") is True
    assert slots.take("g") is False  # past twice capacity + prefetch: declined, the fleet sends it again
    assert slots.take("h", accepting=False) is False
    slots.finished("a", "result-a")
    slots.finished("b")  # lost: no result
    wr = slots.request("d1", {"m": "1"})
    assert wr.running == ["c", "d", "e", "f"] and wr.done == ["a"] and wr.free == 0 and wr.prefetch == 2
    slots.acknowledged(["result-a"])
    assert slots.request("d1", {"m": "1"}).done == []
    slots.clear()
    assert slots.request("d1", {"m": "1"}).free == 1 and "c" not in slots


def test_a_list_cut_to_the_protocol_limit_is_not_reported_as_done() -> None:
    slots = WorkSlots(capacity=1)
    slots.remember_done({f"r{i}": f"t{i}" for i in range(proto.MAX_ITEMS)})
    assert slots.request("d1", {"m": "1"}).done is None  # the fleet must not take a cut list for the whole


def test_the_memory_outbox_resends_what_is_due_until_acknowledged() -> None:
    now = [100.0]
    box = MemoryOutbox(clock=lambda: now[0])
    box.put("m1", "t/up", b"one")
    box.put("m2", "t/up", b"two")
    sent = []
    assert send_due(box, lambda topic, payload: sent.append(payload), resend_after=10) == 2 and sent == [b"one", b"two"]
    assert send_due(box, lambda topic, payload: sent.append(payload), resend_after=10) == 0  # sent, not due yet
    now[0] += 11
    box.ack(["m1"])
    assert send_due(box, lambda topic, payload: sent.append(payload), resend_after=10) == 1 and sent[-1] == b"two"
    box.reset_sent()  # a reconnect: due again at once

    def offline(topic, payload):
        raise BrokerError("not connected")

    assert send_due(box, offline, resend_after=10) == 0 and len(box) == 1
    assert send_due(box, lambda topic, payload: sent.append(payload), resend_after=10) == 1


def test_a_new_fleet_session_is_noticed_once() -> None:
    s = FleetSession()
    assert s.is_new(proto.FleetStatus(online=True, session="a"))
    assert not s.is_new(proto.FleetStatus(online=True, session="a"))
    assert not s.is_new(proto.FleetStatus(online=False, session="b"))
    assert s.is_new(proto.FleetStatus(online=True, session="b"))


def test_a_delta_is_fetched_only_when_its_base_is_held_and_rebuilt_checked() -> None:
    import os

    base = os.urandom(20000)  # incompressible: the delta can only be small by pointing into its base
    new = base[:15000] + b"a new tail" + base[15000:]
    patch = delta_mod.make_delta(base, new, "zstd")
    sha = hashlib.sha256(new).hexdigest()
    d = {"method": "zstd", "base_sha256": hashlib.sha256(base).hexdigest(), "sha256": hashlib.sha256(patch).hexdigest(),
         "size": len(patch)}
    cmd = proto.InstallCommand(model="m", version="2", bundle_sha256=sha, bundle_size=len(new), delta=d)
    blob, note = plan_fetch(cmd, lambda s: s == d["base_sha256"])
    assert blob.bundle_sha256 == d["sha256"] and note == ""
    blob, note = plan_fetch(cmd, lambda s: False)
    assert blob is cmd and "is not on this device" in note
    blob, note = plan_fetch(cmd, lambda s: True, can_apply=lambda method: False)
    assert blob is cmd and "cannot apply zstd" in note
    assert rebuild(cmd, patch, base) == new
    with pytest.raises(delta_mod.DeltaError, match="no longer on this device"):
        rebuild(cmd, patch, None)
    with pytest.raises(delta_mod.DeltaError):
        rebuild(cmd, patch, os.urandom(20000))  # another base: the result does not match the bundle's sha256


def test_every_device_hears_the_same_channels() -> None:
    assert [t for t, _ in subscriptions("d1")] == [proto.topic("d1", c) for c in ("cmd", "chunk", "task")] + [
        proto.fleet_topic()]
