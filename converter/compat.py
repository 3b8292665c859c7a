"""Op-by-op placement analysis for the GPU delegate and the Edge TPU, from edgesdk's own rules.

TensorFlow 2.21's ``Analyzer(gpu_compatibility=True)`` calls every model GPU-compatible (even
ones with Flex ops), so it cannot be trusted; and the Edge TPU compiler is only available on
some machines. These rules follow the published requirements:

Edge TPU (coral.ai "TensorFlow models on the Edge TPU"):
  * every tensor 8-bit quantized (int32 bias and shape operands allowed), static shapes;
  * tensors of at most 3 dimensions, or only the 3 innermost larger than 1;
  * the op in the supported list below;
  * the compiler maps ops only up to the first unsupported one: that op and everything after
    it run on the CPU.

GPU delegate (TFLite GPU delegate op list):
  * float32/float16 tensors, or 8-bit quantized ones (the delegate dequantizes them);
  * static shapes, rank at most 4;
  * the op in the supported list below; unsupported ops are partitioned onto the CPU one by
    one (the delegate can run several GPU partitions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sdk.modelinfo import ModelInfo, NodeInfo, TensorInfo

__all__ = ["EDGETPU_OPS", "GPU_OPS", "analyze_edgetpu", "analyze_gpu", "analyze_cpu"]

EDGETPU_OPS = frozenset(
    """ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEQUANTIZE EXPAND_DIMS FULLY_CONNECTED
    HARD_SWISH L2_NORMALIZATION LOGISTIC MAXIMUM MAX_POOL_2D MEAN MINIMUM MUL PACK PAD PRELU QUANTIZE
    REDUCE_MAX REDUCE_MIN RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT
    SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM TANH TRANSPOSE
    TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM""".split()
)

GPU_OPS = frozenset(
    """ABS ADD AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D COS DEPTHWISE_CONV_2D DEPTH_TO_SPACE
    DEQUANTIZE DIV ELU EQUAL EXP FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GREATER GREATER_EQUAL HARD_SWISH
    LEAKY_RELU LESS LESS_EQUAL LOG LOGISTIC MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK
    PAD POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR
    RESIZE_NEAREST_NEIGHBOR RSQRT SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE
    SQUEEZE STRIDED_SLICE SUB SUM TANH TILE TRANSPOSE TRANSPOSE_CONV""".split()
)

_INT_ACT = ("int8", "uint8")
_AUX_INT = ("int32", "int64")  # biases, shapes, axes


@dataclass
class Placement:
    index: int
    op: str
    version: int
    placement: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summary(placements: list[Placement], accel: str, problems: list[str]) -> dict[str, Any]:
    on = sum(1 for p in placements if p.placement == accel)
    return {
        "accelerator": accel,
        f"ops_on_{accel}": on,
        **({} if accel == "cpu" else {"ops_on_cpu": len(placements) - on}),
        "fully_mapped": on == len(placements) and not problems,
        "model_problems": problems,
        "nodes": [p.to_dict() for p in placements],
    }


def _short(t: TensorInfo) -> str:
    """A tensor's name without its long fused-op prefix (keeps reasons and manifests small)."""
    return t.name.split(";")[0][-48:]


def _static(t: TensorInfo, batch_ok: bool = False) -> bool:
    """Every dimension known; with ``batch_ok`` (a model with a dynamic batch, which the runtime
    allocates at batch 1 before a delegate sees it) the leading one may be -1."""
    return all(d > 0 for d in (t.shape_signature[1:] if batch_ok else t.shape_signature))


def _edgetpu_node_problem(n: NodeInfo) -> str:
    if n.custom:
        return f"custom op {n.op} is not supported"
    if n.op not in EDGETPU_OPS:
        return f"{n.op} is not an Edge TPU op"
    for t in n.outputs:
        if t.dtype not in _INT_ACT:
            return f"output {_short(t)} is {t.dtype}, not 8-bit quantized"
    for t in n.inputs:
        if t.dtype not in _INT_ACT + _AUX_INT:
            if n.op == "QUANTIZE" and n.index == 0:
                continue  # the input QUANTIZE of a float-I/O model is handled by the compiler
            return f"input {_short(t)} is {t.dtype}, not 8-bit quantized"
    for t in n.inputs + n.outputs:
        if not _static(t):
            return f"tensor {_short(t)} has a dynamic shape {t.shape_signature}"
        if not t.constant and len(t.shape) > 3 and sum(1 for d in t.shape[:-3] if d > 1):
            return f"tensor {_short(t)} has shape {t.shape}: more than 3 dimensions larger than 1"
    return ""


def analyze_edgetpu(info: ModelInfo) -> dict[str, Any]:
    """Which ops the Edge TPU compiler would map, and why the rest stay on the CPU."""
    problems = []
    if not info.static_shapes:
        problems.append("model inputs/outputs have dynamic shapes; the Edge TPU needs static shapes")
    if any(t.dtype not in _INT_ACT for t in info.inputs + info.outputs):
        problems.append("model I/O is not 8-bit: use --quantize int8 (--io-dtype uint8 or int8)")
    placements, cut = [], None
    for n in info.nodes:
        if cut is None:
            problem = _edgetpu_node_problem(n)
            if problem:
                cut = n.index
                placements.append(Placement(n.index, n.op, n.version, "cpu", problem))
                continue
            placements.append(Placement(n.index, n.op, n.version, "edgetpu"))
        else:
            placements.append(
                Placement(n.index, n.op, n.version, "cpu", f"after the first unmapped op (#{cut}); the compiler stops there")
            )
    return _summary(placements, "edgetpu", problems)


def _gpu_node_problem(n: NodeInfo, batch_ok: bool = False) -> str:
    if n.custom:
        return f"custom op {n.op} is not supported"
    if n.op not in GPU_OPS:
        return f"{n.op} is not a GPU delegate op"
    for t in n.inputs + n.outputs:
        if t.dtype not in ("float32", "float16") + _INT_ACT + _AUX_INT:
            return f"tensor {_short(t)} is {t.dtype}"
        if not _static(t, batch_ok):
            return f"tensor {_short(t)} has a dynamic shape {t.shape_signature}"
        if len(t.shape) > 4:
            return f"tensor {_short(t)} has rank {len(t.shape)} (the GPU delegate supports up to 4)"
    return ""


def analyze_gpu(info: ModelInfo) -> dict[str, Any]:
    """Which ops the GPU delegate would take; unsupported ones fall back to the CPU one by one. A
    dynamic batch alone is not a dynamic shape here: the engine allocates batch 1 first."""
    batch_ok = info.dynamic_batch
    static = all(_static(t, batch_ok) for t in info.inputs + info.outputs)
    problems = [] if static else ["dynamic input/output shapes: the GPU delegate needs static shapes"]
    placements = []
    for n in info.nodes:
        problem = _gpu_node_problem(n, batch_ok)
        placements.append(Placement(n.index, n.op, n.version, "cpu" if problem else "gpu", problem))
    return _summary(placements, "gpu", problems)


def analyze_cpu(info: ModelInfo) -> dict[str, Any]:
    """Every builtin op runs on the CPU (XNNPACK takes the ones it supports)."""
    placements = [Placement(n.index, n.op, n.version, "cpu") for n in info.nodes]
    return _summary(placements, "cpu", [])
