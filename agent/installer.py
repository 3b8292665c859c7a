"""Installing a bundle safely: verify → check compatibility → load → health check.

Only a bundle that passes every step is handed back for the swap; any failure raises
:class:`~sdk.errors.InstallError` whose message starts with the step that failed and says why,
and nothing about the active model changes.

1. verify: Ed25519 signature against the trusted keys, then every file's sha256;
2. compatibility: the runtime's TFLite version is at least the manifest's minimum;
3. load: the configured delegate (the Edge TPU-compiled variant when the bundle carries one and
   the Edge TPU is usable); a model needing an op the runtime lacks is rejected here, naming it;
4. health check: replay the manifest's golden inputs (regenerated from the seed), outputs must
   match within the recorded tolerance; the measured p50 must stay under the bundle's latency
   limit when it sets one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sdk import golden
from sdk.bundle import EDGETPU_MODEL_NAME, Bundle
from sdk.errors import DelegateUnavailableError, EdgeSdkError, IncompatibleBundleError, InstallError
from sdk.latency import measure, measure_interleaved
from sdk.runtime import DelegateOptions, Runtime

from .serving import ActiveModel

__all__ = ["PreparedInstall", "prepare_install", "health_check", "compare_latency"]


@dataclass
class PreparedInstall:
    bundle: Bundle
    model: ActiveModel
    golden_max_error: float
    p50_ms: float

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    def summary(self) -> dict[str, Any]:
        return {"model": self.name, "version": self.version, "delegate": self.model.delegate,
                "golden_max_error": self.golden_max_error, "p50_ms": self.p50_ms}


def _step(name: str, exc: BaseException) -> InstallError:
    return InstallError(f"{name} failed: {exc}")


def health_check(model: ActiveModel, bundle: Bundle, *, runs: int = 20) -> tuple[float, float]:
    """Replay the golden pairs; return (worst absolute error, p50 ms). Raises InstallError."""
    m = bundle.manifest
    g = m.golden
    if not g:
        raise InstallError("health check failed: the bundle has no golden pairs (re-create it with edgesdk convert)")
    expected = golden.decode_outputs(bundle.read(g["file"]), int(g["pairs"]), len(m.outputs))
    worst = 0.0
    first_inputs = None
    for pair in range(int(g["pairs"])):
        inputs = golden.golden_inputs(int(g["seed"]), pair, m.inputs)
        first_inputs = first_inputs or inputs
        ok, err, why = golden.compare_outputs(expected[pair], model.run_raw_on_one_engine(inputs), g["tolerance"])
        worst = max(worst, err)
        if not ok:
            raise InstallError(f"health check failed: golden pair {pair}: {why} on the {model.delegate} delegate")
    lat = measure(lambda: model.run_raw_on_one_engine(first_inputs), warmup=2, runs=runs)
    limit = m.latency_limit_ms
    if limit is not None and lat.p50_ms > float(limit):
        raise InstallError(
            f"health check failed: p50 latency {lat.p50_ms:.3f} ms exceeds the bundle's limit of {float(limit):.3f} ms"
        )
    return worst, lat.p50_ms


def prepare_install(
    raw: bytes,
    trusted: Iterable[Ed25519PublicKey],
    runtime: Runtime,
    *,
    delegate: str = "auto",
    options: Optional[DelegateOptions] = None,
    pool_size: int = 1,
    source: str = "<bundle>",
) -> PreparedInstall:
    """Run steps 1-4 on a bundle's bytes; return the loaded, checked model (not yet active)."""
    try:
        bundle = Bundle(raw, source=source).verify(list(trusted))
    except EdgeSdkError as exc:
        raise _step("verify", exc) from exc
    m = bundle.manifest
    if not runtime.supports(m.min_runtime_version):
        exc = IncompatibleBundleError(
            f"{m.model_id} needs TFLite runtime {m.min_runtime_version}, this device has {runtime.name} "
            f"{runtime.version} (TFLite {runtime.tflite_version}): upgrade the runtime (pip install -U ai-edge-litert)"
        )
        raise _step("compatibility check", exc) from exc
    try:
        model = None
        if EDGETPU_MODEL_NAME in m.files and delegate in ("auto", "edgetpu"):
            try:
                model = ActiveModel.load(m.name, m.version, m.data, bundle.model_bytes(edgetpu=True),
                                         delegate="edgetpu", options=options, pool_size=pool_size)
            except DelegateUnavailableError:
                if delegate == "edgetpu":
                    raise
        if model is None:
            model = ActiveModel.load(m.name, m.version, m.data, bundle.model_bytes(), delegate=delegate,
                                     options=options, pool_size=pool_size)
    except EdgeSdkError as exc:
        raise _step("load", exc) from exc
    worst, p50 = health_check(model, bundle)
    return PreparedInstall(bundle, model, worst, p50)



def _golden_call(model: ActiveModel):
    g = model.manifest.get("golden") or {}
    inputs = golden.golden_inputs(int(g.get("seed", 0)), 0, model.manifest.get("inputs", []))
    return lambda: model.run_raw_on_one_engine(inputs)


def compare_latency(new: ActiveModel, old: ActiveModel, *, runs: int = 30, min_seconds: float = 0.3) -> tuple[float, float]:
    """p50 ms of the new and the currently active model, each on its own golden inputs, measured
    interleaved at the same moment on this device: the figures a fleet compares for a latency
    regression (a p50 from yesterday's heartbeat was taken under other load)."""
    stats = measure_interleaved({"new": _golden_call(new), "old": _golden_call(old)}, warmup=2, runs=runs,
                                min_seconds=min_seconds)
    return stats["new"].p50_ms, stats["old"].p50_ms
