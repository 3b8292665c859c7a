"""The results file of a job: one array per output, named by the outputs' signature names when
the fleet holds the model's manifest (TFLite's order of outputs is not the source model's)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleet.jobs import result_names, write_results


@pytest.mark.parametrize(("count", "names", "expected"), [
    (1, ["logits"], ["y"]),
    (3, ["onset", "contour", "note"], ["onset", "contour", "note"]),
    (2, None, ["y0", "y1"]),
    (2, ["a", "a"], ["y0", "y1"]),            # not distinct
    (2, ["a", "../b"], ["y0", "y1"]),         # not an id
    (2, ["file", "b"], ["y0", "y1"]),         # numpy's own savez argument
    (2, ["a"], ["y0", "y1"]),                 # not one per output
])
def test_result_names(count, names, expected) -> None:
    assert result_names(count, names) == expected


def test_npz_holds_each_output_under_its_name(tmp_path) -> None:
    outputs = [np.arange(6, dtype=np.float32).reshape(3, 2), np.array([[1], [2], [3]], np.int64)]
    path = write_results(outputs, tmp_path / "r.npz", "npz", ["scores", "label"])
    with np.load(path) as z:
        assert sorted(z.files) == ["label", "scores"]
        np.testing.assert_array_equal(z["scores"], outputs[0])
        np.testing.assert_array_equal(z["label"], outputs[1])
    lines = (write_results(outputs, tmp_path / "r.jsonl", "jsonl", ["scores", "label"])).read_text().splitlines()
    assert json.loads(lines[2]) == {"index": 2, "outputs": [[4.0, 5.0], [3]]}
