"""Magnitude pruning on a real Keras 3 model: sparsity achieved, and what it buys after compression."""

import numpy as np
import pytest

from converter import convert
from converter.pruning import kernel_sparsity, prune_model
from sdk.errors import ConfigError


def test_prune_with_fine_tune_reports_the_real_effect(digits_model, tmp_path) -> None:
    res = convert(
        digits_model.path, quantize="int8", calibration=digits_model.calibration, eval_data=digits_model.eval,
        prune=0.8, train=digits_model.train, epochs=3, output=tmp_path / "p.edgebundle", runs=5,
        max_accuracy_drop=3.0,
    )
    pr = res.report["pruning"]
    assert pr["achieved_sparsity"] == pytest.approx(0.8, abs=0.002)
    assert pr["fine_tune_epochs"] == 3 and pr["fine_tune_loss"] is not None
    # pruning does not shrink the .tflite, it shrinks what travels (the compressed bundle)
    assert abs(pr["tflite_bytes_after"] - pr["tflite_bytes_before"]) < 0.05 * pr["tflite_bytes_before"]
    assert pr["compressed_bytes_after"] < 0.8 * pr["compressed_bytes_before"]
    assert res.report["accuracy"]["drop_pts"] <= 3.0
    assert res.manifest.quantization["pruned_sparsity"] == pr["achieved_sparsity"]


def test_pruning_keeps_masks_through_fine_tuning_and_leaves_the_original_alone(digits_model, digits) -> None:
    from sdk.dataset import Dataset
    from converter.source import load_source

    src = load_source(digits_model.path)
    before = [w.copy() for w in src.keras_model.get_weights()]
    result = prune_model(src.keras_model, 0.5, train=Dataset([digits.x_train[:256]], digits.y_train[:256], "t"), epochs=1)
    assert kernel_sparsity(result.model) == pytest.approx(0.5, abs=0.002)
    assert all(v == pytest.approx(0.5, abs=0.01) for v in result.layers.values())
    assert all(np.array_equal(a, b) for a, b in zip(before, src.keras_model.get_weights()))


def test_pruning_errors(digits_model, tmp_path) -> None:
    from converter.source import load_source

    model = load_source(digits_model.path).keras_model
    with pytest.raises(ConfigError, match="between 0 and 1"):
        prune_model(model, 1.5)
    with pytest.raises(ConfigError, match="--epochs needs --train"):
        prune_model(model, 0.5, epochs=2)
    sm = tmp_path / "sm"
    model.export(str(sm), verbose=False)
    with pytest.raises(ConfigError, match="--prune needs a Keras model"):
        convert(sm, prune=0.5, output=tmp_path / "x.edgebundle", runs=5)
