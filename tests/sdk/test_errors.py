import inspect

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
