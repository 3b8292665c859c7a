"""The package steps: op placement per accelerator, the Edge TPU compilation, golden outputs,
the manifest and the signed bundle (then the report files)."""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any

import sdk
from sdk import bundle as bundle_mod
from sdk import golden
from sdk.modelinfo import ModelInfo, read_model_info
from sdk.runtime import Engine, find_runtime

from . import compat
from .edgetpu import compile_for_edgetpu
from .load import input_normalizations
from .measure import compressed_size
from .report import write_report_dir
from .source import tensorflow
from .state import Conversion

__all__ = ["analyse_ops", "compile_edgetpu", "golden_and_bundle"]


def analyse_ops(c: Conversion) -> None:
    c.info = read_model_info(c.tflite)
    # whether devices can resize the batch and run a whole task in one invoke (the manifest's
    # inputs say the same: shape_signature -1, shape 1)
    c.report["dynamic_batch"] = c.info.dynamic_batch
    c.report["ops"] = {"cpu": compat.analyze_cpu(c.info), "gpu": compat.analyze_gpu(c.info), "edgetpu": compat.analyze_edgetpu(c.info)}
    c.files[bundle_mod.MODEL_NAME] = c.tflite


def compile_edgetpu(c: Conversion) -> None:
    etpu = compile_for_edgetpu(c.tflite, compiler=c.options.edgetpu_compiler)
    c.report["edgetpu_compiler"] = etpu.to_dict()
    if etpu.compiled is not None:
        c.files[bundle_mod.EDGETPU_MODEL_NAME] = etpu.compiled
        c.files["edgetpu_compiler.log"] = etpu.log.encode()


def input_ranges(c: Conversion) -> list[tuple[float, float]]:
    """Each converted-model input's value range (what golden inputs are drawn from), in the model's
    input order: taken from the data by input name, since TFLite may order inputs differently."""
    by_name = dict(zip([s.name for s in c.src.inputs], c.value_ranges))
    return [tuple(by_name.get(t.io_name, c.value_ranges[i] if i < len(c.value_ranges) else (0.0, 1.0)))  # type: ignore[misc]
            for i, t in enumerate(c.info.inputs)]


def _input_entries(c: Conversion) -> list[dict[str, Any]]:
    """The manifest's input entries: each tensor's spec, value range and, when one was given for
    it (matched by name), its uint8 ``normalization`` (:mod:`sdk.encoding`)."""
    by_name = dict(zip([s.name for s in c.src.inputs], input_normalizations(c)))
    entries = []
    for t, r in zip(c.info.inputs, input_ranges(c)):
        entry: dict[str, Any] = {**t.to_dict(), "value_range": list(r)}
        norm = by_name.get(t.io_name) if len(by_name) > 1 else next(iter(by_name.values()), None)
        if norm is not None:
            entry["normalization"] = norm.to_json()
        entries.append(entry)
    return entries


def _golden(engine: Engine, info: ModelInfo, value_ranges: list[tuple[float, float]], pairs: int, seed: int, target: str) -> tuple[dict[str, Any], bytes]:
    specs = [{**t.to_dict(), "value_range": list(value_ranges[i])} for i, t in enumerate(info.inputs)]
    outputs = [engine.run(golden.golden_inputs(seed, p, specs)) for p in range(pairs)]
    tolerance = [max(golden.default_tolerance(outs[j], target) for outs in outputs) for j in range(len(info.outputs))]
    meta = {"seed": seed, "pairs": pairs, "file": bundle_mod.GOLDEN_NAME, "tolerance": tolerance}
    return meta, golden.encode_outputs(outputs)


def _summary(c: Conversion) -> None:
    """The report's last part: sizes, the chosen recipe, its accuracy and latency."""
    tflite, float32_bytes, chosen = c.tflite, c.float32_bytes, c.chosen
    c.report["size"] = {
        "source_bytes": c.src.size_bytes,
        "float32_bytes": float32_bytes or len(tflite),
        "converted_bytes": len(tflite),
        "compression_ratio": len(tflite) / (float32_bytes or len(tflite)),
        "compressed_bytes": compressed_size(tflite),
    }
    c.report["chosen"] = chosen["label"]
    c.report["accuracy"] = {k: chosen.get(k) for k in ("metric", "accuracy", "reference_accuracy", "top1_agreement", "cosine", "max_abs_error", "drop_pts")}
    c.report["latency"] = chosen["latency"]


def _manifest(c: Conversion, name: str, golden_meta: dict[str, Any]) -> dict[str, Any]:
    o, src, info = c.options, c.src, c.info
    tf = tensorflow() if src.kind != "tflite" else None
    return {
        "name": name,
        "version": str(o.version),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"file": src.path.name, "kind": src.kind, "sha256": src.digest, "bytes": src.size_bytes},
        "target": o.target,
        "quantization": {**c.chosen_recipe.to_dict(), "label": c.chosen["label"],
                         "pruned_sparsity": c.prune_info and c.prune_info["achieved_sparsity"]},
        "model_file": bundle_mod.MODEL_NAME,
        "inputs": _input_entries(c),
        "outputs": [t.to_dict() for t in info.outputs],
        "ops": info.ops,
        "min_runtime_version": info.min_runtime_version,
        "golden": golden_meta,
        "latency_limit_ms": o.latency_limit_ms,
        "built_with": {
            "edgesdk": sdk.__version__,
            "tensorflow": getattr(tf, "__version__", None),
            "runtime": find_runtime().describe(),
        },
        "report": c.report,
    }


def golden_and_bundle(c: Conversion) -> None:
    o = c.options
    _summary(c)
    seed = int.from_bytes(hashlib.sha256(c.tflite).digest()[:4], "little")
    golden_meta, golden_blob = _golden(c.engine, c.info, input_ranges(c), o.golden_pairs, seed, o.target)
    c.files[bundle_mod.GOLDEN_NAME] = golden_blob
    manifest = _manifest(c, c.name, golden_meta)
    path = bundle_mod.write_bundle(o.output_path(manifest["name"]), manifest, c.files, private_key=c.key)
    c.bundle_path, c.manifest = path, sdk.Bundle.open(path).manifest
    c.report["bundle"] = {"path": str(path), "bytes": path.stat().st_size, "signed": c.key is not None}
    if o.report_dir:
        c.report["report_files"] = [str(p) for p in write_report_dir(c.report, Path(o.report_dir))]
