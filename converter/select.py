"""The select step: the report of what was measured, each candidate checked against the accuracy
budget, and the one to ship: a fixed recipe must be within the budget; ``auto`` keeps the fastest
within it (p50 within 5 % counts as a tie, the smaller wins) or, with ``--optimize size``, the
smallest."""

from __future__ import annotations

from typing import Any

from sdk.errors import AccuracyBudgetExceeded, QuantizationError
from sdk.runtime import find_runtime

from .measure import MIN_MEASURE_SECONDS
from .recipes import Recipe
from .state import Conversion

LATENCY_TIE = 1.05  # candidates within 5 % of the fastest count as equally fast; the smaller wins

__all__ = ["select", "measured_report", "LATENCY_TIE"]


def measured_report(c: Conversion) -> dict[str, Any]:
    """The report's first part: source, settings, evaluation data, latency setup, candidates."""
    o, src, candidates = c.options, c.src, c.candidates
    first_ok = candidates and candidates[0]["status"] == "ok"
    return {
        "source": {"path": str(src.path), "kind": src.kind, "sha256": src.digest, "bytes": src.size_bytes,
                   **({"input_layout": src.layout} if getattr(src, "layout", None) else {})},
        "target": o.target,
        "quantize": o.quantize or "default",
        "optimize": o.optimize,
        "max_accuracy_drop": o.budget,
        "evaluation": {
            "data": c.eval_name,
            "samples": len(c.eval_set),
            "metric": candidates[0].get("metric") if first_ok else None,
            "reference_accuracy": next((r.get("reference_accuracy") for r in candidates if "reference_accuracy" in r), None),
        },
        "latency_setup": {"runtime": f"{find_runtime().name} {find_runtime().version}", "delegate": "cpu (XNNPACK)",
                          "threads": o.thread_count, "warmup": o.warmup, "runs": o.runs,
                          "min_seconds": MIN_MEASURE_SECONDS, "interleaved": True},
        "candidates": candidates,
        "notes": c.notes,
    }


def _pick(within: list[dict[str, Any]], optimize: str) -> dict[str, Any]:
    if optimize == "latency":
        fastest = min(r["latency"]["p50_ms"] for r in within)
        within = [r for r in within if r["latency"]["p50_ms"] <= fastest * LATENCY_TIE]
    return min(within, key=lambda r: (r["size_bytes"], r["latency"]["p50_ms"]))


def select(c: Conversion) -> None:
    o, budget = c.options, c.options.budget
    for row in c.candidates:
        if row["status"] == "ok":
            row["within_budget"] = budget is None or row["drop_pts"] <= budget + 1e-9
    requested = [r for r in c.candidates if r.get("role") == "requested"]
    c.report = measured_report(c)
    if o.target != "cpu":
        c.notes.append(f"latency measured on this machine's CPU (XNNPACK), not on the {o.target} target's accelerator")
    ok = [r for r in requested if r["status"] == "ok"]
    within = [r for r in ok if r["within_budget"]]
    if not within:
        if not ok:
            errors = "; ".join(f"{r['label']}: {r.get('error')}" for r in requested)
            raise QuantizationError(f"every recipe failed ({errors})")
        worst = ", ".join(f"{r['label']} drops {r['drop_pts']:.2f} pts" for r in ok)
        raise AccuracyBudgetExceeded(
            f"accuracy drop over the budget of {budget} pts ({worst}): raise --max-accuracy-drop, give better "
            "--calibration data, or use a less aggressive --quantize",
            report=c.report,
        )
    chosen = _pick(within, o.optimize)
    chosen["chosen"] = True
    c.chosen, c.chosen_recipe = chosen, Recipe(chosen["recipe"], chosen["io_dtype"])
    c.tflite, c.engine = c.built[c.chosen_recipe]
    if o.quantize == "auto":
        how = "fastest (p50 within 5 % counts as a tie, smaller wins)" if o.optimize == "latency" else "smallest"
        c.notes.append(f"auto: kept {chosen['label']}, the {how} of {len(within)} recipe(s) within {budget} pts")
