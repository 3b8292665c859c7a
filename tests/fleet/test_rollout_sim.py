"""Rollouts against a real Mosquitto with simulated devices: stages, rate limits, abort
thresholds, latency regression, cancel, rollback, time-outs, and 1,000 devices."""

import time

import pytest

from sdk.errors import RolloutError


def online(fleet, n):
    return lambda: len([d for d in fleet.devices() if d.online]) >= n


def test_stages_run_canaries_first_then_batches(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    sims = make_sims(10, broker.url, models={"digits": "1"}, tags=lambda i: {"site": "a" if i < 7 else "b"}, install_s=0.05)
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 10))
    rid = fleet.deploy(digits_bundle_v2.path, to={"site": "a"}, canary=2, batch_percent=50)
    view = fleet.wait_rollout(rid, timeout=60)
    assert view.state == "SUCCEEDED" and view.counts["SUCCEEDED"] == 7
    stages = {}
    for d in view.devices:
        stages.setdefault(d["stage"], []).append(d)
    assert sorted(stages) == [0, 1, 2] and [len(stages[s]) for s in (0, 1, 2)] == [2, 3, 2]
    for s in (1, 2):  # a stage starts only after every device of the one before has finished
        assert min(d["started"] for d in stages[s]) >= max(d["updated"] for d in stages[s - 1])
    assert all(sims.models(d)["digits"] == "2" for d in sims.ids[:7])
    assert all(sims.models(d)["digits"] == "1" for d in sims.ids[7:])
    assert all(d["previous_version"] == "1" for d in view.devices)


def test_max_per_minute_limits_how_many_devices_start(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    sims = make_sims(5, broker.url, models={"digits": "1"})
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 5))
    rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=1, batch_percent=100, max_per_minute=2)
    assert eventually(lambda: fleet.rollout(rid).counts["SUCCEEDED"] == 2)
    assert not eventually(lambda: fleet.rollout(rid).counts["SUCCEEDED"] > 2, timeout=2)
    view = fleet.rollout(rid)
    assert view.state == "RUNNING" and view.counts["QUEUED"] == 3
    fleet.cancel(rid)
    view = fleet.wait_rollout(rid, timeout=10)
    assert view.state == "CANCELED" and view.counts["CANCELED"] == 3 and view.counts["SUCCEEDED"] == 2
    assert [sims.models(d)["digits"] for d in sims.ids] == ["2", "2", "1", "1", "1"]  # cancel keeps what was done


def test_failures_over_the_threshold_abort_and_roll_back(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    good = make_sims(2, broker.url, prefix="good", models={"digits": "1"})
    bad = make_sims(4, broker.url, prefix="bad", models={"digits": "1"}, fail_versions=("2",))
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 6))
    rid = fleet.deploy(digits_bundle_v2.path, devices=good.ids + bad.ids, canary=2, batch_percent=50,
                       max_failure_percent=25, min_executed=3)
    view = fleet.wait_rollout(rid, timeout=60)
    assert view.state == "ABORTED" and "health check failed: simulated failure" in view.reason
    states = {d["device"]: d["state"] for d in view.devices}
    assert [states[d] for d in good.ids] == ["ROLLED_BACK", "ROLLED_BACK"]
    assert {states[d] for d in bad.ids[:2]} == {"FAILED"} and {states[d] for d in bad.ids[2:]} == {"CANCELED"}
    assert all(good.models(d)["digits"] == "1" for d in good.ids)
    assert all("health check failed" in d["reason"] for d in view.devices if d["state"] == "FAILED")


def test_a_canary_latency_regression_aborts_and_rolls_it_back(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    sims = make_sims(4, broker.url, models={"digits": "1"}, p50_ms={"1": 2.0, "2": 5.0})
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 4))
    rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=1, max_latency_regression=1.5)
    view = fleet.wait_rollout(rid, timeout=60)
    assert view.state == "ABORTED"
    canary = view.devices[0]
    assert canary["state"] == "ROLLED_BACK" and "latency regression: p50 5.000 ms on 2 vs 2.000 ms on 1" in canary["reason"]
    assert [d["state"] for d in view.devices[1:]] == ["CANCELED"] * 3
    assert all(sims.models(d)["digits"] == "1" for d in sims.ids)


