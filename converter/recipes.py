"""Quantization recipes and the TFLite conversion itself.

=========  ==========================================================================
recipe     what TFLiteConverter is told
=========  ==========================================================================
none       float32, builtin ops only
dynamic    ``optimizations=[DEFAULT]``: int8 weights, float activations
float16    plus ``supported_types=[float16]``: float16 weights (the GPU's native type)
int8       plus a representative dataset and ``TFLITE_BUILTINS_INT8``: full integer, with
           int8 / uint8 (Edge TPU) / float32 model inputs and outputs (``io_dtype``)
int16x8    16-bit activations, 8-bit weights (``EXPERIMENTAL_..._INT16_WEIGHTS_INT8``)
=========  ==========================================================================

Conversion is restricted to TFLite builtin ops: a model that needs Select-TF (Flex) or custom
ops fails here with :class:`~sdk.errors.UnsupportedOpError` naming them, because no device
runtime edgesdk supports can run them. TensorFlow's ``ConverterError`` is translated here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from sdk.errors import ConfigError, ConversionError, QuantizationError, UnsupportedOpError
from sdk.modelinfo import read_model_info
from sdk.native import native_stderr_to_log

from sdk.dataset import Dataset
from .source import tensorflow

log = logging.getLogger("edgesdk.converter")

RECIPES = ("none", "dynamic", "float16", "int8", "int16x8")
IO_DTYPES = ("int8", "uint8", "float32")

__all__ = ["RECIPES", "IO_DTYPES", "Recipe", "convert_saved_model", "check_calibratable", "CALIBRATION_CRASHERS", "candidate_recipes", "default_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    io_dtype: str = "float32"

    @property
    def label(self) -> str:
        if self.name == "int8":
            return f"int8 ({self.io_dtype} I/O)"
        return "float32" if self.name == "none" else self.name

    @property
    def needs_calibration(self) -> bool:
        return self.name in ("int8", "int16x8")

    def to_dict(self) -> dict[str, str]:
        return {"recipe": self.name, "io_dtype": self.io_dtype}


def default_recipe(target: str, has_calibration: bool, io_dtype: Optional[str]) -> Recipe:
    """The documented per-target default: gpu → float16, edgetpu → int8 (uint8 I/O),
    cpu → int8 when calibration data is given, otherwise dynamic."""
    if target == "gpu":
        return Recipe("float16")
    if target == "edgetpu":
        return Recipe("int8", io_dtype or "uint8")
    return Recipe("int8", io_dtype or "int8") if has_calibration else Recipe("dynamic")


def candidate_recipes(target: str, has_calibration: bool, io_dtype: Optional[str]) -> list[Recipe]:
    """What ``--quantize auto`` tries for a target (integer recipes only with calibration data)."""
    if target == "edgetpu":
        return [Recipe("int8", io_dtype or "uint8")]
    if target == "gpu":
        return [Recipe("none"), Recipe("float16")]
    recipes = [Recipe("none"), Recipe("dynamic"), Recipe("float16")]
    if has_calibration:
        recipes += [Recipe("int8", io_dtype or "int8"), Recipe("int16x8")]
    return recipes


_OPS_LINE = re.compile(r"^(Flex|Custom|Select TF) ops?: (.+)$", re.MULTILINE)


def _unsupported_ops(message: str) -> list[str]:
    ops: list[str] = []
    for m in _OPS_LINE.finditer(message):
        ops += [o.strip() for o in m.group(2).split(",") if o.strip()]
    ops += re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", message)
    return sorted(set(ops))


#: op combinations of a float model that crash TensorFlow's calibrator (SIGSEGV: the whole process)
#: in the int8 and int16x8 recipes (TF 2.21): a Keras 3 LSTM, lowered to a WHILE loop over resource
#: variables (found on the corpus: SentiToolKit), and TFLite's fused LSTM ops
CALIBRATION_CRASHERS = (frozenset({"WHILE", "VAR_HANDLE"}), frozenset({"UNIDIRECTIONAL_SEQUENCE_LSTM"}),
                        frozenset({"BIDIRECTIONAL_SEQUENCE_LSTM"}))


def check_calibratable(recipe: Recipe, float_model: Optional[bytes]) -> None:
    """Refuse a calibrated recipe for a model whose float32 conversion has ops known to crash the
    calibrator, with the reason, before TensorFlow takes the process down."""
    if not recipe.needs_calibration or not float_model:
        return
    ops = {n.op for n in read_model_info(float_model).nodes}
    bad = next((sorted(combo) for combo in CALIBRATION_CRASHERS if combo <= ops), None)
    if bad:
        raise QuantizationError(f"{recipe.label} is not tried: TensorFlow's calibrator crashes on {' + '.join(bad)} "
                                "(a recurrent layer); use dynamic or float16")


def convert_saved_model(saved_model_dir: Path, recipe: Recipe, calibration: Optional[Dataset]) -> bytes:
    """Convert a SavedModel with ``recipe``; builtin ops only."""
    tf = tensorflow()
    if recipe.name not in RECIPES:
        raise ConfigError(f"unknown quantization {recipe.name!r}: choose one of {', '.join(RECIPES)}")
    if recipe.needs_calibration and calibration is None:
        raise QuantizationError(
            f"{recipe.label} quantization needs calibration data: pass --calibration DATA "
            "(a few hundred real samples, .npz/.npy or an image folder)"
        )
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if recipe.name != "none":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if recipe.name == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if recipe.needs_calibration:
        data = calibration

        def representative():
            # by input name, in each input's own dtype (token ids stay integers, masks booleans)
            for i in range(len(data)):
                sample = data.sample(i)
                sample = [x.astype(np.float32) if x.dtype.kind == "f" else x for x in sample]
                yield dict(zip(data.names, sample)) if data.names else sample

        conv.representative_dataset = representative
    if recipe.name == "int8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if recipe.io_dtype not in IO_DTYPES:
            raise ConfigError(f"unknown --io-dtype {recipe.io_dtype!r}: choose one of {', '.join(IO_DTYPES)}")
        if recipe.io_dtype != "float32":
            conv.inference_input_type = getattr(tf, recipe.io_dtype)
            conv.inference_output_type = getattr(tf, recipe.io_dtype)
    if recipe.name == "int16x8":
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    try:
        with native_stderr_to_log(log):
            model = conv.convert()
    except Exception as exc:  # tf.lite ConverterError, and RuntimeError/ValueError from calibration
        message = str(exc)
        ops = _unsupported_ops(message)
        if ops:
            raise UnsupportedOpError(
                f"the model needs ops that TFLite builtins do not have ({', '.join(ops)}); device runtimes "
                "cannot run Select-TF/custom ops: replace those layers with builtin-supported ones",
                ops=ops,
            ) from exc
        first = next((ln.strip() for ln in message.splitlines() if "error" in ln.lower()), message.strip()[:300])
        cls = QuantizationError if recipe.name != "none" else ConversionError
        raise cls(f"{recipe.label} conversion failed: {first}") from exc
    info = read_model_info(model)
    if info.custom_ops:
        raise UnsupportedOpError(
            f"the converted model contains custom ops ({', '.join(info.custom_ops)}) device runtimes cannot run",
            ops=info.custom_ops,
        )
    return model
