import pytest

from agent.config import AgentConfig, load_config
from sdk.errors import ConfigError


def test_toml_env_and_defaults(tmp_path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('device_id = "pi-1"\nbroker_url = "mqtts://broker.local"\nthreads = 4\n[tags]\nsite = "berlin"\n')
    cfg = load_config(cfg_file, env={"EDGESDK_THREADS": "3", "EDGESDK_TAGS": "site=paris,hw=coral",
                                     "EDGESDK_TRUSTED_KEYS": "/a.pem:/b.pem"})
    assert cfg.device_id == "pi-1" and cfg.threads == 3 and cfg.tags == {"site": "paris", "hw": "coral"}
    assert cfg.tls and cfg.broker_url == "mqtts://broker.local"
    assert [str(p) for p in cfg.trusted_keys] == ["/a.pem", "/b.pem"]
    assert cfg.socket_path == cfg.state_dir / "agent.sock"


def test_round_trip_through_toml(tmp_path) -> None:
    cfg = AgentConfig(device_id="d1", state_dir=tmp_path, tags={"hw": "cpu"}, trusted_keys=[tmp_path / "k.pem"])
    (tmp_path / "a.toml").write_text(cfg.to_toml())
    again = load_config(tmp_path / "a.toml", env={})
    assert again == cfg


@pytest.mark.parametrize(
    "text,message",
    [
        ('broker_url = "http://x"', "broker_url"),
        ('delegate = "npu"', "delegate"),
        ("threads = 0", "threads must be at least 1"),
        ('client_cert = "c.pem"', "client_cert and client_key"),
        ('colour = "blue"', "unknown config key"),
        ("threads = ", "not valid TOML"),
        ('device_id = "a/b"', "device_id"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message) -> None:
    (tmp_path / "a.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.toml", env={})


def test_missing_file_and_bad_env(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml", env={})
    with pytest.raises(ConfigError, match="EDGESDK_THREADS"):
        load_config(None, env={"EDGESDK_THREADS": "many"})


def test_a_clustered_broker_is_a_list_of_nodes_to_fail_over_between() -> None:
    from sdk.mqtt import MqttSettings

    settings = MqttSettings.from_url("mqtts://fleet:s%40cret@node1:8883,node2,node3:9883")
    assert settings.brokers == [("node1", 8883), ("node2", 8883), ("node3", 9883)]
    assert settings.tls and (settings.username, settings.password) == ("fleet", "s@cret")
    cfg = AgentConfig(device_id="d1", broker_url="mqtt://a:1884,b:1885")
    assert cfg.broker_url == "mqtt://a:1884,b:1885"
    for bad in ("mqtt://", "mqtt://a:1883,", "mqtt://a:x", "http://a", "mqtt://a/path"):
        with pytest.raises(ConfigError, match="broker_url"):
            AgentConfig(device_id="d1", broker_url=bad)
