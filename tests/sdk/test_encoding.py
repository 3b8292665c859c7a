"""sdk.encoding: the uint8 normalisation a manifest records (parsed, validated, applied) and how a
job's inputs are encoded for the wire."""

import numpy as np
import pytest

from sdk.bundle import BUNDLE_SCHEMA, Manifest
from sdk.encoding import Normalization, encode_job_inputs, manifest_normalizations
from sdk.errors import BundleInvalidError, ConfigError
from sdk.modelinfo import TensorInfo
from sdk.runtime import quantize


def _manifest(inputs: list) -> dict:
    return {"schema": BUNDLE_SCHEMA, "name": "m", "version": "1", "created_at": "x", "target": "cpu",
            "model_file": "model.tflite", "inputs": inputs, "outputs": [], "files": {}}


FLOAT_IN = {"name": "x:0", "key": "x", "dtype": "float32", "shape": [1, 4], "scale": 0.0, "zero_point": 0}
INT8_IN = {"name": "q:0", "key": "q", "dtype": "int8", "shape": [1, 4], "scale": 0.5, "zero_point": -3}


def test_normalizations_parse_and_apply_in_float32() -> None:
    n = Normalization.parse("2/255,-1")
    assert n == Normalization(2 / 255, -1.0) and n.value_range == (-1.0, 1.0)
    y = n.apply(np.array([0, 255], np.uint8))
    assert y.dtype == np.float32 and np.allclose(y, [-1.0, 1.0])
    for bad in ("1", "a,b", "1,inf", "0,1", "1e9,0"):
        with pytest.raises(ConfigError):
            Normalization.parse(bad)


@pytest.mark.parametrize(("norm", "why"), [
    ({"scale": "1"}, "must be"), ({"scale": float("nan"), "offset": 0}, "finite"), ([1, 0], "must be"),
    ({"scale": 0, "offset": 0}, "must not be 0"),
])
def test_a_manifest_with_a_malformed_normalization_is_refused(norm: object, why: str) -> None:
    with pytest.raises(BundleInvalidError, match=why):
        Manifest(_manifest([{**FLOAT_IN, "normalization": norm}]))


def test_a_normalization_on_an_input_it_cannot_apply_to_is_refused() -> None:
    ids = {"name": "ids:0", "dtype": "int32", "shape": [1, 4], "normalization": {"scale": 1.0, "offset": 0.0}}
    with pytest.raises(BundleInvalidError, match="cannot apply"):
        Manifest(_manifest([ids]))
    m = Manifest(_manifest([{**INT8_IN, "normalization": {"scale": 1 / 255, "offset": 0.0}}, FLOAT_IN]))
    tensors = [TensorInfo("x:0", [1, 4], [1, 4], "float32", key="x"), TensorInfo("q:0", [1, 4], [1, 4], "int8", 0.5, -3)]
    assert manifest_normalizations(m.data, tensors) == [None, Normalization(1 / 255, 0.0)]  # by name, not position


def test_job_inputs_are_quantised_with_the_agents_function_and_pixels_stay_uint8() -> None:
    m = _manifest([INT8_IN, {**FLOAT_IN, "normalization": {"scale": 1 / 255, "offset": 0.0}}])
    floats = np.linspace(-60, 60, 8, dtype=np.float32).reshape(2, 4)
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 4)
    arrays, quant, how = encode_job_inputs([floats, pixels], m)
    spec = TensorInfo("q:0", [1, 4], [1, 4], "int8", 0.5, -3)
    np.testing.assert_array_equal(arrays[0], quantize(floats, spec))
    assert arrays[1] is pixels and quant == [[0.5, -3], None]
    assert how == ["quantized-by-fleet", "uint8-normalized-on-device"]
    assert encode_job_inputs([floats], None)[2] == ["as-given"]
