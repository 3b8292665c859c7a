"""How model inputs travel compactly: uint8 images normalised on the device, and integer inputs
quantised once by the fleet.

* **Normalisation.** The converter records, per image input, how a uint8 pixel becomes the
  float the model was trained on: ``x_float = x_uint8 * scale + offset`` (``--input-normalization
  [NAME=]SCALE,OFFSET``; ``1/255,0`` for [0, 1], ``2/255,-1`` for [-1, 1]; a mean/std
  normalisation is ``scale = 1/(255*std)``, ``offset = -mean/std``). It is the manifest input
  entry's ``"normalization": {"scale": S, "offset": O}``. An agent given uint8 for such an input
  (a task, an in-process or local API request) applies it before quantising or feeding the
  model, so images travel as 1 byte per value instead of 4.
* **Fleet-side quantisation.** For an input the model takes quantised (int8/uint8/int16 with a
  scale), the fleet quantises float job inputs once with the manifest's scale and zero point
  (:func:`sdk.runtime.quantize`, the very function the agent would use) and sends the integers
  with their ``[scale, zero_point]`` (:attr:`sdk.protocol.Task.quant`). The agent feeds them as
  they are when they are its model's own, and dequantises them otherwise (a device running
  another version), so a result is never computed on wrongly scaled inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import BundleInvalidError, ConfigError
from .modelinfo import TensorInfo

__all__ = ["Normalization", "manifest_normalizations", "check_manifest_inputs", "tensor_info", "encode_job_inputs",
           "same_quantization", "ENCODINGS"]

#: how a job input travels (what the job summary reports per input)
ENCODINGS = ("as-given", "uint8-normalized-on-device", "quantized-by-fleet")


@dataclass(frozen=True)
class Normalization:
    """``x_float = x_uint8 * scale + offset``, computed in float32 (the agent's and the tests' one formula)."""

    scale: float
    offset: float

    def __post_init__(self) -> None:
        for what, v in (("scale", self.scale), ("offset", self.offset)):
            if type(v) not in (int, float) or not math.isfinite(v) or abs(v) > 1e6:
                raise ConfigError(f"input normalization {what} {v!r} must be a finite number within 1e6")
        if self.scale == 0:
            raise ConfigError("input normalization scale must not be 0")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """uint8 values to the model's floats."""
        out = np.multiply(x, np.float32(self.scale), dtype=np.float32)
        out += np.float32(self.offset)
        return out

    @property
    def value_range(self) -> tuple[float, float]:
        """The floats pixels 0..255 become (what image folders are scaled to)."""
        a, b = self.offset, 255.0 * self.scale + self.offset
        return (min(a, b), max(a, b))

    def to_json(self) -> dict[str, float]:
        return {"scale": float(self.scale), "offset": float(self.offset)}

    @classmethod
    def parse(cls, text: str) -> "Normalization":
        """``SCALE,OFFSET``; each a number or a fraction (``1/255``)."""
        try:
            scale, offset = (_number(p) for p in str(text).split(","))
        except ValueError as exc:
            raise ConfigError(f"input normalization {text!r}: give SCALE,OFFSET such as 1/255,0 or 2/255,-1 "
                              "(x_float = x_uint8 * SCALE + OFFSET)") from exc
        return cls(scale, offset)

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> Optional["Normalization"]:
        """The normalisation a manifest input entry records, or None; raises BundleInvalidError
        when it is malformed."""
        raw = entry.get("normalization")
        if raw is None:
            return None
        if type(raw) is not dict or set(raw) != {"scale", "offset"}:
            raise BundleInvalidError(f"manifest input {entry.get('name')!r}: normalization must be "
                                     "{\"scale\": S, \"offset\": O}: re-create the bundle")
        try:
            return cls(raw["scale"], raw["offset"])
        except ConfigError as exc:
            raise BundleInvalidError(f"manifest input {entry.get('name')!r}: {exc}: re-create the bundle") from exc


