"""The convert steps: which recipes a conversion tries (always beside a float32 baseline), and
each recipe's conversion with its size and quality measured."""

from __future__ import annotations

from typing import Any

from sdk.errors import ConfigError, EdgeSdkError, UnsupportedOpError
from sdk.modelinfo import read_model_info

from .measure import measure_candidate
from .options import ConvertOptions
from .recipes import Recipe, candidate_recipes, check_calibratable, default_recipe
from .state import Conversion

BASELINE = Recipe("none")
AS_IS = Recipe("as-is")

__all__ = ["BASELINE", "AS_IS", "requested_recipes", "with_baseline", "measure_as_is", "convert_recipe"]


def requested_recipes(o: ConvertOptions, convertible: bool) -> list[Recipe]:
    """The recipes asked for: the target's default, a fixed one, or every ``auto`` candidate."""
    has_calibration = o.calibration is not None
    if not convertible:
        if o.quantize is not None or o.prune:
            raise ConfigError("a .tflite model is bundled as is: drop --quantize/--prune, or pass the Keras/SavedModel source")
        return []
    if o.quantize == "auto":
        return candidate_recipes(o.target, has_calibration, o.io_dtype)
    if o.quantize is None:
        return [default_recipe(o.target, has_calibration, o.io_dtype)]
    int_io = o.io_dtype or ("uint8" if o.target == "edgetpu" else "int8")
    return [Recipe(o.quantize, int_io if o.quantize == "int8" else "float32")]


def with_baseline(recipes: list[Recipe]) -> list[Recipe]:
    """What is converted: the requested recipes, preceded by float32 unless it is among them."""
    if not recipes:
        return []
    return recipes if BASELINE in recipes else [BASELINE] + recipes


def measure_as_is(c: Conversion) -> None:
    """An existing .tflite: measured and offered as the one candidate."""
    tfl = c.src.tflite_bytes
    info = read_model_info(tfl)
    label = "as-is (" + ", ".join(sorted({t.dtype for t in info.inputs})) + " I/O)"
    row, engine = measure_candidate(AS_IS, tfl, c.eval_set, c.reference, c.delegate, None, c.src.outputs)
    row.update(label=label, role="requested")
    c.candidates.append(row)
    c.built[AS_IS] = (tfl, engine)


def convert_recipe(c: Conversion, recipe: Recipe) -> None:
    """Convert with ``recipe`` and measure it; with ``auto`` (or for the baseline) a failure is a
    row of the report, not the end of the conversion."""
    role = "requested" if recipe in c.recipes else "baseline"
    try:
        baseline = c.built.get(BASELINE)
        check_calibratable(recipe, baseline[0] if baseline else None)
        tfl = c.kind.convert(c.conv_src, recipe, c.calibration)
        row, engine = measure_candidate(recipe, tfl, c.eval_set, c.reference, c.delegate, c.float32_bytes, c.src.outputs)
    except UnsupportedOpError:
        raise
    except EdgeSdkError as exc:
        if c.options.quantize != "auto" and role == "requested":
            raise
        failed: dict[str, Any] = {**recipe.to_dict(), "label": recipe.label, "status": "failed", "error": str(exc), "role": role}
        c.candidates.append(failed)
        return
    if recipe == BASELINE:
        c.float32_bytes = len(tfl)
    row["role"] = role
    c.candidates.append(row)
    c.built[recipe] = (tfl, engine)
