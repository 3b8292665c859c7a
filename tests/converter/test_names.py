"""Inputs and outputs matched by signature name, never by position.

A Keras model with two inputs of different dtypes (int32 token ids, float32 features) and three
outputs, exported as a SavedModel: TFLite orders that signature's outputs differently from the
SavedModel, so matching by position compares the wrong tensors (the issue's reshape crash).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from converter import convert
from converter.evaluation import run_engine
from converter.loaders import kind_for
from converter.options import ConvertOptions
from converter.recipes import Recipe
from sdk.dataset import load_dataset
from sdk.errors import ModelLoadError
from sdk.modelinfo import read_model_info
from sdk.runtime import open_engine

VOCAB = 20


def _saved_model(tmp_path, dynamic_length: bool = False):
    import keras

    length = None if dynamic_length else 6
    ids = keras.Input(shape=(length,), dtype="int32", name="token_ids")
    feat = keras.Input(shape=(4,), dtype="float32", name="features")
    e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 3)(ids))
    h = keras.layers.Concatenate()([e, feat])
    outs = [keras.layers.Dense(5, name="wide")(h), keras.layers.Dense(2, activation="softmax", name="prob")(h),
            keras.layers.Dense(3, name="mid")(h)]
    model = keras.Model([ids, feat], outs)
    path = tmp_path / ("sm_dynamic" if dynamic_length else "sm")
    model.export(str(path), format="tf_saved_model", verbose=False)
    return path


def _data(tmp_path, n: int = 24):
    rng = np.random.default_rng(1)
    path = tmp_path / "named.npz"
    np.savez(path, token_ids=rng.integers(0, VOCAB, (n, 6)).astype(np.int32),
             features=rng.random((n, 4), dtype=np.float32))
    return path


def test_tflite_orders_outputs_differently_and_they_are_matched_by_name(tmp_path):
    sm = _saved_model(tmp_path)
    kind = kind_for(sm)
    src = kind.load(sm, ConvertOptions())
    assert [s.name for s in src.inputs] == ["features", "token_ids"]
    assert [s.dtype for s in src.inputs] == ["float32", "int32"]
    assert src.outputs == ["output_0", "output_1", "output_2"]
    tflite = kind.convert(src, Recipe("none"), None)
    info = read_model_info(tflite)
    keys = [t.key for t in info.outputs]
    assert sorted(keys) == src.outputs
    assert keys != src.outputs  # the premise: position would pair the wrong tensors
    data = load_dataset(_data(tmp_path), src.inputs, what="evaluation")
    assert data.names == ["features", "token_ids"] and data.xs[1].dtype == np.int32
    reference = src.predict(data.xs)
    converted = run_engine(open_engine(tflite, "cpu"), data, outputs=src.outputs)
    for ref, got in zip(reference, converted):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    positional = run_engine(open_engine(tflite, "cpu"), data)
    assert [a.shape for a in positional] != [a.shape for a in reference]


def test_auto_converts_a_two_dtype_three_output_model_and_records_names(tmp_path, agent, signing_keys):
    sm = _saved_model(tmp_path)
    data = _data(tmp_path)
    result = convert(sm, target="cpu", quantize="auto", calibration=data, eval_data=data, key=signing_keys.private,
                     output=tmp_path / "m.edgebundle", runs=3, warmup=1, golden_pairs=2)
    rows = {r["label"]: r for r in result.report["candidates"]}
    assert rows["float32"]["status"] == "ok"
    assert rows["float32"]["max_abs_error"] < 1e-4 and rows["float32"]["cosine"] > 0.9999
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) >= 3
    m = result.manifest
    assert sorted(t["key"] for t in m.inputs) == ["features", "token_ids"]
    assert sorted(t["key"] for t in m.outputs) == ["output_0", "output_1", "output_2"]
    ids = next(t for t in m.inputs if t["key"] == "token_ids")
    assert ids["dtype"] == "int32" and 0 <= ids["value_range"][0] and ids["value_range"][1] <= VOCAB - 1

    # a real agent installs it (verified, the golden pairs replayed) and takes the inputs by name
    from agent import AgentClient

    installed = agent.install(result.bundle_path)
    assert installed["model"] == m.name and installed["golden_max_error"] is not None
    x = np.load(data)
    by_name = agent.predict(m.name, {"token_ids": x["token_ids"][:1], "features": x["features"][:1]})
    with AgentClient(agent.config.socket_path) as client:  # and through the local API, in the other order
        over_socket = client.predict(m.name, {"features": x["features"][:1], "token_ids": x["token_ids"][:1]})
    assert all(np.array_equal(a, b) for a, b in zip(by_name, over_socket))
    keys = [t["key"] for t in m.outputs]
    src = kind_for(sm).load(sm, ConvertOptions())
    ref = dict(zip(src.outputs, src.predict([x["features"][:1], x["token_ids"][:1]])))
    if result.report["chosen"] == "float32":
        for key, y in zip(keys, by_name):
            np.testing.assert_allclose(y, ref[key], atol=1e-4)
    else:
        assert [y.shape for y in by_name] == [ref[k].shape for k in keys]


def test_signature_choice_and_unknown_signature(tmp_path):
    import tensorflow as tf

    class Two(tf.Module):
        def __init__(self):
            self.w = tf.Variable(tf.ones([4, 3]))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def plain(self, x):
            return {"y": tf.matmul(x, self.w)}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def doubled(self, x):
            return {"twice": 2.0 * tf.matmul(x, self.w), "sum": tf.reduce_sum(x, axis=1, keepdims=True)}

    m = Two()
    path = tmp_path / "two"
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.plain, "doubled": m.doubled})
    with pytest.raises(ModelLoadError, match="no signature 'nope'.*doubled, serving_default"):
        kind_for(path).load(path, ConvertOptions(signature="nope"))
    result = convert(path, signature="doubled", quantize="none", output=tmp_path / "d.edgebundle", runs=2, warmup=1)
    assert sorted(t["key"] for t in result.manifest.outputs) == ["sum", "twice"]
    assert result.report["candidates"][0]["max_abs_error"] < 1e-5


def test_unknown_dimensions_are_named_and_fixed_by_input_shape(tmp_path):
    from edgesdk.cli import cli as main

    sm = _saved_model(tmp_path, dynamic_length=True)
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    res = runner.invoke(main, ["convert", str(sm), "--quantize", "none", "-o", str(tmp_path / "a.edgebundle")])
    assert res.exit_code == 4, res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "'token_ids' [1, -1] (dimension 1)" in lines[0] and "--input-shape token_ids=1,N" in lines[0]
    assert "Traceback" not in res.stderr
    res = runner.invoke(main, ["convert", str(sm), "--quantize", "none", "--input-shape", "token_ids=1,6",
                               "-o", str(tmp_path / "b.edgebundle"), "--runs", "2"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(main, ["convert", str(sm), "--input-shape", "nope=1,6", "-o", str(tmp_path / "c.edgebundle")])
    assert res.exit_code == 4 and "the SavedModel signature 'serving_default' inputs are features, token_ids" in res.stderr


def test_integer_and_boolean_inputs_keep_their_dtype_in_generated_and_golden_data():
    from sdk import golden
    from sdk.dataset import InputSpec, synthetic_dataset

    specs = [InputSpec("ids", (1, 8), "int32"), InputSpec("mask", (1, 8), "bool"), InputSpec("x", (1, 3))]
    data = synthetic_dataset(specs, 50, ranges={"ids": (0, 7)})
    ids, mask, x = data.xs
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() <= 6 and len(np.unique(ids)) > 3
    assert mask.dtype == np.bool_ and 0 < mask.mean() < 1 and x.dtype == np.float32
    assert data.names == ["ids", "mask", "x"]
    g = golden.golden_inputs(3, 0, [{"shape": [1, 8], "dtype": "bool", "value_range": [0, 1]},
                                    {"shape": [1, 8], "dtype": "int32", "value_range": [0, 19]}])
    assert g[0].dtype == np.bool_ and g[1].dtype == np.int32 and 0 <= g[1].min() and g[1].max() <= 19
