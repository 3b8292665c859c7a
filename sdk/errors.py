"""Every error edgesdk raises, in one tree.

Foreign errors (TensorFlow's converter, LiteRT's interpreter and delegates, paho-mqtt, zip and
crypto libraries) are translated into these at one boundary each (``raise Ours(...) from exc``),
so a caller catches ``EdgeSdkError`` and gets a message that says what was wrong and what to do.

    EdgeSdkError
    ├── ConfigError                    bad configuration value or option combination
    ├── MissingDependencyError         an optional extra is not installed (names the pip command)
    ├── ModelError                     the source model cannot be used
    │   ├── ModelNotFoundError         no file or directory at that path
    │   ├── ModelLoadError             the file is there but is not a loadable model
    │   └── UnsupportedOpError         the model needs ops the device runtimes cannot run
    ├── DataError                      calibration / evaluation / training data is unusable
    ├── ConversionError                TFLite conversion failed
    │   ├── QuantizationError          a quantization recipe failed
    │   └── AccuracyBudgetExceeded     the converted model lost more accuracy than allowed
    ├── BundleError                    a bundle is unusable
    │   ├── BundleInvalidError         not a bundle, corrupt, or a file does not match its sha256
    │   ├── SignatureError             unsigned, signed by an untrusted key, or tampered with
    │   └── IncompatibleBundleError    the device runtime cannot run this bundle
    ├── SigningKeyError                a key file is missing or not an Ed25519 PEM key
    ├── RuntimeUnavailableError        no TFLite runtime importable
    │   └── DelegateUnavailableError   an explicitly requested delegate cannot be loaded
    ├── InferenceError                 a request the agent cannot serve (unknown model, wrong input)
    ├── InstallError                   a bundle install failed; the previous version stays active
    ├── BackpressureError              the agent's outbox is full: it accepts no new work until acked
    ├── ProtocolError                  a message that does not follow the wire protocol
    ├── BrokerError                    the MQTT broker cannot be reached or refused us
    ├── AuthenticationError            a request to the fleet's HTTP API lacks a valid token
    └── FleetError                     a fleet operation cannot proceed
        ├── NotFoundError              no rollout, job or device with that id
        ├── RolloutError               a rollout cannot be created or was aborted
        └── JobError                   a batch job cannot be created or did not complete

Each class carries ``exit_code`` so the CLI exits with a stable, documented code per kind.
"""

from __future__ import annotations

__all__ = [
    "EdgeSdkError",
    "ConfigError",
    "MissingDependencyError",
    "ModelError",
    "ModelNotFoundError",
    "ModelLoadError",
    "UnsupportedOpError",
    "DataError",
    "ConversionError",
    "QuantizationError",
    "AccuracyBudgetExceeded",
    "BundleError",
    "BundleInvalidError",
    "SignatureError",
    "IncompatibleBundleError",
    "SigningKeyError",
    "RuntimeUnavailableError",
    "DelegateUnavailableError",
    "InferenceError",
    "InstallError",
    "BackpressureError",
    "ProtocolError",
    "BrokerError",
    "AuthenticationError",
    "FleetError",
    "NotFoundError",
    "RolloutError",
    "JobError",
]


class EdgeSdkError(Exception):
    """Base of every edgesdk error. ``str(err)`` is one line a person can act on."""

    exit_code = 1


class ConfigError(EdgeSdkError):
    """A configuration value or a combination of options is invalid."""

    exit_code = 2


class MissingDependencyError(EdgeSdkError):
    """An optional dependency is not installed; the message names the extra to install."""

    exit_code = 3

    def __init__(self, module: str, extra: str | tuple[str, ...], purpose: str = "") -> None:
        """``extra``: the extra that brings ``module``, or every role's extra that does (a package
        shared by the agent and the fleet names both, since either role may be the one asking)."""
        extras = (extra,) if isinstance(extra, str) else tuple(extra)
        self.module = module
        self.extra = extras[0]
        self.extras = extras
        what = f" ({purpose})" if purpose else ""
        others = "".join(f" (or 'edgesdk[{e}]')" for e in extras[1:])
        super().__init__(
            f"Python package '{module}' is not installed{what}: "
            f"run pip install 'edgesdk[{extras[0]}]'{others}"
        )


