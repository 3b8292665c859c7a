"""The accuracy guard and --quantize auto, on real data (scikit-learn's digits)."""

import numpy as np
import pytest

from converter import convert
from sdk.errors import AccuracyBudgetExceeded

AUTO_CPU = {"none", "dynamic", "float16", "int8", "int16x8"}


def test_int8_stays_within_one_point_of_float(digits_bundle) -> None:
    acc = digits_bundle.report["accuracy"]
    assert acc["metric"] == "accuracy"
    assert acc["reference_accuracy"] - acc["accuracy"] <= 0.01
    assert acc["drop_pts"] == pytest.approx(100 * (acc["reference_accuracy"] - acc["accuracy"]))


@pytest.mark.parametrize("optimize", ["latency", "size"])
def test_auto_tries_every_recipe_and_keeps_the_best_within_budget(digits_model, tmp_path, optimize) -> None:
    res = convert(
        digits_model.path, quantize="auto", calibration=digits_model.calibration, eval_data=digits_model.eval,
        max_accuracy_drop=1.0, optimize=optimize, output=tmp_path / "a.edgebundle", runs=30,
    )
    cands = res.report["candidates"]
    assert {c["recipe"] for c in cands} == AUTO_CPU
    ok = [c for c in cands if c["status"] == "ok"]
    for c in ok:
        assert c["size_bytes"] > 0 and c["latency"]["p50_ms"] > 0 and "accuracy" in c and "drop_pts" in c
    within = [c for c in ok if c["within_budget"]]
    assert all(c["drop_pts"] <= 1.0 for c in within)
    (chosen,) = [c for c in cands if c.get("chosen")]
    assert chosen in within
    if optimize == "latency":
        assert chosen["latency"]["p50_ms"] <= 1.05 * min(c["latency"]["p50_ms"] for c in within)
    else:
        assert chosen["size_bytes"] == min(c["size_bytes"] for c in within)
    assert res.manifest.quantization["recipe"] == chosen["recipe"]
    assert len(res.model) == chosen["size_bytes"]


def test_fixed_recipe_over_budget_fails_with_the_figures(digits_model, digits, tmp_path) -> None:
    # calibrating on nearly black images makes int8 activations saturate on real digits
    bad = tmp_path / "bad_calib.npz"
    np.savez(bad, x=digits.x_train[:200] * 0.05)
    with pytest.raises(AccuracyBudgetExceeded, match=r"int8 \(int8 I/O\) drops [0-9.]+ pts") as exc:
        convert(digits_model.path, quantize="int8", calibration=bad, eval_data=digits_model.eval,
                max_accuracy_drop=1.0, output=tmp_path / "x.edgebundle", runs=5)
    rows = {c["recipe"]: c for c in exc.value.report["candidates"]}
    assert rows["int8"]["drop_pts"] > 1.0 and rows["int8"]["within_budget"] is False
    assert not (tmp_path / "x.edgebundle").exists()


def test_without_labels_agreement_with_the_original_is_measured(digits_model, tmp_path) -> None:
    res = convert(digits_model.path, quantize="int8", calibration=digits_model.calibration,
                  eval_data=digits_model.eval_unlabelled, output=tmp_path / "u.edgebundle", runs=5)
    acc = res.report["accuracy"]
    assert acc["metric"] == "top1_agreement" and acc["accuracy"] is None
    assert acc["top1_agreement"] >= 0.98
    assert acc["drop_pts"] == pytest.approx(100 * (1 - acc["top1_agreement"]))


def test_regression_models_are_judged_by_cosine_similarity(tmp_path) -> None:
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(4)])
    model.save(tmp_path / "reg.keras")
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = convert(tmp_path / "reg.keras", quantize="dynamic", eval_data=tmp_path / "x.npy",
                  output=tmp_path / "r.edgebundle", runs=5)
    acc = res.report["accuracy"]
    assert acc["metric"] == "cosine" and 0.99 < acc["cosine"] <= 1.0 + 1e-9
    assert acc["max_abs_error"] < 0.1
