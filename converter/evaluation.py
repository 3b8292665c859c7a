"""What quantization cost: accuracy against labels, or agreement with the original model.

* Classifier (one (batch, classes) output that sums to 1, or integer labels given) with labels: top-1 accuracy; the drop
  is measured in points against the original model's accuracy on the same samples.
* Classifier without labels: top-1 agreement with the original model; drop = 100 - agreement %.
* Anything else: mean cosine similarity and max absolute error against the original model's
  outputs; drop = 100 * (1 - cosine).

The converted model runs on the same runtime the devices use (LiteRT), sample by sample, with
float inputs quantized exactly as the agent quantizes them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from sdk.runtime import Engine

from sdk.dataset import Dataset

__all__ = ["run_engine", "score", "is_classifier"]


def run_engine(engine: Engine, data: Dataset, progress: Optional[Callable[[], None]] = None) -> list[np.ndarray]:
    """Outputs of ``engine`` for every sample (float, dequantized), stacked per output."""
    outs: list[list[np.ndarray]] = [[] for _ in engine.outputs]
    for i in range(len(data)):
        for j, y in enumerate(engine.run_float(data.sample(i))):
            outs[j].append(np.asarray(y, dtype=np.float32).reshape(y.shape[1:] if y.shape[:1] == (1,) else y.shape))
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
