"""The prepare steps: change the model before it is converted (pruning, distillation into a
smaller student), and afterwards report what the change bought against the unchanged model."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sdk.errors import ConfigError
from sdk.latency import measure_interleaved

from .evaluation import score
from .measure import MIN_MEASURE_SECONDS, compressed_size, measure_candidate, timed_run
from .state import Conversion

__all__ = ["prune_label", "prune", "pruning_report_label", "pruning_report", "distill_label", "distill",
           "alone_label", "train_alone", "distillation_report_label", "distillation_report"]


def prune_label(c: Conversion) -> str:
    o = c.options
    return f"prune to {o.prune:.0%}" + (f", fine-tune {o.epochs} epochs" if o.epochs else "")


def prune(c: Conversion) -> None:
    """Magnitude-prune the Keras model (fine-tuning it on --train for --epochs)."""
    if not c.kind.prunable:
        raise ConfigError("--prune needs a Keras model (.keras or .h5): a SavedModel or .tflite has no layers to prune")
    from .pruning import prune_model

    result = prune_model(c.conv_src.keras_model, c.options.prune, train=c.train, epochs=c.options.epochs)
    c.conv_src = c.conv_src.with_keras_model(result.model)
    c.prune_info = result.to_dict()


def pruning_report_label(c: Conversion) -> str:
    return f"measure {c.chosen_recipe.label} without pruning"


def pruning_report(c: Conversion) -> None:
    """The chosen recipe applied to the unpruned model: sizes before and after pruning."""
    unpruned = c.kind.convert(c.src, c.chosen_recipe, c.calibration)
    c.prune_info.update(
        recipe=c.chosen["label"],
        tflite_bytes_before=len(unpruned),
        tflite_bytes_after=len(c.tflite),
        compressed_bytes_before=compressed_size(unpruned),
        compressed_bytes_after=compressed_size(c.tflite),
    )
    c.report["pruning"] = c.prune_info


def distill_label(c: Conversion) -> str:
    return f"distil into {c.options.distill_into} ({c.options.distill_epochs} epochs)"


def _float_quality(c: Conversion, outputs: list[np.ndarray]) -> dict[str, Any]:
    """A float model's quality on the evaluation data: accuracy with labels, else top-1 agreement
    with the teacher."""
    q = score(c.teacher_reference, outputs, c.eval_set.y)
    return {k: q[k] for k in ("accuracy", "top1_agreement") if k in q}


def distill(c: Conversion) -> None:
    """Train the student on the teacher and the labels; it becomes the model converted, and its
    float outputs the reference quantization is judged against."""
    from . import distill as d

    o = c.options
    if c.conv_src is None or c.conv_src.keras_model is None:
        raise ConfigError("--distill-into needs a Keras teacher (.keras or .h5): a SavedModel, .tflite or torch model "
                          "has no Keras model to distil from")
    teacher = c.conv_src.keras_model
    student_src = d.load_student(o.distill_into, c.conv_src)
    result = d.distill(teacher, student_src.keras_model, c.train, epochs=o.distill_epochs,
                       temperature=o.temperature, alpha=o.alpha)
    c.teacher_reference = c.reference
    c.conv_src = c.src.with_keras_model(result.model)  # the teacher's input names, so the data still matches
    c.reference = c.conv_src.predict(c.eval_set.xs)
    n, n_student = d.param_count(teacher), d.param_count(result.model)
    c.distill_info = {
        "temperature": o.temperature, "alpha": o.alpha, "epochs": result.epochs, "train_samples": len(c.train),
        "loss": result.loss,
        "teacher": {"file": str(c.src.path), "params": n, "file_bytes": c.src.size_bytes,
                    "float": _float_quality(c, c.teacher_reference)},
        "student": {"file": str(student_src.path), "params": n_student, "file_bytes": student_src.size_bytes,
                    "float": _float_quality(c, c.reference)},
        "param_ratio": n_student / n,
    }


def alone_label(c: Conversion) -> str:
    return f"train the student alone ({c.options.distill_epochs} epochs)"


def train_alone(c: Conversion) -> None:
    """The same student, from the same initial weights, trained on the labels alone."""
    from . import distill as d

    student = d.load_student(c.options.distill_into, c.src).keras_model
    result = d.train_alone(student, c.train, epochs=c.options.distill_epochs)
    alone = c.src.with_keras_model(result.model).predict(c.eval_set.xs)
    c.distill_info["alone"] = {"loss": result.loss, "float": _float_quality(c, alone)}


def distillation_report_label(c: Conversion) -> str:
    return f"measure the teacher with {c.chosen_recipe.label}"


def _gain(info: dict[str, Any]) -> Optional[float]:
    """Points of float accuracy (or agreement) distillation bought over training alone."""
    if "alone" not in info:
        return None
    key = "accuracy" if "accuracy" in info["student"]["float"] else "top1_agreement"
    return 100.0 * (info["student"]["float"][key] - info["alone"]["float"][key])


def distillation_report(c: Conversion) -> None:
    """Teacher and student side by side: the teacher converted with the chosen recipe, sizes and
    quality of both, and their p50 measured together, interleaved."""
    o, info = c.options, c.distill_info
    teacher_tfl = c.kind.convert(c.src, c.chosen_recipe, c.calibration)
    row, teacher_engine = measure_candidate(c.chosen_recipe, teacher_tfl, c.eval_set, c.teacher_reference, c.delegate,
                                            None, c.src.outputs)
    stats = measure_interleaved({"teacher": timed_run(teacher_engine, c.eval_set), "student": timed_run(c.engine, c.eval_set)},
                                warmup=o.warmup, runs=o.runs, min_seconds=MIN_MEASURE_SECONDS)
    converted = {"teacher": (teacher_tfl, row), "student": (c.tflite, c.chosen)}
    for who, (tfl, measured) in converted.items():
        info[who].update(tflite_bytes=len(tfl), compressed_bytes=compressed_size(tfl), p50_ms=stats[who].to_dict()["p50_ms"],
                         converted={k: measured[k] for k in ("accuracy", "top1_agreement") if k in measured})
    info.update(recipe=c.chosen["label"], size_ratio=len(c.tflite) / len(teacher_tfl), gain_over_alone_pts=_gain(info))
    c.report["distillation"] = info
