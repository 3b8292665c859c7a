"""Read what a ``.tflite`` file holds without TensorFlow: ops, versions, tensors, runtime needs.

The converter records this in the manifest so that agents and the fleet can refuse a bundle a
device's runtime cannot load *before* any transfer (tflite-runtime 2.14, for one, rejects op
versions TensorFlow 2.21 emits). Parsing uses the flatbuffer schema shipped with ai-edge-litert.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from .deps import require
from .errors import ModelLoadError

__all__ = ["TensorInfo", "NodeInfo", "ModelInfo", "read_model_info", "version_tuple"]


@dataclass
class TensorInfo:
    """One tensor: what the agent needs to feed or read it (quantization included)."""

    name: str
    shape: list[int]
    shape_signature: list[int]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0
    constant: bool = field(default=False, compare=False)

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.dtype(self.dtype).kind in "iu"

    @property
    def static(self) -> bool:
        return all(d > 0 for d in self.shape_signature)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("constant")
        return d


@dataclass
class NodeInfo:
    """One operator node, in execution order."""

    index: int
    op: str
    version: int
    custom: bool
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)


@dataclass
class ModelInfo:
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: list[NodeInfo]
    min_runtime_version: Optional[str]
    size: int

    @property
    def ops(self) -> list[dict[str, Any]]:
        """Distinct (op, version) pairs with their node counts, in first-use order."""
        seen: dict[tuple[str, int], dict[str, Any]] = {}
        for n in self.nodes:
            key = (n.op, n.version)
            if key not in seen:
                seen[key] = {"op": n.op, "version": n.version, "custom": n.custom, "count": 0}
            seen[key]["count"] += 1
        return list(seen.values())

    @property
    def custom_ops(self) -> list[str]:
        return sorted({n.op for n in self.nodes if n.custom})

    @property
    def static_shapes(self) -> bool:
        return all(t.static for t in self.inputs + self.outputs)


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.14.0' -> (2, 14, 0); anything unparsable sorts first."""
    parts = []
    for piece in str(version).split("."):
        m = re.match(r"\d+", piece)
        parts.append(int(m.group()) if m else 0)
    return tuple(parts)


def _enum_names(enum_cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def read_model_info(model: bytes) -> ModelInfo:
    """Parse a ``.tflite`` flatbuffer; raise ModelLoadError when it is not one."""
    schema = require("ai_edge_litert.schema_py_generated", "agent", "to read .tflite files")
    if len(model) < 8 or model[4:8] != b"TFL3":
        raise ModelLoadError("not a TFLite flatbuffer (no TFL3 identifier): pass a .tflite file")
    try:
        m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(model), 0))
    except Exception as exc:  # the generated parser raises anything from struct errors to IndexError
        raise ModelLoadError(f"the .tflite flatbuffer is corrupt ({type(exc).__name__}): re-convert the model") from exc

    op_names = _enum_names(schema.BuiltinOperator)
    type_names = {k: v.lower() for k, v in _enum_names(schema.TensorType).items()}
    sub = m.subgraphs[0]

    def tensor(i: int) -> TensorInfo:
        t = sub.tensors[i]
        q = t.quantization
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) == 1 else 0.0
        zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) == 1 else 0
        shape = [int(d) for d in (t.shape if t.shape is not None else [])]
        sig = [int(d) for d in t.shapeSignature] if t.shapeSignature is not None else list(shape)
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        buf = m.buffers[t.buffer] if t.buffer < len(m.buffers) else None
        constant = buf is not None and (buf.data is not None and len(buf.data) > 0 or bool(getattr(buf, "size", 0)))
        return TensorInfo(name, shape, sig, type_names.get(t.type, str(t.type)), scale, zero, constant)

    nodes = []
    for idx, op in enumerate(sub.operators or []):
        code = m.operatorCodes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        custom = name == "CUSTOM"
        if custom:
            cc = code.customCode
            name = cc.decode() if isinstance(cc, bytes) else str(cc)
        nodes.append(
            NodeInfo(
                index=idx,
                op=name,
                version=int(code.version),
                custom=custom,
                inputs=[tensor(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0],
                outputs=[tensor(i) for i in (op.outputs if op.outputs is not None else []) if i >= 0],
            )
        )

    min_rt = None
    for md in m.metadata or []:
        mname = md.name.decode() if isinstance(md.name, bytes) else str(md.name)
        if mname == "min_runtime_version":
            data = m.buffers[md.buffer].data
            raw = b"" if data is None else np.asarray(data, dtype=np.uint8).tobytes()
            min_rt = raw.split(b"\x00", 1)[0].decode() or None
    return ModelInfo(
        inputs=[tensor(i) for i in sub.inputs],
        outputs=[tensor(i) for i in sub.outputs],
        nodes=nodes,
        min_runtime_version=min_rt,
        size=len(model),
    )
