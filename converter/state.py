"""``Conversion``: the working state one conversion's steps hand to each other.

Each step of the plan (``converter/plan.py``) reads what earlier steps left here and adds its own
part; the fields are grouped by the step that fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from sdk.dataset import Dataset
from sdk.modelinfo import ModelInfo
from sdk.runtime import DelegateOptions, Engine

from .options import ConvertOptions
from .recipes import Recipe
from .source import SourceModel

if TYPE_CHECKING:  # pragma: no cover
    from .loaders import SourceKind

__all__ = ["Conversion"]


@dataclass
class Conversion:
    model: Any
    options: ConvertOptions
    kind: "SourceKind"
    recipes: list[Recipe]  # what the user asked for (auto: every candidate)
    to_convert: list[Recipe]  # recipes plus the float32 baseline
    delegate: DelegateOptions
    name: str  # the model's name in the manifest
    key: Any = None
    notes: list[str] = field(default_factory=list)
    # load
    src: Optional[SourceModel] = None
    calibration: Optional[Dataset] = None
    train: Optional[Dataset] = None
    eval_set: Optional[Dataset] = None
    eval_name: str = ""
    value_ranges: list[tuple[float, float]] = field(default_factory=list)
    reference: list[np.ndarray] = field(default_factory=list)
    # prepare: the model that is converted (pruned, distilled) and what preparing it did
    conv_src: Optional[SourceModel] = None
    prune_info: Optional[dict[str, Any]] = None
    distill_info: Optional[dict[str, Any]] = None  # teacher and student side by side (report["distillation"])
    teacher_reference: list[np.ndarray] = field(default_factory=list)  # the teacher's outputs, once distilled
    # convert and measure
    candidates: list[dict[str, Any]] = field(default_factory=list)
    built: dict[Recipe, tuple[bytes, Engine]] = field(default_factory=dict)
    float32_bytes: Optional[int] = None
    # select
    report: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    chosen_recipe: Optional[Recipe] = None
    tflite: bytes = b""
    engine: Optional[Engine] = None
    # package
    info: Optional[ModelInfo] = None
    files: dict[str, bytes] = field(default_factory=dict)
    bundle_path: Optional[Path] = None
    manifest: Any = None
