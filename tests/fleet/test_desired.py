"""Desired state: configuration per tag and per device, sent by the fleet, applied by devices
without a restart, reported back; drift where they differ; offline devices converge when they
return; a model pinned to a version refuses rollouts of another. Real Mosquitto; simulated
devices and a real agent process."""

from __future__ import annotations

import json
import signal

import pytest

from sdk.errors import ConfigError


def states(fleet) -> dict[str, str]:
    return {d.id: d.config_state for d in fleet.devices()}


def test_tag_and_device_entries_merge_and_every_device_converges(broker, make_fleet, make_sims, eventually) -> None:
    sims = make_sims(4, broker.url, models={"noop": "1"}, tags=lambda i: {"site": "a" if i < 3 else "b"})
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 4)
    assert set(states(fleet).values()) == {"-"}  # nothing desired yet
    sims.kill("sim-0002")  # offline while its configuration changes

    fleet.set_config(tag="site=a", threads=2, heartbeat_interval=5.0, tags={"zone": "north"})
    fleet.set_config(device="sim-0001", threads=3)  # the device's own entry goes on top of its tags'
    assert eventually(lambda: states(fleet) == {"sim-0000": "in sync", "sim-0001": "in sync", "sim-0002": "pending",
                                                "sim-0003": "-"})
    by_id = {d.id: d for d in fleet.devices()}
    assert by_id["sim-0000"].config["threads"] == 2 and by_id["sim-0001"].config["threads"] == 3
    assert by_id["sim-0000"].tags == {"sim": "1", "site": "a", "zone": "north"}
    assert by_id["sim-0002"].drift["threads"] == {"desired": 2, "reported": None}

    sims.revive("sim-0002")  # it converges when it returns
    assert eventually(lambda: states(fleet)["sim-0002"] == "in sync")
    fleet.unset_config("tags.zone", tag="site=a")
    assert eventually(lambda: "zone" not in {d.id: d for d in fleet.devices()}["sim-0000"].tags)
    assert [(e.scope, e.target) for e in fleet.configs()] == [("tag", "site=a"), ("device", "sim-0001")]


def test_a_pinned_model_refuses_other_versions(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    sims = make_sims(3, broker.url, models={"digits": "1"})
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 3)
    fleet.set_config(device="sim-0000", models={"digits": "1"})
    assert eventually(lambda: states(fleet)["sim-0000"] == "in sync")
    rid = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=1, batch_percent=100, max_failure_percent=100)
    view = fleet.wait_rollout(rid, timeout=60)
    pinned = next(d for d in view.devices if d["device"] == "sim-0000")
    assert pinned["state"] == "FAILED" and "pinned to version 1" in pinned["reason"]
    assert sims.models("sim-0000") == {"digits": "1"} and sims.models("sim-0001") == {"digits": "2"}
    fleet.set_config(device="sim-0001", models={"digits": "9"})  # a version it does not hold: drift, with the reason
    assert eventually(lambda: states(fleet)["sim-0001"] == "drift")
    d1 = {d.id: d for d in fleet.devices()}["sim-0001"]
    assert d1.drift == {"models.digits": {"desired": "9", "reported": "2"}} and "not on this device" in d1.config_note


def test_settings_are_checked_where_they_are_given(broker, make_fleet, edgesdk_cli, tmp_path) -> None:
    fleet = make_fleet(broker.url)
    for bad in ({"threads": 0}, {"shell": "rm -rf /"}, {"heartbeat_interval": "soon"}):
        with pytest.raises(ConfigError):
            fleet.set_config(device="d1", **bad)
    with pytest.raises(ConfigError, match="--device ID or --tag"):
        fleet.set_config(threads=2)
    assert fleet.configs() == []
    args = ["fleet", "--broker", broker.url, "--state", fleet.state_dir]
    r = edgesdk_cli(*args, "config", "set", "--tag", "site=a", "threads=2", "tags.zone=n", "models.digits=3")
    assert r.returncode == 0 and "revision 1" in r.stdout, r.stderr
    r = edgesdk_cli(*args, "config", "set", "--device", "d1", "threads=many")
    assert r.returncode == 2 and r.stderr.startswith("error: desired configuration: config.threads must be"), r.stderr
    shown = json.loads(edgesdk_cli(*args, "config", "show", "--json").stdout)
    assert shown == [{"scope": "tag", "target": "site=a", "revision": 1, "updated": shown[0]["updated"],
                      "config": {"threads": 2, "tags": {"zone": "n"}, "models": {"digits": "3"}}}]


def test_a_real_agent_applies_its_configuration_live_and_keeps_it(broker, make_fleet, spawn, agent_toml, eventually,
                                                                  digits_bundle, digits_bundle_v2, tmp_path) -> None:
    from agent import Agent
    from agent.config import load_config

    cfg = agent_toml("cfg-1", broker.url, tags={"site": "lab"})
    setup = Agent(load_config(cfg, env={}))
    setup.install(digits_bundle.path)
    setup.install(digits_bundle_v2.path)  # holds 1 and 2, runs 2
    setup.stop()
    proc = spawn("agent", "run", "--config", cfg, log_name="cfg-1")
    fleet = make_fleet(broker.url)
    assert eventually(lambda: [d.id for d in fleet.devices() if d.online] == ["cfg-1"], timeout=60)
    fleet.set_config(tag="site=lab", threads=2, pool_size=2, heartbeat_interval=2.0, work_slots=2,
                     tags={"zone": "b"}, models={"digits": "1"})
    assert eventually(lambda: states(fleet)["cfg-1"] == "in sync", timeout=60)
    d = fleet.devices()[0]
    assert d.models == {"digits": "1"} and d.tags == {"site": "lab", "zone": "b"}  # the pin rolled it back to 1
    assert d.config["threads"] == 2 and d.config["pool_size"] == 2 and d.config["work_slots"] == 2
    assert "desired configuration revision" in (tmp_path / "cfg-1.log").read_text()
    rid = fleet.deploy(digits_bundle_v2.path, devices=["cfg-1"])
    assert "pinned to version 1" in fleet.wait_rollout(rid, timeout=60).devices[0]["reason"]

    proc.send_signal(signal.SIGTERM)  # kept across a restart: the agent reports it before the fleet says anything
    assert proc.wait(30) == 0
    kept = json.loads((tmp_path / "cfg-1-state" / "desired-config.json").read_text())
    assert kept["config"]["threads"] == 2
    restarted = Agent(load_config(cfg, env={}))
    assert restarted.config.threads == 2 and restarted.config.tags == {"site": "lab", "zone": "b"}
    assert restarted.describe()["config_revision"] == kept["revision"]
    restarted.stop()