def test_rollback_of_a_finished_rollout(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    sims = make_sims(3, broker.url, models={"digits": "1"})
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 3))
    rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=1, batch_percent=100)
    assert fleet.wait_rollout(rid, timeout=60).state == "SUCCEEDED"
    fleet.rollback(rid)
    view = fleet.wait_rollout(rid, timeout=60)
    assert view.state == "ROLLED_BACK" and view.counts["ROLLED_BACK"] == 3
    assert all(sims.models(d)["digits"] == "1" for d in sims.ids)
    with pytest.raises(RolloutError, match="already rolled back"):
        fleet.rollback(rid)


def test_a_device_without_an_outcome_times_out(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    sims = make_sims(2, broker.url, models={"digits": "1"}, install_s=30)
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 2))
    rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=2, timeout=1, max_failure_percent=100)
    view = fleet.wait_rollout(rid, timeout=30)
    assert view.state == "SUCCEEDED" and view.counts["TIMED_OUT"] == 2
    assert all(d["reason"] == "no outcome within 1 s" for d in view.devices)


def test_bad_deploy_requests_say_what_to_fix(broker, make_fleet, digits_bundle_v2, tmp_path) -> None:
    fleet = make_fleet(broker.url)
    with pytest.raises(RolloutError, match="no target devices"):
        fleet.deploy(digits_bundle_v2.path, to={"site": "nowhere"})
    with pytest.raises(RolloutError, match="--to TAG=VALUE or --devices"):
        fleet.deploy(digits_bundle_v2.path)
    with pytest.raises(RolloutError, match="--batch-percent"):
        fleet.deploy(digits_bundle_v2.path, devices=["x"], batch_percent=0)
    unsigned = tmp_path / "unsigned.edgebundle"
    import zipfile

    with zipfile.ZipFile(digits_bundle_v2.path) as src, zipfile.ZipFile(unsigned, "w") as dst:
        for name in src.namelist():
            if name != "signature.json":
                dst.writestr(name, src.read(name))
    from sdk.errors import BundleError

    with pytest.raises(BundleError, match="not signed.*edgesdk bundle sign"):
        fleet.deploy(unsigned, devices=["x"])


def test_a_thousand_simulated_devices_register_and_take_a_rollout(broker, make_fleet, make_sims, eventually,
                                                                   digits_bundle_v2) -> None:
    sims = make_sims(1000, broker.url, models={"digits": "1"}, tags=lambda i: {"rack": str(i % 10)}, per_connection=100)
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 1000), timeout=60)
    assert len(fleet.devices({"rack": "3"})) == 100
    rid = fleet.deploy(digits_bundle_v2.path, to={"sim": "1"}, canary=10, batch_percent=50, max_per_minute=100000)
    view = fleet.wait_rollout(rid, timeout=240)
    assert view.state == "SUCCEEDED" and view.counts["SUCCEEDED"] == 1000
    assert all(sims.models(d)["digits"] == "2" for d in sims.ids)
    assert fleet.chunks.splits == 1  # the bundle was split and framed once for 1,000 devices
    assert eventually(lambda: all(d.models == {"digits": "2"} for d in fleet.devices()), timeout=30)


def test_presence_of_thousands_of_devices_needs_no_broker_tuning(make_broker, make_fleet, make_sims, eventually) -> None:
    """Mosquitto as installed queues at most 1,000 QoS-1 messages per client; the retained
    statuses of 3,000 devices reach a fleet that starts after them all the same."""
    broker = make_broker(defaults=True)
    make_sims(3000, broker.url, models={"noop": "1"}, per_connection=250, announce_interval=60)
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 3000), timeout=120)
    fleet.stop()
    with fleet.database() as db:  # forget it all: a restarted controller learns presence again
        db.execute("UPDATE devices SET online = 0")
    fleet.start()
    assert eventually(online(fleet, 3000), timeout=120)


# --- delta updates -----------------------------------------------------------------------------------
def _random_bundle(path, version, model: bytes, key):
    """A signed bundle whose model file is ``model`` (simulated devices install it, never run it)."""
    from sdk.bundle import write_bundle
    from sdk.signing import load_private_key

    manifest = {"name": "blob", "version": version, "target": "cpu", "model_file": "model.tflite",
                "inputs": [], "outputs": []}
    return write_bundle(path, manifest, {"model.tflite": model}, private_key=load_private_key(key))


