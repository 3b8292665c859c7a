"""Runtime and delegate loading on the real LiteRT interpreter (no GPU or Edge TPU here)."""

import ctypes.util
import logging

import numpy as np
import pytest

from sdk.errors import DelegateUnavailableError, ModelLoadError, UnsupportedOpError
from sdk.modelinfo import read_model_info
from sdk.runtime import DelegateOptions, InterpreterEngine, find_runtime, open_engine


def test_prefers_litert_and_reports_versions() -> None:
    rt = find_runtime()
    assert rt.name == "ai_edge_litert"
    assert rt.version and rt.supports("1.14.0") and not rt.supports("99.0")


def test_tensorflow_lite_is_the_workstation_fallback(digits_bundle) -> None:
    rt = find_runtime(prefer="tensorflow")
    engine = open_engine(digits_bundle.model, "cpu", runtime=rt)
    assert engine.runtime.name == "tensorflow" and engine.delegate == "cpu"
    x = np.zeros((1, 8, 8, 1), np.float32)
    ref = open_engine(digits_bundle.model, "cpu").run_float([x])[0]
    assert np.allclose(engine.run_float([x])[0], ref, atol=1e-2)


def test_cpu_engine_runs_quantized_model_with_float_io(digits_bundle, digits) -> None:
    engine = open_engine(digits_bundle.model, "cpu", DelegateOptions(num_threads=2))
    assert engine.delegate == "cpu" and engine.fallbacks == []
    assert engine.inputs[0].dtype == "int8" and engine.inputs[0].quantized
    correct = 0
    for x, y in zip(digits.x_test[:100], digits.y_test[:100]):
        (probs,) = engine.run_float([x[None]])
        assert probs.dtype == np.float32 and abs(float(probs.sum()) - 1.0) < 0.05
        correct += int(np.argmax(probs) == y)
    assert correct >= 90


def test_explicit_edgetpu_without_library_is_a_clear_error(digits_bundle) -> None:
    with pytest.raises(DelegateUnavailableError, match="libedgetpu.so.1.*Coral"):
        open_engine(digits_bundle.model, "edgetpu")


def test_explicit_gpu_without_gpu_is_a_clear_error(digits_bundle) -> None:
    with pytest.raises(DelegateUnavailableError, match="no usable GPU"):
        open_engine(digits_bundle.model, "gpu")


def test_gpu_delegate_path_missing_or_not_a_delegate(digits_bundle, tmp_path) -> None:
    with pytest.raises(DelegateUnavailableError, match="cannot be loaded"):
        open_engine(digits_bundle.model, "gpu", DelegateOptions(gpu_delegate_path=str(tmp_path / "libgpu.so")))
    libz = ctypes.util.find_library("z")
    assert libz, "zlib is part of every Debian system"
    with pytest.raises(DelegateUnavailableError, match="not a TFLite external delegate"):
        open_engine(digits_bundle.model, "gpu", DelegateOptions(gpu_delegate_path=libz))
    with pytest.raises(DelegateUnavailableError, match="not a TFLite external delegate"):
        open_engine(digits_bundle.model, "edgetpu", DelegateOptions(edgetpu_library=libz))


def test_auto_falls_back_to_cpu_logs_why_and_says_what_runs(digits_bundle, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="edgesdk.runtime"):
        engine = open_engine(digits_bundle.model, "auto")
    assert engine.delegate == "cpu"
    assert [f.split(":")[0] for f in engine.fallbacks] == ["edgetpu", "gpu"]
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 2
    assert engine.describe()["delegate"] == "cpu"


def test_unknown_delegate_and_corrupt_model() -> None:
    with pytest.raises(DelegateUnavailableError, match="unknown delegate"):
        open_engine(b"", "npu")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        open_engine(b"\x00" * 64, "cpu")


def test_custom_op_model_is_rejected_naming_the_op(custom_op_tflite) -> None:
    assert read_model_info(custom_op_tflite).custom_ops == ["Svd"]
    with pytest.raises(UnsupportedOpError, match="Svd") as exc:
        open_engine(custom_op_tflite, "cpu")
    assert exc.value.ops == ["Svd"]


class RecordingInterpreter:
    """A stand-in interpreter (the seam pycoral-style adapters take) with a dynamic batch."""

    def __init__(self) -> None:
        self.resized, self.allocated, self.tensors = [], 0, {}

    def get_input_details(self):
        shape = [1 if self.resized else 0, 3]
        return [{"name": "x", "index": 0, "shape": np.array(shape), "shape_signature": np.array([-1, 3]),
                 "dtype": np.float32, "quantization": (0.0, 0)}]

    def get_output_details(self):
        return [{"name": "y", "index": 1, "shape": np.array([1, 3]), "dtype": np.float32, "quantization": (0.0, 0)}]

    def resize_tensor_input(self, index, shape):
        self.resized.append((index, list(shape)))

    def allocate_tensors(self):
        self.allocated += 1

    def set_tensor(self, index, value):
        self.tensors[index] = value

    def invoke(self):
        self.tensors[1] = self.tensors[0] * 2

    def get_tensor(self, index):
        return self.tensors[index]


def test_interpreter_engine_uses_the_interpreter_it_is_given() -> None:
    interp = RecordingInterpreter()
    engine = InterpreterEngine(interp, find_runtime(), "cpu")
    assert interp.resized == [(0, [1, 3])] and interp.allocated == 1
    out = engine.run([np.ones((1, 3), np.float32)])
    assert np.array_equal(out[0], np.full((1, 3), 2, np.float32))
