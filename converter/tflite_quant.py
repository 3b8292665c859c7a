"""Quantize an existing float ``.tflite`` with ai-edge-quantizer (no TensorFlow converter needed).

Used for sources that are not TensorFlow graphs (PyTorch, converted to float TFLite by
litert-torch first). Recipes map to ai-edge-quantizer as follows:

=========  ===============================================================================
none       the float model as is
dynamic    ``dynamic_wi8_afp32``: int8 weights, float activations
float16    weight-only ``FLOAT_CASTING`` to 16 bits: float16 weights
int8       ``static_wi8_ai8`` calibrated on real samples: int8 weights and activations and
           int8 model inputs/outputs (the only integer I/O ai-edge-quantizer produces)
int16x8    ``static_wi8_ai16`` calibrated: int16 activations, int8 weights
=========  ===============================================================================

ai-edge-quantizer's errors are translated here into :class:`~sdk.errors.QuantizationError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Optional

import numpy as np

from sdk.dataset import Dataset
from sdk.deps import require
from sdk.errors import QuantizationError
from sdk.native import native_stderr_to_log

from .recipes import Recipe

log = logging.getLogger("edgesdk.converter")

__all__ = ["quantize_tflite"]


def _aeq_recipe(recipe: Recipe) -> Any:
    aeq_recipe = require("ai_edge_quantizer.recipe", "torch", "to quantize a float .tflite")
    if recipe.name == "dynamic":
        return aeq_recipe.dynamic_wi8_afp32()
    if recipe.name == "int8":
        return aeq_recipe.static_wi8_ai8()
    if recipe.name == "int16x8":
        return aeq_recipe.static_wi8_ai16()
    if recipe.name == "float16":
        from ai_edge_quantizer import algorithm_manager, recipe_manager
        from ai_edge_quantizer.qtyping import TFLOperationName

        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                       algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
        return manager.get_quantization_recipe()
    raise QuantizationError(f"no ai-edge-quantizer recipe for {recipe.label}")


def _calibration_samples(float_model: bytes, data: Dataset) -> dict[str, list[dict[str, np.ndarray]]]:
    """The calibration data as ai-edge-quantizer takes it: per signature, one {input name: array}
    per sample, inputs matched by name (a signature's input names are the data's names)."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=float_model).get_signature_list()
    key = next(iter(signatures))
    names = list(signatures[key]["inputs"])
    by_name = dict(zip(data.names, range(len(data.xs)))) if data.names else {}
    order = [by_name.get(n, i) for i, n in enumerate(names)]
    samples = []
    for i in range(len(data)):
        sample = data.sample(i)
        samples.append({n: np.asarray(sample[j], dtype=np.float32) if sample[j].dtype.kind == "f" else sample[j]
                        for n, j in zip(names, order)})
    return {key: samples}


def quantize_tflite(float_model: bytes, recipe: Recipe, calibration: Optional[Dataset]) -> bytes:
    """``float_model`` quantized with ``recipe`` (``none``: returned unchanged)."""
    if recipe.name == "none":
        return float_model
    if recipe.needs_calibration and calibration is None:
        raise QuantizationError(f"{recipe.label} quantization needs calibration data: pass --calibration DATA "
                                "(a few hundred real samples, .npz/.npy)")
    if recipe.name == "int8" and recipe.io_dtype not in ("int8", "uint8"):
        raise QuantizationError(f"int8 with {recipe.io_dtype} I/O is not available for this source: ai-edge-quantizer "
                                "gives int8 inputs and outputs; use --io-dtype int8 or uint8")
    quantizer = require("ai_edge_quantizer.quantizer", "torch", "to quantize a float .tflite")
    try:
        with native_stderr_to_log(log), contextlib.redirect_stdout(io.StringIO()):  # keep --json's stdout clean
            q = quantizer.Quantizer(bytes(float_model), _aeq_recipe(recipe))
            qsv = q.calibrate(_calibration_samples(float_model, calibration), num_threads=1) if q.need_calibration else None
            result = q.quantize(qsv, enable_progress_report=False)
    except QuantizationError:
        raise
    except Exception as exc:  # ai-edge-quantizer raises ValueError/RuntimeError/KeyError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(f"{recipe.label} quantization with ai-edge-quantizer failed: {first}") from exc
    model = bytes(result.quantized_model)
    return int8_io_to_uint8(model) if recipe.name == "int8" and recipe.io_dtype == "uint8" else model


def int8_io_to_uint8(model: bytes) -> bytes:
    """``model`` (int8 inputs and outputs, as ai-edge-quantizer makes them) with uint8 inputs and
    outputs instead: each input gets a uint8 twin (same scale, zero point + 128) and a QUANTIZE
    op into the int8 tensor, each output a QUANTIZE op into a uint8 twin; the signature points at
    the twins. This is what TensorFlow's converter does for ``inference_input_type=tf.uint8``
    (the Edge TPU and many camera pipelines want uint8)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(model), 0))
    quantize_op = next((i for i, c in enumerate(m.operatorCodes)
                        if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.QUANTIZE), None)
    if quantize_op is None:
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
        code.version = 2
        m.operatorCodes.append(code)
        quantize_op = len(m.operatorCodes) - 1
    graph = m.subgraphs[0]

    def uint8_twin(index: int) -> int:
        t = graph.tensors[index]
        if t.type != schema.TensorType.INT8 or t.quantization is None or t.quantization.scale is None:
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            raise QuantizationError(f"tensor {name!r} is not int8-quantized: cannot give the model uint8 I/O")
        twin = schema.TensorT()
        twin.name = (t.name.decode() if isinstance(t.name, bytes) else t.name) + "_uint8"
        twin.shape, twin.shapeSignature = t.shape, t.shapeSignature
        twin.type, twin.buffer = schema.TensorType.UINT8, 0
        twin.quantization = schema.QuantizationParametersT()
        twin.quantization.scale = [float(t.quantization.scale[0])]
        twin.quantization.zeroPoint = [int(t.quantization.zeroPoint[0]) + 128]
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    def quantize(src: int, dst: int) -> Any:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = quantize_op, [src], [dst]
        return op

    ins, outs = list(graph.inputs), list(graph.outputs)
    twins = {i: uint8_twin(i) for i in ins + outs}
    graph.operators = ([quantize(twins[i], i) for i in ins] + list(graph.operators)
                       + [quantize(o, twins[o]) for o in outs])
    graph.inputs, graph.outputs = [twins[i] for i in ins], [twins[o] for o in outs]
    for sig in m.signatureDefs or []:
        if sig.subgraphIndex == 0:
            for t in list(sig.inputs or []) + list(sig.outputs or []):
                t.tensorIndex = twins.get(t.tensorIndex, t.tensorIndex)
    builder = flatbuffers.Builder(len(model) + 4096)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
