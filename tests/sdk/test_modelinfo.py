import pytest

from sdk.errors import ModelLoadError
from sdk.modelinfo import read_model_info, version_tuple


def test_reads_ops_versions_tensors_and_min_runtime(digits_bundle) -> None:
    info = read_model_info(digits_bundle.model)
    assert [n.op for n in info.nodes][:2] == ["CONV_2D", "MAX_POOL_2D"]
    assert info.nodes[-1].op == "SOFTMAX"
    assert sum(o["count"] for o in info.ops) == len(info.nodes)
    assert info.inputs[0].dtype == "int8" and info.inputs[0].shape == [1, 8, 8, 1] and (info.static_shapes or info.dynamic_batch)
    conv = info.nodes[0]
    assert any(t.constant for t in conv.inputs) and not conv.outputs[0].constant
    assert version_tuple(info.min_runtime_version) >= (1, 0)
    assert info.custom_ops == []


def test_not_a_tflite_file_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="not a TFLite flatbuffer"):
        read_model_info(b"PK\x03\x04 a zip, not a model")


def test_version_tuple_orders_versions() -> None:
    assert version_tuple("2.14.0") < version_tuple("2.21.0") < version_tuple("2.21.1")
    assert version_tuple("1.14.0rc1") == (1, 14, 0)
