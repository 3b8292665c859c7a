"""Read what a ``.tflite`` file holds without TensorFlow: ops, versions, tensors, runtime needs.

The converter records this in the manifest so that agents and the fleet can refuse a bundle a
device's runtime cannot load *before* any transfer (tflite-runtime 2.14, for one, rejects op
versions TensorFlow 2.21 emits). Parsing uses the flatbuffer schema shipped with ai-edge-litert.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .deps import require
from .errors import ModelLoadError

__all__ = ["TensorInfo", "NodeInfo", "ModelInfo", "read_model_info", "version_tuple", "match_names"]


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
    #: the tensor's name in the model's signature ("onset", "input_ids"): what inputs and outputs are
    #: matched by; TFLite orders a signature's tensors its own way, so positions are not to be trusted
    key: str = ""

    @property
    def io_name(self) -> str:
        """The signature name, else (a model without signature) the tensor's own name."""
        return self.key or self.name

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
    signature: Optional[str] = None

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

    @property
    def dynamic_batch(self) -> bool:
        """Every input's batch dimension is dynamic (``shape_signature`` -1, ``shape`` 1) and its
        other dimensions static: runtimes allocate batch 1 and can resize it to run N samples in
        one ``invoke`` (what ``edgesdk convert`` keeps for cpu/gpu bundles of a batch-less source)."""
        return bool(self.inputs) and all(
            len(t.shape_signature) >= 1 and t.shape_signature[0] < 0 and t.shape[:1] == [1]
            and all(d > 0 for d in t.shape_signature[1:]) for t in self.inputs)


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.14.0' -> (2, 14, 0); anything unparsable sorts first."""
    parts = []
    for piece in str(version).split("."):
        m = re.match(r"\d+", piece)
        parts.append(int(m.group()) if m else 0)
    return tuple(parts)


def match_names(wanted: Sequence[str], tensors: Sequence[TensorInfo], what: str = "output") -> list[int]:
    """For each name in ``wanted``, the index of the tensor of that name (signature name first, then
    tensor name). A name that matches nothing is an error naming both sides, never a silent
    fallback to positions."""
    by_name: dict[str, int] = {}
    for i, t in enumerate(tensors):
        by_name.setdefault(t.name, i)
    for i, t in enumerate(tensors):
        if t.key:
            by_name[t.key] = i
    missing = [n for n in wanted if n not in by_name]
    if missing:
        have = ", ".join(t.io_name for t in tensors)
        raise ModelLoadError(f"the model has no {what}(s) named {', '.join(missing)} (its {what}s are {have})")
    return [by_name[n] for n in wanted]


def _signature_keys(m: Any) -> tuple[Optional[str], dict[int, str], dict[int, str]]:
    """The first signature of subgraph 0: its name and tensor index -> signature name, for inputs
    and outputs."""
    for sd in m.signatureDefs or []:
        if int(sd.subgraphIndex or 0) != 0:
            continue
        def keys(items: Any) -> dict[int, str]:
            return {int(t.tensorIndex): (t.name.decode() if isinstance(t.name, bytes) else str(t.name)) for t in items or []}
        name = sd.signatureKey.decode() if isinstance(sd.signatureKey, bytes) else str(sd.signatureKey)
        return name, keys(sd.inputs), keys(sd.outputs)
    return None, {}, {}


def _enum_names(enum_cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def read_model_info(model: bytes) -> ModelInfo:
    """Parse a ``.tflite`` flatbuffer; raise ModelLoadError when it is not one."""
    schema = require("ai_edge_litert.schema_py_generated", ("converter", "agent"), "to read .tflite files")
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
    signature, in_keys, out_keys = _signature_keys(m)

    def keyed(i: int, keys: dict[int, str]) -> TensorInfo:
        t = tensor(i)
        t.key = keys.get(int(i), "")
        return t

    return ModelInfo(
        inputs=[keyed(i, in_keys) for i in sub.inputs],
        outputs=[keyed(i, out_keys) for i in sub.outputs],
        nodes=nodes,
        min_runtime_version=min_rt,
        size=len(model),
        signature=signature,
    )
