"""The agent as operators run it: ``edgesdk agent install`` and ``edgesdk agent run`` as real
processes, killed with SIGKILL and restarted, against a real Mosquitto."""

import configparser
import os
import signal
import subprocess
import sys


from agent import Agent, AgentClient
from agent.config import load_config
from sdk import protocol as proto


def test_agent_install_root_writes_a_valid_unit_and_config(tmp_path, edgesdk_cli, signing_keys) -> None:
    cfg = tmp_path / "in.toml"
    cfg.write_text(f'device_id = "pi-9"\nstate_dir = "/var/lib/edgesdk"\ntrusted_keys = ["{signing_keys.public}"]\n'
                   '[tags]\nsite = "berlin"\n')
    root = tmp_path / "root"
    dry = edgesdk_cli("agent", "install", "--config", cfg, "--root", root, "--dry-run")
    assert dry.returncode == 0 and "would write systemd unit" in dry.stdout and not root.exists()
    r = edgesdk_cli("agent", "install", "--config", cfg, "--root", root)
    assert r.returncode == 0, r.stderr
    unit = configparser.ConfigParser(strict=False, interpolation=None)  # units repeat keys (DeviceAllow=, ...)
    unit.read(root / "etc/systemd/system/edgesdk-agent.service")
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["ExecStart"].endswith("-m edgesdk agent run --config /etc/edgesdk/agent.toml")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    installed = load_config(root / "etc/edgesdk/agent.toml", env={})
    assert installed.device_id == "pi-9" and installed.tags == {"site": "berlin"}
    assert (root / "var/lib/edgesdk").is_dir()


def test_bad_config_exits_non_zero_with_one_line(tmp_path, edgesdk_cli) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('broker_url = "http://nope"\n')
    r = edgesdk_cli("agent", "run", "--config", cfg)
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        "error: broker_url 'http://nope': use mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (a cluster's nodes: "
        "mqtt://HOST:PORT,HOST:PORT)"
    ]


def start_agent(cfg_path, log):
    return subprocess.Popen([sys.executable, "-m", "edgesdk", "agent", "run", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGESDK_DEBUG": "1"})


def test_killed_agent_replays_its_outbox_and_its_will_says_offline(tmp_path, broker, collector, eventually,
                                                                     signing_keys, digits_bundle, digits) -> None:
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(f'device_id = "proc-1"\nbroker_url = "{broker.url}"\nstate_dir = "{tmp_path / "state"}"\n'
                        f'trusted_keys = ["{signing_keys.public}"]\nthreads = 1\npool_size = 1\nheartbeat_interval = 1.0\n')
    cfg = load_config(cfg_path, env={})
    setup = Agent(cfg)
    setup.install(digits_bundle.path)  # pre-stage the model in the store, as a previous run would have
    setup.stop()
    log = open(tmp_path / "agent.log", "wb")

    proc = start_agent(cfg_path, log)
    try:
        assert eventually(lambda: getattr(collector.statuses.get("proc-1"), "online", False), timeout=30)
        assert collector.statuses["proc-1"].models == {"digits": "1"}
        broker.kill()  # the network goes away ...
        assert eventually(lambda: cfg.socket_path.exists(), timeout=10)
        with AgentClient(cfg.socket_path) as client:
            for i, x in enumerate(digits.x_test[:20]):
                client.predict("digits", [x[None]], publish_key=f"k{i}")  # ... while results keep coming
        proc.send_signal(signal.SIGKILL)  # and the agent dies with all 20 unsent
        proc.wait(10)
        broker.start()
        proc = start_agent(cfg_path, log)
        assert eventually(lambda: len(collector.of_type(proto.Result)) >= 20, timeout=60)
        results = collector.of_type(proto.Result)
        assert sorted(r.key for r in results) == sorted(f"k{i}" for i in range(20))
        assert all(r.device == "proc-1" and r.version == "1" for r in results)
        assert eventually(lambda: getattr(collector.statuses.get("proc-1"), "online", False), timeout=30)

        proc.send_signal(signal.SIGKILL)  # the Last-Will tells the fleet
        proc.wait(10)
        assert eventually(lambda: collector.statuses["proc-1"].online is False, timeout=30)

        proc = start_agent(cfg_path, log)
        assert eventually(lambda: collector.statuses["proc-1"].online is True, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # clean shutdown on SIGTERM ...
        assert eventually(lambda: collector.statuses["proc-1"].online is False, timeout=10)  # ... says offline
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