def test_updates_travel_as_deltas_only_when_smaller_and_the_fleet_records_what_devices_hold(
        broker, make_fleet, make_sims, eventually, signing_keys, tmp_path) -> None:
    import hashlib

    import numpy as np

    from fleet.deltas import MAX_RATIO

    rng = np.random.default_rng(7)
    v1_model = rng.bytes(300_000)
    v2_model = v1_model[:150_000] + rng.bytes(2_000) + v1_model[152_000:]  # a small change: a delta pays
    paths = [_random_bundle(tmp_path / "b1.edgebundle", "1", v1_model, signing_keys.private),
             _random_bundle(tmp_path / "b2.edgebundle", "2", v2_model, signing_keys.private),
             _random_bundle(tmp_path / "b3.edgebundle", "3", rng.bytes(300_000), signing_keys.private)]  # unrelated
    sha1, sha2, sha3 = (hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
    sims = make_sims(3, broker.url)
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 3))

    def roll(path):
        view = fleet.wait_rollout(fleet.deploy(path, devices=sims.ids, canary=1, batch_percent=100), timeout=60)
        assert view.state == "SUCCEEDED", view

    roll(paths[0])  # nothing to take a delta against: whole
    assert all(sims.installs(d) == [("1", "full")] for d in sims.ids)
    assert eventually(lambda: all(sha1 in d.bundles for d in fleet.devices()))  # reported held
    roll(paths[1])
    assert all(sims.installs(d)[-1] == ("2", "delta") for d in sims.ids)
    assert fleet.stats["delta_installs"] == 3
    with fleet.database() as db:
        deltas = {(r["base"], r["target"]): dict(r) for r in db.all("SELECT * FROM deltas")}
    small = deltas[(sha1, sha2)]
    assert small["size"] < small["full_size"] / 10  # made once, for three devices
    assert eventually(lambda: all({sha1, sha2} <= set(d.bundles) for d in fleet.devices()))  # active and previous
    roll(paths[2])  # unrelated: a delta saves only the zip's headers (< 10 % of the bundle), so it goes whole
    assert all(sims.installs(d)[-1] == ("3", "full") for d in sims.ids)
    with fleet.database() as db:
        big = [dict(r) for r in db.all("SELECT * FROM deltas WHERE target = ?", (sha3,))]
    assert big and all(r["size"] > MAX_RATIO * r["full_size"] for r in big)
    assert fleet.stats["delta_installs"] == 3 and fleet.stats["delta_fallbacks"] == 0
    assert eventually(lambda: all(set(d.bundles) == {sha2, sha3} for d in fleet.devices()))  # version 1 pruned
    with fleet.database() as db:  # the rule itself, on the recorded delta 2 -> 3 of the first device
        db.execute("DELETE FROM device_bundles WHERE device = ? AND sha256 != ?", (sims.ids[0], sha2))
        db.execute("UPDATE deltas SET size = full_size + 1 WHERE base = ? AND target = ?", (sha2, sha3))
        assert fleet.deltas.choose(db, sims.ids[0], sha3, "blob", 0.0) is None  # bigger than the bundle
        db.execute("UPDATE deltas SET size = 1000 WHERE base = ? AND target = ?", (sha2, sha3))
        assert fleet.deltas.choose(db, sims.ids[0], sha3, "blob", 0.0)["base_sha256"] == sha2  # small: offered


def test_a_simulated_device_without_the_base_falls_back_to_the_full_bundle(broker, make_fleet, make_sims, eventually,
                                                                          signing_keys, tmp_path) -> None:
    import numpy as np

    rng = np.random.default_rng(8)
    v1_model = rng.bytes(200_000)
    b1 = _random_bundle(tmp_path / "b1.edgebundle", "1", v1_model, signing_keys.private)
    b2 = _random_bundle(tmp_path / "b2.edgebundle", "2", v1_model[:-500] + rng.bytes(500), signing_keys.private)
    sims = make_sims(2, broker.url)
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 2))
    assert fleet.wait_rollout(fleet.deploy(b1, devices=sims.ids, canary=2), timeout=60).state == "SUCCEEDED"
    sims._blobs.clear()  # the devices lose their bundles' bytes (the fleet still believes they hold them)
    assert fleet.wait_rollout(fleet.deploy(b2, devices=sims.ids, canary=2), timeout=60).state == "SUCCEEDED"
    assert all(sims.installs(d) == [("1", "full"), ("2", "full")] for d in sims.ids)
    assert fleet.stats["delta_fallbacks"] == 2


