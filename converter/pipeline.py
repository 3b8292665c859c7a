"""``convert()``: from a Keras / SavedModel / TFLite model to a signed, measured bundle.

Steps: load the model and data → (prune, fine-tune) → convert every recipe to try (always with
a float32 baseline) → run each on LiteRT, as devices do, to measure size, latency and
accuracy/agreement → pick (a fixed recipe is checked against the budget; ``auto`` keeps the best
within the budget by latency or size) → analyse op placement for cpu/gpu/edgetpu → compile for
the Edge TPU if asked and possible → golden outputs → write the signed bundle.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

import sdk
from sdk import bundle as bundle_mod
from sdk import golden
from sdk.errors import AccuracyBudgetExceeded, ConfigError, EdgeSdkError, QuantizationError, UnsupportedOpError
from sdk.latency import measure_interleaved
from sdk.modelinfo import ModelInfo, read_model_info
from sdk.runtime import DelegateOptions, Engine, find_runtime, open_engine, quantize as quantize_array
from sdk.signing import load_private_key

from . import compat
from sdk.dataset import Dataset, load_dataset
from .edgetpu import compile_for_edgetpu
from .evaluation import run_engine, score
from .recipes import RECIPES, Recipe, candidate_recipes, convert_saved_model, default_recipe
from .report import render_table, write_report_dir
from .source import SourceModel, load_source, tensorflow

PathLike = Union[str, "os.PathLike[str]"]
TARGETS = ("cpu", "gpu", "edgetpu")
OPTIMIZE = ("latency", "size")
QUANTIZE_MODES = RECIPES + ("auto",)
AUTO_DEFAULT_BUDGET = 1.0
LATENCY_TIE = 1.05  # candidates within 5 % of the fastest count as equally fast; the smaller wins

Progress = Callable[[str, int, int], None]

__all__ = ["convert", "ConversionResult", "TARGETS", "QUANTIZE_MODES", "OPTIMIZE"]


@dataclass
class ConversionResult:
    """What :func:`convert` returns: the report (also in the manifest) and where the bundle is."""

    report: dict[str, Any]
    bundle_path: Path
    manifest: sdk.Manifest
    model: bytes

    def table(self) -> str:
        return render_table(self.report)


def _compressed(model: bytes) -> int:
    return len(zlib.compress(model, 9))


def _as_dataset(value: Any, src: SourceModel, what: str, limit: Optional[int], image_range: tuple[float, float]) -> Optional[Dataset]:
    if value is None:
        return None
    if isinstance(value, Dataset):
        return value.take(limit)
    return load_dataset(value, src.inputs, what=what, limit=limit, value_range=image_range)


class _Steps:
    def __init__(self, progress: Optional[Progress], total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, label: str) -> None:
        if self.progress:
            self.progress(label, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.progress:
            self.progress("done", self.total, self.total)


def _measure_candidate(
    recipe: Recipe,
    model: bytes,
    eval_set: Dataset,
    reference: list[np.ndarray],
    opts: DelegateOptions,
    float32_bytes: Optional[int],
) -> tuple[dict[str, Any], Engine]:
    """Convert-side figures of one candidate: size and quality (latency is measured afterwards,
    for all candidates together, by :func:`_measure_latencies`)."""
    engine = open_engine(model, "cpu", opts)
    outputs = run_engine(engine, eval_set)
    quality = score(reference, outputs, eval_set.y)
    row = {
        **recipe.to_dict(),
        "label": recipe.label,
        "status": "ok",
        "size_bytes": len(model),
        "compressed_bytes": _compressed(model),
        "ratio_to_float32": (len(model) / float32_bytes) if float32_bytes else None,
        **quality,
    }
    return row, engine


MIN_MEASURE_SECONDS = 0.5


def _measure_latencies(candidates: list[dict[str, Any]], built: dict[Recipe, tuple[bytes, Engine]],
                       eval_set: Dataset, warmup: int, runs: int) -> None:
    """p50/p99 of every built candidate, measured round-robin on the first evaluation sample."""
    fns = {}
    for c in candidates:
        if c["status"] != "ok":
            continue
        _, engine = built[Recipe(c["recipe"], c["io_dtype"])]
        sample = [quantize_array(x, spec) for x, spec in zip(eval_set.sample(0), engine.inputs)]
        fns[c["label"]] = (lambda e=engine, s=sample: e.run(s))
    stats = measure_interleaved(fns, warmup=warmup, runs=runs, min_seconds=MIN_MEASURE_SECONDS)
    for c in candidates:
        if c["label"] in stats:
            c["latency"] = stats[c["label"]].to_dict()


def _golden(engine: Engine, info: ModelInfo, value_ranges: list[tuple[float, float]], pairs: int, seed: int, target: str) -> tuple[dict[str, Any], bytes]:
    specs = [
        {**t.to_dict(), "value_range": list(value_ranges[i] if i < len(value_ranges) else (0.0, 1.0))}
        for i, t in enumerate(info.inputs)
    ]
    outputs = [engine.run(golden.golden_inputs(seed, p, specs)) for p in range(pairs)]
    tolerance = [max(golden.default_tolerance(outs[j], target) for outs in outputs) for j in range(len(info.outputs))]
    meta = {"seed": seed, "pairs": pairs, "file": bundle_mod.GOLDEN_NAME, "tolerance": tolerance}
    return meta, golden.encode_outputs(outputs)


def convert(
    model: PathLike,
    *,
    target: str = "cpu",
    output: Optional[PathLike] = None,
    quantize: Optional[str] = None,
    io_dtype: Optional[str] = None,
    calibration: Union[PathLike, Dataset, None] = None,
    eval_data: Union[PathLike, Dataset, None] = None,
    max_accuracy_drop: Optional[float] = None,
    optimize: str = "latency",
    prune: Optional[float] = None,
    train: Union[PathLike, Dataset, None] = None,
    epochs: int = 0,
    threads: Optional[int] = None,
    runs: int = 50,
    warmup: int = 5,
    name: Optional[str] = None,
    version: str = "1",
    key: Any = None,
    report_dir: Optional[PathLike] = None,
    calibration_limit: Optional[int] = 300,
    eval_limit: Optional[int] = 1000,
    image_range: tuple[float, float] = (0.0, 1.0),
    latency_limit_ms: Optional[float] = None,
    golden_pairs: int = 3,
    edgetpu_compiler: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> ConversionResult:
    """Convert ``model`` for ``target`` and write a bundle; see ``edgesdk convert --help``."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"unknown --quantize {quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if optimize not in OPTIMIZE:
        raise ConfigError(f"unknown --optimize {optimize!r}: choose latency or size")
    if target == "edgetpu" and quantize not in (None, "int8", "auto"):
        raise ConfigError(f"the Edge TPU runs only fully integer models: use --quantize int8 (not {quantize})")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise ConfigError("--max-accuracy-drop must be zero or more points")
    if runs < 1:
        raise ConfigError("--runs must be at least 1")
    key_obj = load_private_key(key) if isinstance(key, (str, os.PathLike)) else key
    threads = threads or min(4, os.cpu_count() or 1)
    opts = DelegateOptions(num_threads=threads)

    is_tflite = Path(model).suffix.lower() == ".tflite"
    if is_tflite:
        if quantize is not None or prune:
            raise ConfigError("a .tflite model is bundled as is: drop --quantize/--prune, or pass the Keras/SavedModel source")
        recipes: list[Recipe] = []
    elif quantize == "auto":
        recipes = candidate_recipes(target, calibration is not None, io_dtype)
    elif quantize is None:
        recipes = [default_recipe(target, calibration is not None, io_dtype)]
    else:
        int_io = io_dtype or ("uint8" if target == "edgetpu" else "int8")
        recipes = [Recipe(quantize, int_io if quantize == "int8" else "float32")]
    baseline = Recipe("none")
    plan = [] if is_tflite else (recipes if baseline in recipes else [baseline] + recipes)
    total = 5 + len(plan) + (1 if is_tflite else 0) + (2 if prune else 0) + (1 if target == "edgetpu" else 0)
    steps = _Steps(progress, total)

    steps("load model")
    src = load_source(model)
    calib = _as_dataset(calibration, src, "calibration", calibration_limit, image_range)
    evald = _as_dataset(eval_data, src, "evaluation", eval_limit, image_range)
    train_set = _as_dataset(train, src, "training", None, image_range)
    notes: list[str] = []

    if evald is not None:
        eval_set, eval_name = evald, f"{evald.source}"
    elif calib is not None:
        eval_set, eval_name = calib, f"{calib.source} (calibration data)"
        notes.append("evaluated on the calibration data: pass --eval DATA for an unbiased figure")
    else:
        rng = np.random.default_rng(0)
        eval_set = Dataset([rng.random((32, *s.shape[1:]), dtype=np.float32) for s in src.inputs], None, "synthetic")
        eval_name = "32 synthetic uniform [0,1) inputs"
        notes.append("no --eval or --calibration data: agreement measured on synthetic inputs only")
    value_ranges = (calib if calib is not None else eval_set).value_range

    steps("reference outputs")
    if src.kind == "tflite":
        ref_engine = open_engine(src.tflite_bytes, "cpu", opts)
        reference = run_engine(ref_engine, eval_set)
    else:
        reference = src.predict(eval_set.xs)

    prune_info = None
    conv_src = src
    if prune:
        if src.kind != "keras":
            raise ConfigError("--prune needs a Keras model (.keras or .h5): a SavedModel or .tflite has no layers to prune")
        steps(f"prune to {prune:.0%}" + (f", fine-tune {epochs} epochs" if epochs else ""))
        from .pruning import prune_model

        result = prune_model(src.keras_model, prune, train=train_set, epochs=epochs)
        conv_src = src.with_keras_model(result.model)
        prune_info = result.to_dict()

    candidates: list[dict[str, Any]] = []
    built: dict[Recipe, tuple[bytes, Engine]] = {}
    float32_bytes: Optional[int] = None
    if src.kind == "tflite":
        steps("measure the .tflite as is")
        tfl = src.tflite_bytes
        info0 = read_model_info(tfl)
        label = "as-is (" + ", ".join(sorted({t.dtype for t in info0.inputs})) + " I/O)"
        row, eng = _measure_candidate(Recipe("as-is"), tfl, eval_set, reference, opts, None)
        row.update(label=label, role="requested")
        candidates.append(row)
        built[Recipe("as-is")] = (tfl, eng)
    for recipe in plan:
        steps(f"convert {recipe.label}")
        role = "requested" if recipe in recipes else "baseline"
        try:
            tfl = convert_saved_model(conv_src.saved_model_dir(), recipe, calib)
            row, eng = _measure_candidate(recipe, tfl, eval_set, reference, opts, float32_bytes)
        except UnsupportedOpError:
            raise
        except EdgeSdkError as exc:
            if quantize != "auto" and role == "requested":
                raise
            candidates.append({**recipe.to_dict(), "label": recipe.label, "status": "failed", "error": str(exc), "role": role})
            continue
        if recipe == baseline:
            float32_bytes = len(tfl)
        row["role"] = role
        candidates.append(row)
        built[recipe] = (tfl, eng)
    for c in candidates:
        if float32_bytes and c.get("size_bytes"):
            c["ratio_to_float32"] = c["size_bytes"] / float32_bytes
    steps("measure latency")
    _measure_latencies(candidates, built, eval_set, warmup, runs)

    budget = max_accuracy_drop if max_accuracy_drop is not None else (AUTO_DEFAULT_BUDGET if quantize == "auto" else None)
    for c in candidates:
        if c["status"] == "ok":
            c["within_budget"] = budget is None or c["drop_pts"] <= budget + 1e-9
    requested = [c for c in candidates if c.get("role") == "requested"]
    report: dict[str, Any] = {
        "source": {"path": str(src.path), "kind": src.kind, "sha256": src.digest, "bytes": src.size_bytes},
        "target": target,
        "quantize": quantize or "default",
        "optimize": optimize,
        "max_accuracy_drop": budget,
        "evaluation": {
            "data": eval_name,
            "samples": len(eval_set),
            "metric": candidates[0].get("metric") if candidates and candidates[0]["status"] == "ok" else None,
            "reference_accuracy": next((c.get("reference_accuracy") for c in candidates if "reference_accuracy" in c), None),
        },
        "latency_setup": {"runtime": f"{find_runtime().name} {find_runtime().version}", "delegate": "cpu (XNNPACK)",
                          "threads": threads, "warmup": warmup, "runs": runs,
                          "min_seconds": MIN_MEASURE_SECONDS, "interleaved": True},
        "candidates": candidates,
        "notes": notes,
    }
    if target != "cpu":
        notes.append(f"latency measured on this machine's CPU (XNNPACK), not on the {target} target's accelerator")

    ok = [c for c in requested if c["status"] == "ok"]
    within = [c for c in ok if c["within_budget"]]
    if not within:
        if not ok:
            errors = "; ".join(f"{c['label']}: {c.get('error')}" for c in requested)
            raise QuantizationError(f"every recipe failed ({errors})")
        worst = ", ".join(f"{c['label']} drops {c['drop_pts']:.2f} pts" for c in ok)
        raise AccuracyBudgetExceeded(
            f"accuracy drop over the budget of {budget} pts ({worst}): raise --max-accuracy-drop, give better "
            "--calibration data, or use a less aggressive --quantize",
            report=report,
        )
    if optimize == "latency":
        fastest = min(c["latency"]["p50_ms"] for c in within)
        pool = [c for c in within if c["latency"]["p50_ms"] <= fastest * LATENCY_TIE]
        chosen = min(pool, key=lambda c: (c["size_bytes"], c["latency"]["p50_ms"]))
    else:
        chosen = min(within, key=lambda c: (c["size_bytes"], c["latency"]["p50_ms"]))
    chosen["chosen"] = True
    chosen_recipe = Recipe(chosen["recipe"], chosen["io_dtype"])
    tflite, engine = built[chosen_recipe]
    if quantize == "auto":
        notes.append(
            f"auto: kept {chosen['label']}, the {'fastest (p50 within 5 % counts as a tie, smaller wins)' if optimize == 'latency' else 'smallest'} "
            f"of {len(within)} recipe(s) within {budget} pts"
        )

    if prune_info is not None:
        steps(f"measure {chosen_recipe.label} without pruning")
        unpruned = convert_saved_model(src.saved_model_dir(), chosen_recipe, calib)
        prune_info.update(
            recipe=chosen["label"],
            tflite_bytes_before=len(unpruned),
            tflite_bytes_after=len(tflite),
            compressed_bytes_before=_compressed(unpruned),
            compressed_bytes_after=_compressed(tflite),
        )
        report["pruning"] = prune_info

    steps("analyse ops")
    info = read_model_info(tflite)
    report["ops"] = {"cpu": compat.analyze_cpu(info), "gpu": compat.analyze_gpu(info), "edgetpu": compat.analyze_edgetpu(info)}
    files: dict[str, bytes] = {bundle_mod.MODEL_NAME: tflite}
    if target == "edgetpu":
        steps("compile for the Edge TPU")
        etpu = compile_for_edgetpu(tflite, compiler=edgetpu_compiler)
        report["edgetpu_compiler"] = etpu.to_dict()
        if etpu.compiled is not None:
            files[bundle_mod.EDGETPU_MODEL_NAME] = etpu.compiled
            files["edgetpu_compiler.log"] = etpu.log.encode()

    steps("golden outputs and bundle")
    compressed = _compressed(tflite)
    report["size"] = {
        "source_bytes": src.size_bytes,
        "float32_bytes": float32_bytes or len(tflite),
        "converted_bytes": len(tflite),
        "compression_ratio": len(tflite) / (float32_bytes or len(tflite)),
        "compressed_bytes": compressed,
    }
    report["chosen"] = chosen["label"]
    report["accuracy"] = {k: chosen.get(k) for k in ("metric", "accuracy", "reference_accuracy", "top1_agreement", "cosine", "max_abs_error", "drop_pts")}
    report["latency"] = chosen["latency"]

    seed = int.from_bytes(hashlib.sha256(tflite).digest()[:4], "little")
    golden_meta, golden_blob = _golden(engine, info, value_ranges, golden_pairs, seed, target)
    files[bundle_mod.GOLDEN_NAME] = golden_blob
    tf = tensorflow() if src.kind != "tflite" else None
    manifest = {
        "name": name or src.path.stem,
        "version": str(version),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"file": src.path.name, "kind": src.kind, "sha256": src.digest, "bytes": src.size_bytes},
        "target": target,
        "quantization": {**chosen_recipe.to_dict(), "label": chosen["label"], "pruned_sparsity": prune_info and prune_info["achieved_sparsity"]},
        "model_file": bundle_mod.MODEL_NAME,
        "inputs": [{**t.to_dict(), "value_range": list(value_ranges[i])} for i, t in enumerate(info.inputs)],
        "outputs": [t.to_dict() for t in info.outputs],
        "ops": info.ops,
        "min_runtime_version": info.min_runtime_version,
        "golden": golden_meta,
        "latency_limit_ms": latency_limit_ms,
        "built_with": {
            "edgesdk": sdk.__version__,
            "tensorflow": getattr(tf, "__version__", None),
            "runtime": find_runtime().describe(),
        },
        "report": report,
    }
    out = Path(output) if output else Path(f"{manifest['name']}.edgebundle")
    path = bundle_mod.write_bundle(out, manifest, files, private_key=key_obj)
    man = sdk.Bundle.open(path).manifest
    report["bundle"] = {"path": str(path), "bytes": path.stat().st_size, "signed": key_obj is not None}
    if report_dir:
        report["report_files"] = [str(p) for p in write_report_dir(report, Path(report_dir))]
    steps.finish()
    return ConversionResult(report, path, man, tflite)
