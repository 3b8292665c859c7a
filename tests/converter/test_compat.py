"""Op placement rules for the Edge TPU and the GPU delegate, on real converted models."""

import numpy as np

from converter import compat, convert
from sdk.modelinfo import ModelInfo, NodeInfo, TensorInfo, read_model_info


def t(name, dtype="int8", shape=(1, 8, 8, 4), constant=False):
    return TensorInfo(name, list(shape), list(shape), dtype, 0.1 if dtype in ("int8", "uint8") else 0.0, 0, constant)


def test_edgetpu_maps_a_full_integer_model(digits_model, tmp_path) -> None:
    res = convert(digits_model.path, target="edgetpu", calibration=digits_model.calibration,
                  output=tmp_path / "e.edgebundle", runs=5)
    a = res.report["ops"]["edgetpu"]
    assert a["fully_mapped"] and a["ops_on_cpu"] == 0 and a["ops_on_edgetpu"] == len(a["nodes"])


def test_edgetpu_rejects_a_float_model_op_by_op(digits_model, tmp_path) -> None:
    res = convert(digits_model.path, target="cpu", quantize="none", output=tmp_path / "f.edgebundle", runs=5)
    a = res.report["ops"]["edgetpu"]
    assert not a["fully_mapped"] and a["ops_on_edgetpu"] == 0
    assert any("not 8-bit" in p for p in a["model_problems"])
    assert "float32, not 8-bit quantized" in a["nodes"][0]["reason"]


def test_edgetpu_compiler_stops_at_the_first_unsupported_op() -> None:
    nodes = [
        NodeInfo(0, "CONV_2D", 3, False, [t("in"), t("w", constant=True, shape=(4, 3, 3, 4))], [t("a")]),
        NodeInfo(1, "ARG_MAX", 2, False, [t("a")], [t("b", "int32", (1, 8, 8))]),
        NodeInfo(2, "ADD", 2, False, [t("c"), t("c2")], [t("d")]),
    ]
    info = ModelInfo([t("in")], [t("d")], nodes, "2.0.0", 1000)
    a = compat.analyze_edgetpu(info)
    assert [n["placement"] for n in a["nodes"]] == ["edgetpu", "cpu", "cpu"]
    assert "ARG_MAX is not an Edge TPU op" in a["nodes"][1]["reason"]
    assert "first unmapped op (#1)" in a["nodes"][2]["reason"]


def test_edgetpu_requires_static_shapes_and_small_rank() -> None:
    dyn = TensorInfo("x", [1, 8], [-1, 8], "int8", 0.1, 0)
    big = t("y", shape=(2, 2, 8, 8, 4))
    info = ModelInfo([dyn], [big], [NodeInfo(0, "ADD", 1, False, [dyn], [big])], None, 10)
    a = compat.analyze_edgetpu(info)
    assert any("dynamic shapes" in p for p in a["model_problems"]) and a["nodes"][0]["placement"] == "cpu"


def test_gpu_partitions_unsupported_ops_one_by_one(tmp_path) -> None:
    import keras
    import tensorflow as tf

    inp = keras.Input((16,))
    h = keras.layers.Dense(8)(inp)
    out = keras.layers.Lambda(lambda v: tf.cast(tf.math.argmax(v, axis=-1), tf.float32))(h)
    model = keras.Model(inp, [out])
    # a Lambda does not survive .keras safe loading; export a SavedModel with a static batch
    model.export(str(tmp_path / "argmax"), input_signature=[tf.TensorSpec([1, 16], tf.float32)], verbose=False)
    res = convert(tmp_path / "argmax", target="gpu", output=tmp_path / "g.edgebundle", runs=5)
    a = res.report["ops"]["gpu"]
    by_op = {n["op"]: n for n in a["nodes"]}
    assert by_op["FULLY_CONNECTED"]["placement"] == "gpu"
    assert by_op["ARG_MAX"]["placement"] == "cpu" and "not a GPU delegate op" in by_op["ARG_MAX"]["reason"]
    assert not a["fully_mapped"] and a["ops_on_gpu"] >= 1


def test_cpu_takes_every_builtin_op(digits_bundle) -> None:
    info = read_model_info(digits_bundle.model)
    a = compat.analyze_cpu(info)
    assert a["ops_on_cpu"] == len(info.nodes) and a["fully_mapped"]
    assert np.all([n["placement"] == "cpu" for n in a["nodes"]])