def test_chunks_flow_within_the_window_and_a_lost_chunk_is_asked_for_again(broker, make_fleet, make_sims, eventually,
                                                                            digits_bundle, signing_keys, tmp_path) -> None:
    """A bundle of 10 chunks to 2 simulated devices: each asks for at most a window of chunks at a
    time; one chunk the fleet sends to sim-0001 is lost on the way, and that device asks for it again."""
    import os

    from sdk import protocol as proto
    from sdk.bundle import Bundle, write_bundle
    from sdk.signing import load_private_key

    src = Bundle.open(digits_bundle.path)
    manifest = {k: v for k, v in src.manifest.data.items() if k not in ("files", "schema")}
    files = {name: src.read(name) for name in src.manifest.files}
    files[manifest["model_file"]] = os.urandom(9 * proto.CHUNK_SIZE + 1000)  # random: the zip cannot shrink it
    manifest["version"] = "7"
    big = write_bundle(tmp_path / "big.edgebundle", manifest, files, private_key=load_private_key(signing_keys.private))
    count = -(-big.stat().st_size // proto.CHUNK_SIZE)
    assert count == 10

    sims = make_sims(2, broker.url, models={"digits": "1"})
    fleet = make_fleet(broker.url)
    assert eventually(online(fleet, 2))
    asked, lost = [], []
    engine = fleet.engine
    chunks_for, publish = engine._chunks_for, engine._publish

    def record(req):
        asked.append((req.device, list(req.indices)))
        return chunks_for(req)

    def lossy(topic, payload, qos=1):  # the broker drops chunk 3 to sim-0001 once (as over its queue limit)
        if topic == proto.topic("sim-0001", "chunk") and proto.Chunk.from_payload(payload).index == 3 and not lost:
            lost.append(3)
            return True
        return publish(topic, payload, qos)

    engine._chunks_for, engine._publish = record, lossy
    rid = fleet.deploy(big, devices=sims.ids, canary=2)
    view = fleet.wait_rollout(rid, timeout=60)
    assert view.state == "SUCCEEDED" and view.counts["SUCCEEDED"] == 2 and lost == [3]
    assert all(sims.models(d)["digits"] == "7" for d in sims.ids)
    for device in sims.ids:
        mine = [indices for d, indices in asked if d == device]
        assert mine[0] == list(range(proto.CHUNK_WINDOW))  # the first window, not the whole bundle
        assert all(len(i) <= proto.CHUNK_WINDOW for i in mine)
        assert sorted(set().union(*map(set, mine))) == list(range(count))
    again = [i for d, i in asked if d == "sim-0001" and 3 in i]
    assert len(again) == 2 and again[1] == [3]  # asked again, for the lost chunk only
    assert [i for d, i in asked if d == "sim-0000" and 3 in i] == [list(range(proto.CHUNK_WINDOW))]


class FakeClock:
    """The fleet's clock as a test moves it: rollout and lease time-outs without waiting for them."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_outs_follow_the_fleets_clock(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    clock = FakeClock()
    sims = make_sims(2, broker.url, models={"digits": "1"}, install_s=3600)  # installs that do not end in this test
    fleet = make_fleet(broker.url, clock=clock)
    assert eventually(online(fleet, 2))
    rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=2, timeout=600, max_failure_percent=100)
    assert eventually(lambda: fleet.rollout(rid).counts["IN_PROGRESS"] == 2)
    time.sleep(1.0)  # real time passes; the fleet's does not
    assert fleet.rollout(rid).counts["IN_PROGRESS"] == 2
    clock.advance(601)
    view = fleet.wait_rollout(rid, timeout=30)
    assert view.counts["TIMED_OUT"] == 2 and all("no outcome within 600 s" in d["reason"] for d in view.devices)
    assert view.finished == clock.now
