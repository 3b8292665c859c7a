"""A dynamic batch dimension: cpu bundles of a batch-less source (Keras with a None batch, a
SavedModel with one) keep it (shape_signature -1, shape 1), so a device runs a whole task in one
invoke; the Edge TPU, the GPU and ``--input-shape`` get a static batch of 1. Every recipe and the
pruned model convert with it, LiteRT resizes it and gives the batch the outputs it gives sample by
sample, and everything measured still runs at batch 1."""

from pathlib import Path

import numpy as np
import pytest

from converter import convert
from converter.compat import analyze_gpu
from converter.loaders import KerasKind, SavedModelKind
from converter.options import ConvertOptions
from converter.recipes import Recipe
from converter.source import SourceModel
from sdk.bundle import Bundle
from sdk.dataset import Dataset
from sdk.errors import ModelLoadError
from sdk.modelinfo import read_model_info
from sdk.golden import golden_inputs
from sdk.runtime import open_engine, quantize

RECIPES = [Recipe("none"), Recipe("dynamic"), Recipe("float16"), Recipe("int8", "int8"), Recipe("int8", "float32")]


def _calibration(digits, name: str) -> Dataset:
    return Dataset([digits.x_train[:100]], None, "calibration", [name])


def _batched_equals_per_sample(model: bytes, x: np.ndarray) -> None:
    """LiteRT's own Interpreter, resized to the batch (strict: only a dynamic dimension resizes),
    gives the outputs it gives sample by sample at batch 1."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if inp["dtype"] != np.float32:  # integer I/O: quantize as the agent does
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
    it.allocate_tensors()
    single = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i : i + 1])
        it.invoke()
        single.append(it.get_tensor(out["index"])[0].copy())
    it.resize_tensor_input(inp["index"], [len(x), *inp["shape"][1:]], strict=True)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    batched = it.get_tensor(out["index"])
    assert batched.shape == (len(x), *single[0].shape)
    tol = 1 if np.dtype(batched.dtype).kind in "iu" else 1e-5  # one quantum for integer outputs
    assert np.max(np.abs(batched.astype(np.float64) - np.stack(single).astype(np.float64))) <= tol


def test_every_recipe_keeps_a_dynamic_batch_on_cpu(digits_model, digits) -> None:
    kind = KerasKind()
    src = kind.load(digits_model.path, ConvertOptions(target="cpu"))
    assert src.dynamic_batch and [s.shape for s in src.inputs] == [(1, 8, 8, 1)]  # measured at batch 1
    cal = _calibration(digits, src.inputs[0].name)
    for recipe in RECIPES:
        model = kind.convert(src, recipe, cal)
        info = read_model_info(model)
        assert info.dynamic_batch, recipe.label
        assert info.inputs[0].shape == [1, 8, 8, 1] and info.inputs[0].shape_signature == [-1, 8, 8, 1]
        _batched_equals_per_sample(model, digits.x_test[:16])
        engine = open_engine(model, "cpu")  # the engine the converter and the agent measure with
        assert engine.inputs[0].shape == [1, 8, 8, 1] and engine.batchable
        x = quantize(digits.x_test[:16], engine.inputs[0])
        batched = engine.run_batch([x])[0]
        assert batched.shape == (16, 10) and engine.batchable and engine._batch == 16  # one invoke of 16, not 16 of 1
        each = np.concatenate([engine.run([x[i : i + 1]])[0] for i in range(16)])
        assert np.max(np.abs(batched.astype(np.float64) - each.astype(np.float64))) <= 1


def test_pruned_model_keeps_the_dynamic_batch(digits_model, digits) -> None:
    from converter.pruning import prune_model

    kind = KerasKind()
    src = kind.load(digits_model.path, ConvertOptions(target="cpu"))
    pruned = src.with_keras_model(prune_model(src.keras_model, 0.5).model)
    assert pruned.dynamic_batch
    model = kind.convert(pruned, Recipe("int8", "int8"), _calibration(digits, src.inputs[0].name))
    assert read_model_info(model).dynamic_batch
    _batched_equals_per_sample(model, digits.x_test[:8])


@pytest.mark.parametrize("options", [ConvertOptions(target="edgetpu"), ConvertOptions(target="gpu"),
                                     ConvertOptions(target="cpu", input_shapes={"input_layer": (1, 8, 8, 1)})],
                         ids=["edgetpu", "gpu", "input-shape"])
def test_static_batch_where_it_must_be(digits_model, options) -> None:
    kind = KerasKind()
    src = kind.load(digits_model.path, options)
    assert not src.dynamic_batch
    info = read_model_info(kind.convert(src, Recipe("none"), None))
    assert not info.dynamic_batch and info.inputs[0].shape_signature == [1, 8, 8, 1]


def test_saved_model_with_a_none_batch_keeps_it(digits_model, digits, tmp_path) -> None:
    from converter.source import load_source

    sm = tmp_path / "sm"
    load_source(digits_model.path).keras_model.export(str(sm), verbose=False)  # batch None
    kind = SavedModelKind()
    src = kind.load(sm, ConvertOptions(target="cpu"))
    assert src.dynamic_batch and src.saved_model_dir() == sm  # as exported: no re-tracing needed
    model = kind.convert(src, Recipe("dynamic"), None)
    assert read_model_info(model).dynamic_batch
    _batched_equals_per_sample(model, digits.x_test[:8])
    static = kind.load(sm, ConvertOptions(target="edgetpu"))
    assert not static.dynamic_batch and static.saved_model_dir() != sm
    assert not read_model_info(kind.convert(static, Recipe("none"), None)).dynamic_batch


def test_a_model_that_refuses_a_dynamic_batch_gets_a_static_one(tmp_path) -> None:
    asked = []

    def export(dynamic: bool) -> Path:
        asked.append(dynamic)
        if dynamic:
            raise ModelLoadError("cannot export the Keras model for conversion: batch must be 1")
        return tmp_path

    src = SourceModel("keras", tmp_path, "0" * 64, 0, [], dynamic_batch=True, _export=export)
    assert src.saved_model_dir() == tmp_path and asked == [True, False] and not src.dynamic_batch


def test_bundle_records_the_dynamic_batch_and_measures_at_batch_1(digits_model, tmp_path) -> None:
    res = convert(digits_model.path, target="cpu", quantize="int8", calibration=digits_model.calibration,
                  eval_data=digits_model.eval, output=tmp_path / "d.edgebundle", runs=5)
    assert res.report["dynamic_batch"] is True
    assert res.report["accuracy"]["accuracy"] >= digits_model.float_accuracy - 0.02
    assert res.report["latency"]["p50_ms"] > 0
    bundle = Bundle.open(res.bundle_path)
    (entry,) = bundle.manifest.inputs
    assert entry["shape"] == [1, 8, 8, 1] and entry["shape_signature"] == [-1, 8, 8, 1]
    # the golden pairs (what an agent checks after install) are batch-1 inputs of the manifest's shapes
    golden = bundle.manifest.golden
    (x,) = golden_inputs(golden["seed"], 0, bundle.manifest.inputs)
    assert x.shape == (1, 8, 8, 1)


def test_gpu_analysis_does_not_count_a_dynamic_batch_as_a_dynamic_shape(digits_model) -> None:
    kind = KerasKind()
    src = kind.load(digits_model.path, ConvertOptions(target="cpu"))
    a = analyze_gpu(read_model_info(kind.convert(src, Recipe("float16"), None)))
    assert a["model_problems"] == []
    assert all("dynamic shape" not in n["reason"] for n in a["nodes"])
