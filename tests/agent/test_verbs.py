"""The local verbs on a device, as an operator runs them: ``edgesdk agent deploy``, ``predict`` and
``status`` as real processes against real agent processes (and a real fleet on a real Mosquitto
where the report to the fleet is the point)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys

import numpy as np
import pytest

from agent import Agent, AgentClient
from agent.config import load_config
from sdk import protocol as proto
from sdk.bundle import Bundle, write_bundle
from sdk.signing import load_private_key


def rebuilt(src, out, private_key=None, **changes):
    """The bundle at ``src`` with manifest ``changes``, signed with ``private_key`` (None: unsigned)."""
    b = Bundle.open(src)
    manifest = {k: v for k, v in b.manifest.data.items() if k not in ("files", "schema")}
    return write_bundle(out, {**manifest, **changes}, {n: b.read(n) for n in b.manifest.files}, private_key=private_key)


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def cli_json(edgesdk_cli, *args):
    r = edgesdk_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def queued_statuses(cfg) -> list[proto.InstallStatus]:
    """The install statuses waiting in the agent's outbox for the fleet."""
    db = sqlite3.connect(cfg.state_dir / "outbox.sqlite")
    try:
        return [m for (p,) in db.execute("SELECT payload FROM outbox ORDER BY seq")
                if isinstance(m := proto.decode(p), proto.InstallStatus)]
    finally:
        db.close()


