"""Every quantization mode, converted for real and run on LiteRT, on the digits CNN."""

import numpy as np
import pytest

from converter import convert
from sdk.bundle import Bundle
from sdk.modelinfo import read_model_info

MODES = [
    # quantize, io_dtype, expected input dtype
    ("none", None, "float32"),
    ("dynamic", None, "float32"),
    ("float16", None, "float32"),
    ("int8", None, "int8"),
    ("int8", "uint8", "uint8"),
    ("int8", "float32", "float32"),
    ("int16x8", None, "float32"),
]


@pytest.mark.parametrize("quantize,io_dtype,in_dtype", MODES)
def test_every_mode_converts_runs_and_keeps_accuracy(digits_model, tmp_path, quantize, io_dtype, in_dtype) -> None:
    res = convert(
        digits_model.path, quantize=quantize, io_dtype=io_dtype, calibration=digits_model.calibration,
        eval_data=digits_model.eval, output=tmp_path / "m.edgebundle", runs=10, max_accuracy_drop=1.0,
    )
    info = read_model_info(res.model)
    assert info.inputs[0].dtype == in_dtype and info.outputs[0].dtype == in_dtype
    chosen = [c for c in res.report["candidates"] if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["recipe"] == quantize
    assert res.report["accuracy"]["drop_pts"] <= 1.0
    assert res.report["accuracy"]["reference_accuracy"] == pytest.approx(digits_model.float_accuracy, abs=1e-6)
    weight_types = {t.dtype for n in info.nodes for t in n.inputs if t.constant}
    if quantize == "float16":
        assert "float16" in weight_types
    if quantize in ("dynamic", "int8", "int16x8"):
        assert "int8" in weight_types
    size = res.report["size"]
    if quantize == "none":
        assert size["compression_ratio"] == 1.0
    else:
        assert size["converted_bytes"] < size["float32_bytes"]
    assert Bundle.open(res.bundle_path).manifest.quantization["recipe"] == quantize


def test_target_defaults(digits_model, tmp_path) -> None:
    gpu = convert(digits_model.path, target="gpu", output=tmp_path / "g.edgebundle", runs=5)
    assert gpu.manifest.quantization["recipe"] == "float16"
    cpu_nocal = convert(digits_model.path, target="cpu", output=tmp_path / "c.edgebundle", runs=5)
    assert cpu_nocal.manifest.quantization["recipe"] == "dynamic"
    etpu = convert(digits_model.path, target="edgetpu", calibration=digits_model.calibration,
                   output=tmp_path / "e.edgebundle", runs=5)
    assert etpu.manifest.quantization == {**etpu.manifest.quantization, "recipe": "int8", "io_dtype": "uint8"}
    assert etpu.report["ops"]["edgetpu"]["fully_mapped"]


def test_integer_recipes_need_calibration(digits_model, tmp_path) -> None:
    from sdk.errors import QuantizationError

    with pytest.raises(QuantizationError, match="needs calibration data"):
        convert(digits_model.path, quantize="int8", output=tmp_path / "m.edgebundle", runs=5)


def test_reported_accuracy_is_what_the_bundle_really_does(digits_bundle, digits) -> None:
    """Recompute the int8 bundle's test accuracy independently and compare with the report."""
    from sdk.runtime import open_engine

    engine = open_engine(Bundle.open(digits_bundle.path).model_bytes(), "cpu")
    preds = [int(np.argmax(engine.run_float([x[None]])[0])) for x in digits.x_test]
    accuracy = float(np.mean(np.array(preds) == digits.y_test))
    assert digits_bundle.report["accuracy"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
