"""Rollouts against a real Mosquitto with simulated devices: stages, rate limits, abort
thresholds, latency regression, cancel, rollback, time-outs, and 1,000 devices."""

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
