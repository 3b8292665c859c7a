"""The measure steps: a candidate's size and quality against the original (each on LiteRT, as
devices run it), then every candidate's latency, measured together and interleaved."""

from __future__ import annotations

import zlib
from typing import Any, Callable, Optional

import numpy as np

from sdk.dataset import Dataset
from sdk.latency import measure_interleaved
from sdk.runtime import DelegateOptions, Engine, open_engine, quantize as quantize_array

from .evaluation import engine_sample, run_engine, score
from .recipes import Recipe
from .state import Conversion

MIN_MEASURE_SECONDS = 0.5

__all__ = ["compressed_size", "measure_candidate", "timed_run", "measure_latencies", "MIN_MEASURE_SECONDS"]


def compressed_size(model: bytes) -> int:
    """Bytes after zlib level 9: what pruning's zeros save in a (compressed) bundle."""
    return len(zlib.compress(model, 9))


def measure_candidate(
    recipe: Recipe,
    model: bytes,
    eval_set: Dataset,
    reference: list[np.ndarray],
    opts: DelegateOptions,
    float32_bytes: Optional[int],
    output_names: Optional[list[str]] = None,
) -> tuple[dict[str, Any], Engine]:
    """Convert-side figures of one candidate: size and quality (latency is measured afterwards,
    for all candidates together, by :func:`measure_latencies`)."""
    engine = open_engine(model, "cpu", opts)
    outputs = run_engine(engine, eval_set, outputs=output_names)
    quality = score(reference, outputs, eval_set.y)
    row = {
        **recipe.to_dict(),
        "label": recipe.label,
        "status": "ok",
        "size_bytes": len(model),
        "compressed_bytes": compressed_size(model),
        "ratio_to_float32": (len(model) / float32_bytes) if float32_bytes else None,
        **quality,
    }
    return row, engine


def timed_run(engine: Engine, data: Dataset) -> Callable[[], Any]:
    """One inference of ``engine`` on the first sample of ``data`` (quantized beforehand, as the
    agent does), as a function to time."""
    sample = [quantize_array(x, spec) for x, spec in zip(engine_sample(engine, data, 0), engine.inputs)]
    return lambda: engine.run(sample)


def measure_latencies(c: Conversion) -> None:
    """p50/p99 of every built candidate, measured round-robin on the first evaluation sample."""
    for row in c.candidates:
        if c.float32_bytes and row.get("size_bytes"):
            row["ratio_to_float32"] = row["size_bytes"] / c.float32_bytes
    fns = {}
    for row in c.candidates:
        if row["status"] != "ok":
            continue
        _, engine = c.built[Recipe(row["recipe"], row["io_dtype"])]
        fns[row["label"]] = timed_run(engine, c.eval_set)
    o = c.options
    stats = measure_interleaved(fns, warmup=o.warmup, runs=o.runs, min_seconds=MIN_MEASURE_SECONDS)
    for row in c.candidates:
        if row["label"] in stats:
            row["latency"] = stats[row["label"]].to_dict()
