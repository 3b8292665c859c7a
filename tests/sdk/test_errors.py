import inspect
import sys

import pytest

import sdk.errors as errors
from sdk.deps import require


def test_every_error_is_an_edgesdk_error_and_listed_in_the_tree() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) == len(errors.__all__)
    for cls in classes:
        assert issubclass(cls, errors.EdgeSdkError)
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the exception tree docstring"


def test_missing_dependency_names_the_exact_pip_command() -> None:
    with pytest.raises(errors.MissingDependencyError) as exc:
        require("edgesdk_surely_not_installed.sub", "converter", "to convert models")
    msg = str(exc.value)
    assert "pip install 'edgesdk[converter]'" in msg
    assert "edgesdk_surely_not_installed" in msg
    assert isinstance(exc.value.__cause__, ImportError)


def test_a_package_two_roles_bring_names_both_extras() -> None:
    with pytest.raises(errors.MissingDependencyError) as exc:
        require("edgesdk_surely_not_installed", ("agent", "fleet"), "to talk to the MQTT broker")
    assert str(exc.value).endswith("run pip install 'edgesdk[agent]' (or 'edgesdk[fleet]')")
    assert exc.value.extras == ("agent", "fleet") and exc.value.exit_code == 3


def test_exit_codes_distinguish_the_kinds() -> None:
    kinds = [errors.ConfigError, errors.MissingDependencyError, errors.ModelError, errors.DataError,
             errors.ConversionError, errors.AccuracyBudgetExceeded, errors.BundleError, errors.SignatureError,
             errors.IncompatibleBundleError, errors.SigningKeyError, errors.RuntimeUnavailableError,
             errors.DelegateUnavailableError, errors.InferenceError, errors.InstallError, errors.ProtocolError,
             errors.BrokerError, errors.BackpressureError]
    codes = [k.exit_code for k in kinds]
    assert len(set(codes)) == len(codes)
    assert all(c not in (0, 1) for c in codes)


# --- a missing package names the extra of the role that asked for it -------------------------------
def not_installed(monkeypatch, *modules: str) -> None:
    """Importing ``modules`` fails from now on (this test only), as when their package is missing."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_mqtt_asks_for_the_extra_of_the_role_that_connects(agent_config, tmp_path, monkeypatch) -> None:
    from agent import Agent
    from agent.link import AgentLink
    from fleet import Fleet

    not_installed(monkeypatch, "paho.mqtt.client")
    link = AgentLink(Agent(agent_config))
    try:
        with pytest.raises(errors.MissingDependencyError) as agent_side:
            link.start()
    finally:
        link.stop()
    fleet = Fleet(tmp_path / "fleet", "mqtt://127.0.0.1:1")
    try:
        with pytest.raises(errors.MissingDependencyError) as fleet_side:
            fleet.start()
    finally:
        fleet.stop()
    assert agent_side.value.extras == ("agent",) and str(agent_side.value).endswith("pip install 'edgesdk[agent]'")
    assert fleet_side.value.extras == ("fleet",) and str(fleet_side.value).endswith("pip install 'edgesdk[fleet]'")


def test_deltas_ask_the_fleet_that_makes_them_and_the_device_that_applies_them(monkeypatch) -> None:
    from sdk import delta

    not_installed(monkeypatch, "zstandard")
    with pytest.raises(errors.MissingDependencyError) as made:
        delta.make_delta(b"base", b"target", "zstd")
    with pytest.raises(errors.MissingDependencyError) as applied:
        delta.apply_delta(b"base", b"patch", "zstd", size=6)
    assert (made.value.extras, applied.value.extras) == (("fleet",), ("agent",))
    assert not delta.available("zstd")


def test_images_ask_for_the_extra_of_the_role_that_reads_them(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from converter.load import as_dataset
    from fleet.inputs import load_job_inputs
    from sdk.dataset import InputSpec, load_image

    spec = InputSpec("x", (1, 8, 8, 3))
    (tmp_path / "one.png").write_bytes(b"\x89PNG")
    not_installed(monkeypatch, "PIL.Image")
    asked = {}
    for role, read in {
        "converter": lambda: as_dataset(tmp_path, SimpleNamespace(inputs=[spec]), "calibration", None, (0.0, 1.0)),
        "fleet": lambda: load_job_inputs("m", tmp_path, {"inputs": [{"key": "x", "shape": [1, 8, 8, 3], "dtype": "float32"}]}),
        "images": lambda: load_image(tmp_path / "one.png", spec),  # the agent's `agent predict IMAGE`
    }.items():
        with pytest.raises(errors.MissingDependencyError) as exc:
            read()
        asked[role] = exc.value.extras
    assert asked == {"converter": ("converter",), "fleet": ("fleet",), "images": ("images",)}