def _number(text: str) -> float:
    num, sep, den = text.strip().partition("/")
    value = float(num) / float(den) if sep else float(num)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def check_manifest_inputs(inputs: Any) -> None:
    """The manifest's input entries hold well-formed normalisations, only on inputs that take
    floats or are quantised (what it could apply to). Raises BundleInvalidError."""
    if not isinstance(inputs, list):
        raise BundleInvalidError("manifest inputs must be a list: the bundle is corrupt")
    for entry in inputs:
        if not isinstance(entry, dict):
            raise BundleInvalidError("manifest input entries must be objects: the bundle is corrupt")
        norm = Normalization.from_manifest(entry)
        if norm is not None:
            info = tensor_info(entry)
            if np.dtype(info.dtype).kind != "f" and not info.quantized:
                raise BundleInvalidError(f"manifest input {entry.get('name')!r} is {info.dtype}, not float or "
                                         "quantized: a normalization cannot apply to it; re-create the bundle")


def tensor_info(entry: Mapping[str, Any]) -> TensorInfo:
    """A manifest input or output entry as a :class:`TensorInfo`."""
    try:
        shape = [int(d) for d in entry.get("shape") or []]
        return TensorInfo(str(entry.get("name", "")), shape, [int(d) for d in entry.get("shape_signature") or shape],
                          str(np.dtype(str(entry["dtype"]))), float(entry.get("scale") or 0.0),
                          int(entry.get("zero_point") or 0), key=str(entry.get("key") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleInvalidError(f"manifest tensor entry {str(entry)[:120]} is malformed ({exc}): re-create the bundle") \
            from exc


def manifest_normalizations(manifest: Mapping[str, Any], tensors: Sequence[TensorInfo]) -> list[Optional[Normalization]]:
    """The normalisation of each of ``tensors`` (a model's inputs, in its order), matched to the
    manifest's entries by tensor name, else signature name, else position."""
    entries = [e for e in manifest.get("inputs") or [] if isinstance(e, dict)]
    by_name = {str(e.get("name")): e for e in entries if e.get("name")}
    by_key = {str(e.get("key")): e for e in entries if e.get("key")}
    out: list[Optional[Normalization]] = []
    for i, t in enumerate(tensors):
        entry = by_name.get(t.name) or (by_key.get(t.key) if t.key else None)
        if entry is None and len(entries) == len(tensors):
            entry = entries[i]
        out.append(Normalization.from_manifest(entry) if entry is not None else None)
    return out


def same_quantization(spec: TensorInfo, quant: Optional[tuple[float, int]]) -> bool:
    """Whether integers quantised with ``quant`` are ``spec``'s own (so they go to the model as they are)."""
    return (quant is not None and spec.quantized and int(quant[1]) == int(spec.zero_point)
            and math.isclose(float(quant[0]), float(spec.scale), rel_tol=1e-6, abs_tol=0.0))


def encode_job_inputs(arrays: Sequence[np.ndarray], manifest: Optional[Mapping[str, Any]]
                      ) -> tuple[list[np.ndarray], list[Optional[list[Any]]], list[str]]:
    """A job's inputs as they will travel, for a model with ``manifest`` (None: as given):
    float inputs of an input the model takes quantised are quantised once, here; uint8 for an
    input with a recorded normalisation stays uint8 (the device normalises it); anything else
    travels as given. Returns the arrays, each one's ``[scale, zero_point]`` (or None) for
    :attr:`sdk.protocol.Task.quant`, and each one's encoding (:data:`ENCODINGS`)."""
    from .runtime import quantize

    entries = list((manifest or {}).get("inputs") or [])
    out, quant, how = [], [], []
    for i, a in enumerate(arrays):
        entry = entries[i] if len(entries) == len(arrays) else None
        info = tensor_info(entry) if entry is not None else None
        norm = Normalization.from_manifest(entry) if entry is not None else None
        if info is not None and info.quantized and a.dtype.kind == "f":
            out.append(quantize(a, info))
            quant.append([float(info.scale), int(info.zero_point)])
            how.append("quantized-by-fleet")
            continue
        out.append(a)
        quant.append(None)
        how.append("uint8-normalized-on-device" if norm is not None and a.dtype == np.uint8 else "as-given")
    return out, quant, how
