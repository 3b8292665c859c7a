"""Every input format: .keras, legacy Keras 2 .h5, SavedModel, .tflite; and bad inputs."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from converter import convert
from sdk.bundle import Bundle
from sdk.errors import ConfigError, ModelLoadError, ModelNotFoundError


def test_legacy_keras2_h5_loads_and_converts(tmp_path, digits) -> None:
    h5 = tmp_path / "legacy.h5"
    script = textwrap.dedent(f"""
        import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np, tf_keras
        tf_keras.utils.set_random_seed(0)
        m = tf_keras.Sequential([tf_keras.layers.InputLayer(input_shape=(8, 8, 1)),
                                 tf_keras.layers.Conv2D(8, 3, activation="relu"),
                                 tf_keras.layers.Flatten(), tf_keras.layers.Dense(10, activation="softmax")])
        m.save({str(h5)!r})
        import h5py; print(h5py.File({str(h5)!r}).attrs["keras_version"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("2.")  # really a Keras 2 file
    np.savez(tmp_path / "e.npz", x=digits.x_test[:50])
    res = convert(h5, quantize="none", eval_data=tmp_path / "e.npz", output=tmp_path / "h.edgebundle", runs=5)
    assert res.report["source"]["kind"] == "keras"
    assert res.report["accuracy"]["top1_agreement"] == 1.0


def test_saved_model_directory_converts(digits_model, tmp_path) -> None:
    from converter.source import load_source

    sm = tmp_path / "sm"
    load_source(digits_model.path).keras_model.export(str(sm), verbose=False)  # dynamic batch dimension
    res = convert(sm, quantize="int8", calibration=digits_model.calibration, eval_data=digits_model.eval,
                  output=tmp_path / "s.edgebundle", runs=5)
    assert res.report["source"]["kind"] == "saved_model"
    assert res.report["accuracy"]["drop_pts"] <= 1.0
    assert Bundle.open(res.bundle_path).manifest.inputs[0]["dtype"] == "int8"


def test_existing_tflite_is_measured_and_bundled_as_is(digits_bundle, digits_model, tmp_path, signing_keys) -> None:
    path = tmp_path / "given.tflite"
    path.write_bytes(digits_bundle.model)
    res = convert(path, eval_data=digits_model.eval, key=signing_keys.private, output=tmp_path / "t.edgebundle", runs=5)
    assert Bundle.open(res.bundle_path).read("model.tflite") == digits_bundle.model
    (row,) = res.report["candidates"]
    assert row["label"].startswith("as-is") and row["chosen"] and row["latency"]["p50_ms"] > 0
    assert res.report["accuracy"]["accuracy"] == pytest.approx(digits_bundle.report["accuracy"]["accuracy"])
    with pytest.raises(ConfigError, match="bundled as is"):
        convert(path, quantize="int8", output=tmp_path / "x.edgebundle")


def test_bad_model_paths_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model at"):
        convert(tmp_path / "nope.keras")
    (tmp_path / "corrupt.keras").write_bytes(b"definitely not a zip")
    with pytest.raises(ModelLoadError, match="cannot load Keras model"):
        convert(tmp_path / "corrupt.keras")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelLoadError, match="without saved_model.pb"):
        convert(tmp_path / "empty_dir")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported model file"):
        convert(tmp_path / "model.onnx")
    (tmp_path / "bad.tflite").write_bytes(b"\x00" * 32)
    with pytest.raises(ModelLoadError, match="not a TFLite flatbuffer"):
        convert(tmp_path / "bad.tflite")
