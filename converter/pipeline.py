"""``convert()``: from a Keras / SavedModel / TFLite model to a signed, measured bundle.

The keywords become one :class:`~converter.options.ConvertOptions` (checked once); the model's
:class:`~converter.loaders.SourceKind` is found without loading it; then the plan
(:func:`~converter.plan.build_plan`) runs its steps on one :class:`~converter.state.Conversion`:
load the model and data → prepare it (prune, or distil it into a student) → convert every recipe
to try (always with a float32 baseline) → measure each on LiteRT, as devices run it → select (a
fixed recipe is checked against the budget; ``auto`` keeps the best within it by latency or size)
→ package (op placement for cpu/gpu/edgetpu, the Edge TPU compilation if asked, golden outputs,
the signed bundle).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import sdk
from sdk.runtime import DelegateOptions
from sdk.signing import load_private_key

from .candidates import requested_recipes, with_baseline
from .loaders import kind_for
from .options import OPTIMIZE, QUANTIZE_MODES, TARGETS, ConvertOptions, Progress
from .plan import build_plan, run_plan
from .report import render_table
from .state import Conversion

__all__ = ["convert", "ConversionResult", "ConvertOptions", "Progress", "TARGETS", "QUANTIZE_MODES", "OPTIMIZE",
           "default_model_name"]


@dataclass
class ConversionResult:
    """What :func:`convert` returns: the report (also in the manifest) and where the bundle is."""

    report: dict[str, Any]
    bundle_path: Path
    manifest: sdk.Manifest
    model: bytes

    def table(self) -> str:
        return render_table(self.report)


def default_model_name(path: Path) -> str:
    """The model name a bundle gets when none is given: the file's stem as an id (``my model.h5``
    becomes ``my-model``), since the name travels in messages and names directories on devices."""
    stem = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:128] or "model"


def _default_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return default_model_name(Path(model))
    return "model"  # an in-memory model (e.g. a PyTorch module) has no file name to go by


def start(model: Any, options: ConvertOptions) -> Conversion:
    """The checked options, the model's kind and the recipes to try: everything the plan needs."""
    options.validate()
    name = options.name or _default_name(model)
    key = load_private_key(options.key) if isinstance(options.key, (str, os.PathLike)) else options.key
    kind = kind_for(model)
    recipes = requested_recipes(options, kind.convertible)
    return Conversion(model=model, options=options, kind=kind, recipes=recipes, to_convert=with_baseline(recipes),
                      delegate=DelegateOptions(num_threads=options.thread_count), name=name, key=key)


def convert(model: Any, options: Optional[ConvertOptions] = None, **kwargs: Any) -> ConversionResult:
    """Convert ``model`` and write a bundle. The keywords are the fields of
    :class:`~converter.options.ConvertOptions` (or pass one as ``options``); see ``edgesdk convert --help``."""
    if options is not None and kwargs:
        raise TypeError("convert(): pass either options= or keywords, not both")
    opts = options if options is not None else ConvertOptions(**kwargs)
    state = start(model, opts)
    run_plan(build_plan(state), state, opts.progress)
    return ConversionResult(state.report, state.bundle_path, state.manifest, state.tflite)