def test_deploy_into_a_running_agent_swaps_it_and_the_fleet_hears(broker, make_fleet, agent_toml, preinstall,
                                                                   agent_process, edgesdk_cli, eventually, digits_bundle,
                                                                   digits_bundle_v2, digits) -> None:
    cfg_path = agent_toml("side-1", broker.url)
    cfg = preinstall(cfg_path, digits_bundle.path)
    fleet = make_fleet(broker.url)
    agent_process(cfg_path)
    device = lambda: next((d for d in fleet.devices() if d.id == "side-1" and d.online), None)  # noqa: E731
    assert eventually(lambda: device() is not None and device().models == {"digits": "1"})

    r = edgesdk_cli("agent", "deploy", digits_bundle_v2.path, "--config", cfg_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "installed digits@2 (was 1) into the running agent"
    assert lines[1].startswith("health check passed: golden max error ") and "version 1: " in lines[1]
    assert lines[2] == "reported to the fleet"
    with AgentClient(cfg.socket_path) as client:
        assert [(m["name"], m["active"], m["previous"]) for m in client.models()] == [("digits", "2", "1")]
        (probs,) = client.predict("digits", [digits.x_test[0][None]])
        assert probs.shape == (1, 10) and probs.dtype == np.float32  # version 2 is float32

    # the fleet sees version 2 running, and the sideloaded bundle held (a delta can build on it)
    sha = hashlib.sha256(digits_bundle_v2.path.read_bytes()).hexdigest()
    assert eventually(lambda: device().models == {"digits": "2"} and sha in device().bundles)
    status = lambda: cli_json(edgesdk_cli, "agent", "status", "--config", cfg_path)  # noqa: E731
    assert eventually(lambda: status()["outbox"]["pending"] == 0, timeout=30)  # the fleet acknowledged it
    s = status()
    assert s["running"] is True and s["link"] == {"broker": broker.url, "enabled": True, "connected": True}
    assert [(m["name"], m["active"], m["previous"]) for m in s["models"]] == [("digits", "2", "1")]
    last = s["last_install"]
    assert (last["model"], last["version"], last["outcome"], last["origin"]) == ("digits", "2", "SUCCEEDED", "sideload")


def test_a_refused_deploy_is_one_line_and_the_old_model_keeps_serving(agent_toml, preinstall, agent_process,
                                                                      edgesdk_cli, digits_bundle, digits_bundle_v2_other,
                                                                      signing_keys, digits, tmp_path) -> None:
    cfg_path = agent_toml("side-2", "mqtt://127.0.0.1:1")
    cfg = preinstall(cfg_path, digits_bundle.path)
    agent_process(cfg_path, "--no-mqtt")
    tampered = tmp_path / "tampered.edgebundle"
    data = bytearray(digits_bundle.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    key = load_private_key(signing_keys.private)
    cases = {
        rebuilt(digits_bundle.path, tmp_path / "unsigned.edgebundle", version="3"): "verify failed",
        digits_bundle_v2_other: "not among the trusted keys",
        tampered: "verify failed",
        rebuilt(digits_bundle.path, tmp_path / "slow.edgebundle", key, version="4", latency_limit_ms=1e-6):
            "health check failed: p50 latency",
    }
    x = digits.x_test[0][None]
    with AgentClient(cfg.socket_path) as client:
        before = client.predict("digits", [x])
        for bundle, reason in cases.items():
            r = edgesdk_cli("agent", "deploy", bundle, "--config", cfg_path)
            assert r.returncode == 15 and reason in one_error_line(r), (bundle.name, r.stderr)
            np.testing.assert_array_equal(client.predict("digits", [x])[0], before[0])  # version 1 serves on
        assert [(m["name"], m["active"]) for m in client.models()] == [("digits", "1")]

    s = cli_json(edgesdk_cli, "agent", "status", "--config", cfg_path)
    assert s["link"]["enabled"] is False and s["last_install"]["outcome"] == "FAILED"
    assert "health check failed" in s["last_install"]["reason"] and s["last_install"]["version"] == "4"
    # without a link the refusals wait in the outbox for the fleet, without a rollout
    queued = queued_statuses(cfg)
    assert s["outbox"]["pending"] == len(queued) >= 3
    assert {(q.state, q.rollout, q.model) for q in queued} == {("FAILED", None, "digits")}
    assert {"2", "4"} <= {q.version for q in queued}

    # a config naming another socket finds the state dir in use: nothing is changed under the agent
    other = tmp_path / "other-socket.toml"
    other.write_text(cfg_path.read_text().replace(f'socket_path = "{cfg.socket_path}"',
                                                  f'socket_path = "{tmp_path / "elsewhere.sock"}"'))
    r = edgesdk_cli("agent", "deploy", digits_bundle.path, "--config", other)
    assert r.returncode == 15 and "does not answer on" in one_error_line(r) and "holds" in r.stderr
    r = edgesdk_cli("agent", "run", "--no-mqtt", "--config", other)  # a second agent on the same state dir
    assert r.returncode == 2 and "is in use by pid" in one_error_line(r)


def test_deploy_into_a_stopped_agent_is_served_at_start_and_reported_then(broker, make_fleet, agent_toml, preinstall,
                                                                          agent_process, edgesdk_cli, eventually,
                                                                          digits_bundle, digits_bundle_v2, signing_keys,
                                                                          tmp_path) -> None:
    cfg_path = agent_toml("side-3", broker.url)
    cfg = preinstall(cfg_path, digits_bundle.path)
    r = edgesdk_cli("agent", "deploy", digits_bundle_v2.path, "--config", cfg_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == ("installed digits@2 (was 1) into the store (the agent is not running: it "
                                        "serves it when it starts)")
    assert r.stdout.splitlines()[2] == "queued for the fleet (sent when the agent next reaches it)"
    slow = rebuilt(digits_bundle.path, tmp_path / "slow.edgebundle", load_private_key(signing_keys.private),
                   version="4", latency_limit_ms=1e-6)  # loaded and health-checked here: LiteRT's lines stay out
    refused = edgesdk_cli("agent", "deploy", slow, "--config", cfg_path)
    assert refused.returncode == 15 and "health check failed: p50 latency" in one_error_line(refused)

    text = edgesdk_cli("agent", "status", "--config", cfg_path)
    assert text.returncode == 0 and f"not running (read from its state dir {cfg.state_dir})" in text.stdout
    s = cli_json(edgesdk_cli, "agent", "status", "--config", cfg_path)
    assert s["running"] is False and s["outbox"]["pending"] == 2
    assert [(m["name"], m["active"], m["previous"]) for m in s["models"]] == [("digits", "2", "1")]
    assert [(q.state, q.version, q.rollout) for q in queued_statuses(cfg)] == [("SUCCEEDED", "2", None),
                                                                                 ("FAILED", "4", None)]

    fleet = make_fleet(broker.url)
    agent_process(cfg_path)
    with AgentClient(cfg.socket_path) as client:
        assert [(m["name"], m["active"]) for m in client.models()] == [("digits", "2")]
    sha = hashlib.sha256(digits_bundle_v2.path.read_bytes()).hexdigest()
    device = lambda: next((d for d in fleet.devices() if d.id == "side-3" and d.online), None)  # noqa: E731
    assert eventually(lambda: device() is not None and device().models == {"digits": "2"} and sha in device().bundles)
    assert eventually(lambda: cli_json(edgesdk_cli, "agent", "status", "--config", cfg_path)["outbox"]["pending"] == 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_a_deploy_as_root_leaves_the_state_dir_to_its_owner(agent_toml, preinstall, edgesdk_cli, digits_bundle,
                                                            digits_bundle_v2) -> None:
    cfg_path = agent_toml("side-4", "mqtt://127.0.0.1:1")
    cfg = preinstall(cfg_path, digits_bundle.path)
    for path in [cfg.state_dir, *cfg.state_dir.rglob("*")]:
        os.lchown(path, 65534, 65534)  # the agent's own user owns its state dir
    r = edgesdk_cli("agent", "deploy", digits_bundle_v2.path, "--config", cfg_path)
    assert r.returncode == 0, r.stderr
    owners = {(p.relative_to(cfg.state_dir).as_posix(), p.lstat().st_uid) for p in cfg.state_dir.rglob("*")}
    assert {"models/digits/2/bundle.edgebundle", "outbox.sqlite", "agent.lock"} <= {p for p, _ in owners}
    assert {uid for _, uid in owners} == {65534}


@pytest.fixture
def pixels_agent(agent_toml, preinstall, agent_process, digits_bundle_pixels):
    """An agent process (no MQTT) serving the digits CNN that takes uint8 pixels (0..16) or floats."""
    cfg_path = agent_toml("side-5", "mqtt://127.0.0.1:1")
    cfg = preinstall(cfg_path, digits_bundle_pixels.path)
    agent_process(cfg_path, "--no-mqtt")
    return cfg_path, cfg


def test_predict_prints_the_agents_outputs_for_npy_npz_and_images(pixels_agent, edgesdk_cli, digits, tmp_path) -> None:
    from PIL import Image

    cfg_path, cfg = pixels_agent
    x = digits.x_test[:3].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    pixels = np.round(digits.x_test[5] * 16).astype(np.uint8)  # the digits' own 0..16 scale
    Image.fromarray(pixels[..., 0]).save(tmp_path / "digit.png")  # 8-bit grayscale
    with AgentClient(cfg.socket_path) as client:
        expected = np.concatenate([client.predict("digits", [s[None]])[0] for s in x])
        from_pixels = client.predict("digits", [pixels[None]])[0]

    for name in ("x.npy", "x.npz"):
        out = cli_json(edgesdk_cli, "agent", "predict", "digits", tmp_path / name, "--config", cfg_path)
        assert (out["model"], out["version"], out["samples"]) == ("digits", "1", 3)
        (y,) = out["outputs"]
        assert y["shape"] == [3, 10] and y["dtype"] == "float32"
        np.testing.assert_array_equal(np.array(y["values"], dtype=np.float32), expected)
    image = cli_json(edgesdk_cli, "agent", "predict", "digits", tmp_path / "digit.png", "--config", cfg_path)
    np.testing.assert_array_equal(np.array(image["outputs"][0]["values"], dtype=np.float32), from_pixels)

    r = edgesdk_cli("agent", "predict", "digits", tmp_path / "x.npy", "--config", cfg_path, "-o", tmp_path / "y.npz")
    assert r.returncode == 0 and r.stdout.startswith("digits@1, 3 sample(s):\n"), r.stderr
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_array_equal(saved[saved.files[0]], expected)

    np.save(tmp_path / "wrong.npy", np.zeros((2, 8, 8), np.float32))
    r = edgesdk_cli("agent", "predict", "digits", tmp_path / "wrong.npy", "--config", cfg_path)
    assert r.returncode == 5 and "add the channel axis" in one_error_line(r)
    r = edgesdk_cli("agent", "predict", "nope", tmp_path / "x.npy", "--config", cfg_path)
    assert r.returncode == 14 and one_error_line(r) == ("error: no model named 'nope' is active on the agent: see "
                                                         "edgesdk agent status")


def test_predict_of_an_image_without_pillow_names_the_extra(pixels_agent, tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from edgesdk.cli import cli

    cfg_path, _ = pixels_agent
    (tmp_path / "digit.png").write_bytes(b"not decoded: Pillow is missing")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as on a device with only the agent extra
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    r = CliRunner().invoke(cli, ["agent", "predict", "digits", str(tmp_path / "digit.png"), "--config", str(cfg_path)])
    assert r.exit_code == 3
    assert "run pip install 'edgesdk[images]'" in r.output and "Traceback" not in r.output


def test_predict_without_a_running_agent_says_how_to_start_it(agent_toml, edgesdk_cli, tmp_path) -> None:
    cfg_path = agent_toml("side-6", "mqtt://127.0.0.1:1")
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8, 1), np.float32))
    r = edgesdk_cli("agent", "predict", "digits", tmp_path / "x.npy", "--config", cfg_path)
    assert r.returncode == 14
    assert one_error_line(r) == (f"error: the agent is not running (nothing answers on {tmp_path / 'side-6-state'}"
                                 f"/agent.sock): start it (edgesdk agent run --config {cfg_path}, or systemctl start "
                                 "edgesdk-agent.service)")


def test_the_local_api_refuses_a_bundle_over_the_configured_size_before_reading_it(tmp_path, signing_keys,
                                                                                   digits_bundle) -> None:
    from sdk.errors import InstallError

    cfg = load_config(None, env={}, device_id="small", state_dir=tmp_path / "state", threads=1, pool_size=1,
                      trusted_keys=[str(signing_keys.public)], max_bundle_bytes=1000)
    agent = Agent(cfg).start()
    try:
        with AgentClient(cfg.socket_path) as client:
            with pytest.raises(InstallError, match=r"more than this agent takes \(max_bundle_bytes 1000\)"):
                client.deploy(digits_bundle.path.read_bytes())
        with AgentClient(cfg.socket_path) as client:  # the agent goes on serving new connections
            assert client.ping() and client.status()["models"] == []
    finally:
        agent.stop()
