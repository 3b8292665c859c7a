"""What quantization cost: accuracy against labels, or agreement with the original model.

* Classifier (one (batch, classes) output that sums to 1, or integer labels given) with labels: top-1 accuracy; the drop
  is measured in points against the original model's accuracy on the same samples.
* Classifier without labels: top-1 agreement with the original model; drop = 100 - agreement %.
* Anything else: mean cosine similarity and max absolute error against the original model's
  outputs; drop = 100 * (1 - cosine).

The converted model runs on the same runtime the devices use (LiteRT), sample by sample, with
float inputs quantized exactly as the agent quantizes them. Its inputs and outputs are matched to
the original model's by signature name: TFLite orders a signature's tensors its own way.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from sdk.dataset import Dataset
from sdk.errors import ConversionError, ModelLoadError
from sdk.modelinfo import match_names
from sdk.runtime import Engine

__all__ = ["run_engine", "engine_sample", "input_order", "score", "is_classifier"]


def input_order(engine: Engine, data: Dataset) -> list[int]:
    """For each of the engine's inputs, the index of the data array that feeds it: by name when the
    data knows its inputs' names, else by position."""
    if not data.names:
        return list(range(len(engine.inputs)))
    return _translate(lambda: _inverse(match_names(data.names, engine.inputs, "input")))


def _inverse(positions: list[int]) -> list[int]:
    order = [0] * len(positions)
    for data_index, engine_index in enumerate(positions):
        order[engine_index] = data_index
    return order


def _translate(fn: Callable[[], list[int]]) -> list[int]:
    try:
        return fn()
    except ModelLoadError as exc:
        raise ConversionError(f"the converted model's signature does not match the original's: {exc}") from exc


def engine_sample(engine: Engine, data: Dataset, i: int, order: Optional[list[int]] = None) -> list[np.ndarray]:
    """Sample ``i`` (a batch of one) as the engine takes it: its inputs in the engine's order."""
    sample = data.sample(i)
    return [sample[j] for j in (order if order is not None else input_order(engine, data))]


def run_engine(engine: Engine, data: Dataset, progress: Optional[Callable[[], None]] = None,
               outputs: Optional[Sequence[str]] = None) -> list[np.ndarray]:
    """Outputs of ``engine`` for every sample (float, dequantized), stacked per output: in the
    order of the names in ``outputs`` (the original model's), else in the engine's own order.
    Inputs and outputs are matched by their signature names (TFLite orders them its own way)."""
    order = input_order(engine, data)
    select = _translate(lambda: match_names(outputs, engine.outputs)) if outputs else list(range(len(engine.outputs)))
    outs: list[list[np.ndarray]] = [[] for _ in select]
    for i in range(len(data)):
        ys = engine.run_float(engine_sample(engine, data, i, order))
        for k, j in enumerate(select):
            y = ys[j]
            outs[k].append(np.asarray(y, dtype=np.float32).reshape(y.shape[1:] if y.shape[:1] == (1,) else y.shape))
        if progress:
            progress()
    return [np.stack(o) for o in outs]


def is_classifier(outputs: Sequence[np.ndarray], labels: Optional[np.ndarray] = None) -> bool:
    """One (batch, classes) output that is a probability vector, or is scored against integer labels."""
    if len(outputs) != 1 or outputs[0].ndim != 2 or outputs[0].shape[1] < 2:
        return False
    if labels is not None and np.issubdtype(np.asarray(labels).dtype, np.integer):
        return True
    out = outputs[0]
    return bool(np.all(out >= -1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    sims = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.all(a == b, axis=1), 1.0, 0.0))
    return float(np.mean(sims))


def score(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], labels: Optional[np.ndarray]) -> dict[str, Any]:
    """Compare a candidate's outputs with the original's (and with labels when there are any)."""
    result: dict[str, Any] = {"samples": int(reference[0].shape[0])}
    if len(reference) != len(candidate):
        raise ConversionError(f"the converted model has {len(candidate)} outputs, the original {len(reference)}")
    for j, (r, c) in enumerate(zip(reference, candidate)):
        if r.size != c.size:
            raise ConversionError(f"output {j}: the converted model gives shape {list(c.shape)}, the original "
                                  f"{list(r.shape)}: convert with the same input shapes (--input-shape)")
    max_err = max(float(np.max(np.abs(r.reshape(c.shape) - c))) for r, c in zip(reference, candidate))
    result["max_abs_error"] = max_err
    result["cosine"] = float(np.mean([_cosine(r, c) for r, c in zip(reference, candidate)]))
    if is_classifier(reference, labels):
        ref_top, cand_top = np.argmax(reference[0], axis=1), np.argmax(candidate[0], axis=1)
        result["metric"] = "accuracy" if labels is not None else "top1_agreement"
        result["top1_agreement"] = float(np.mean(ref_top == cand_top))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            result["reference_accuracy"] = float(np.mean(ref_top == labels))
            result["accuracy"] = float(np.mean(cand_top == labels))
            result["drop_pts"] = 100.0 * (result["reference_accuracy"] - result["accuracy"])
        else:
            result["drop_pts"] = 100.0 * (1.0 - result["top1_agreement"])
    else:
        result["metric"] = "cosine"
        result["drop_pts"] = 100.0 * (1.0 - result["cosine"])
        if len(reference) == 1 and reference[0].ndim == 2 and reference[0].shape[1] > 1:  # logits: informative
            result["top1_agreement"] = float(np.mean(np.argmax(reference[0], 1) == np.argmax(candidate[0], 1)))
    return result
