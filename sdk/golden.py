"""Golden input/output pairs: the install-time health check that travels inside a bundle.

The converter runs a few inputs through the converted model and stores the outputs; an agent
replays the same inputs on the device and compares. Storing the inputs themselves would bloat
the bundle (one 224x224x3 float image is 600 KB), so inputs are *regenerated* from a seed:
``shake_256(seed, pair, input)`` gives a byte stream that is mapped to uniform values in the
input's recorded value range. The generator depends on nothing but hashlib, so a device with a
different numpy produces bit-identical inputs.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["golden_inputs", "encode_outputs", "decode_outputs", "compare_outputs", "default_tolerance"]


def _uniform(seed: int, pair: int, slot: int, count: int) -> np.ndarray:
    stream = hashlib.shake_256(f"edgesdk-golden/{seed}/{pair}/{slot}".encode()).digest(4 * count)
    return np.frombuffer(stream, dtype="<u4").astype(np.float64) / 2.0**32


def golden_inputs(seed: int, pair: int, specs: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
    """The inputs of golden pair ``pair``, one array per input spec (batch of 1).

    Each spec carries ``shape``, ``dtype``, ``value_range`` (float domain, [low, high]) and, for
    integer tensors, ``scale``/``zero_point``: values are drawn in the float range and quantized
    exactly as the agent quantizes float requests.
    """
    arrays = []
    for slot, spec in enumerate(specs):
        shape = [max(1, int(d)) for d in spec["shape"]]
        count = int(np.prod(shape))
        low, high = (float(v) for v in spec.get("value_range", (0.0, 1.0)))
        values = low + (high - low) * _uniform(seed, pair, slot, count)
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            arr = values.astype(dtype)
        elif dtype.kind == "b":  # a mask: true where the draw is in the upper half of the range
            arr = values >= (low + high) / 2
        else:
            scale = float(spec.get("scale") or 0.0)
            zero = int(spec.get("zero_point") or 0)
            q = np.round(values / scale) + zero if scale else np.round(values)
            info = np.iinfo(dtype)
            arr = np.clip(q, info.min, info.max).astype(dtype)
        arrays.append(arr.reshape(shape))
    return arrays


def encode_outputs(pairs: Sequence[Sequence[np.ndarray]]) -> bytes:
    """Store every pair's outputs in one compressed npz (``p{pair}_o{output}``)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"p{i}_o{j}": out for i, outs in enumerate(pairs) for j, out in enumerate(outs)})
    return buf.getvalue()


def decode_outputs(blob: bytes, pairs: int, outputs: int) -> list[list[np.ndarray]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return [[npz[f"p{i}_o{j}"] for j in range(outputs)] for i in range(pairs)]


def default_tolerance(expected: np.ndarray, target: str) -> float:
    """Absolute tolerance for one output tensor, recorded in the manifest by the converter.

    Integer outputs may differ by a couple of quantization steps between kernels (XNNPACK vs
    reference vs Edge TPU); float outputs by a small fraction of their magnitude, more on the
    GPU, which computes in float16.
    """
    if expected.dtype.kind in "iu":
        return 2.0
    magnitude = float(np.max(np.abs(expected))) if expected.size else 1.0
    relative = 5e-2 if target == "gpu" else 1e-3
    return max(1e-5, relative * max(1.0, magnitude))


def compare_outputs(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], tolerances: Sequence[float]
) -> tuple[bool, float, str]:
    """Return (ok, worst absolute error, explanation) for one golden pair."""
    worst = 0.0
    for j, (exp, got, tol) in enumerate(zip(expected, actual, tolerances)):
        got = np.asarray(got)
        if got.shape != exp.shape:
            return False, float("inf"), f"output {j} has shape {got.shape}, expected {exp.shape}"
        err = float(np.max(np.abs(got.astype(np.float64) - exp.astype(np.float64)))) if exp.size else 0.0
        worst = max(worst, err)
        if not err <= tol:
            return False, worst, f"output {j} differs by {err:.6g} (tolerance {tol:.6g})"
    return True, worst, "ok"