class ModelError(EdgeSdkError):
    """The source model cannot be used."""

    exit_code = 4


class ModelNotFoundError(ModelError):
    """No model at the given path."""


class ModelLoadError(ModelError):
    """The path exists but does not hold a model edgesdk can load."""


class UnsupportedOpError(ModelError):
    """The model needs operators no device runtime here can run (Flex/Select-TF or custom ops)."""

    def __init__(self, message: str, ops: list[str] | None = None) -> None:
        self.ops = list(ops or [])
        super().__init__(message)


class DataError(EdgeSdkError):
    """Calibration, evaluation or training data is missing, unreadable or of the wrong shape."""

    exit_code = 5


class ConversionError(EdgeSdkError):
    """TFLite conversion failed."""

    exit_code = 6


class QuantizationError(ConversionError):
    """A quantization recipe failed (often: calibration data not representative)."""


class AccuracyBudgetExceeded(ConversionError):
    """The converted model's accuracy drop is over ``--max-accuracy-drop``."""

    exit_code = 7

    def __init__(self, message: str, report: object | None = None) -> None:
        self.report = report
        super().__init__(message)


class BundleError(EdgeSdkError):
    """A bundle cannot be used."""

    exit_code = 8


class BundleInvalidError(BundleError):
    """Not a bundle, a corrupt one, or a file inside that does not match its recorded sha256."""


class SignatureError(BundleError):
    """The bundle is unsigned, signed by a key that is not trusted, or its manifest was changed."""

    exit_code = 9


class IncompatibleBundleError(BundleError):
    """The bundle needs a runtime (version, ops, delegate) this device does not have."""

    exit_code = 10


class SigningKeyError(EdgeSdkError):
    """A signing or verification key file is missing or is not an Ed25519 PEM key."""

    exit_code = 11


class RuntimeUnavailableError(EdgeSdkError):
    """No TFLite runtime (ai-edge-litert, tflite-runtime or TensorFlow) can be imported."""

    exit_code = 12


class DelegateUnavailableError(RuntimeUnavailableError):
    """A delegate that was explicitly requested cannot be loaded on this machine."""

    exit_code = 13


class InferenceError(EdgeSdkError):
    """A request the agent cannot serve: unknown model, wrong input count, shape or dtype."""

    exit_code = 14


class InstallError(EdgeSdkError):
    """Installing a bundle failed (verification, load, health check); the previous version stays."""

    exit_code = 15


class ProtocolError(EdgeSdkError):
    """A message that does not follow edgesdk's wire protocol (schema, type, fields, framing)."""

    exit_code = 16


class BrokerError(EdgeSdkError):
    """The MQTT broker cannot be reached, refused the connection, or a message is too large for it."""

    exit_code = 17


class BackpressureError(EdgeSdkError):
    """The agent's durable outbox is full; it accepts no new work until the fleet acknowledges."""

    exit_code = 18


class AuthenticationError(EdgeSdkError):
    """A request to the fleet's HTTP API carried no bearer token, or not the one it was started with."""

    exit_code = 23


class FleetError(EdgeSdkError):
    """A fleet operation cannot proceed (see the subclasses)."""

    exit_code = 19


class NotFoundError(FleetError):
    """No rollout, job or device with that id in the fleet's state."""

    exit_code = 20


class RolloutError(FleetError):
    """A rollout cannot be created (no targets, bad options) or ended ABORTED."""

    exit_code = 21


class JobError(FleetError):
    """A batch job cannot be created (no model, bad data) or could not complete."""

    exit_code = 22
