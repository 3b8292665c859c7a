"""Source kinds: one interface per kind of model the converter takes in.

A :class:`SourceKind` says whether it takes a model (``accepts``, decided without loading, so the
plan can be made first), loads it into a :class:`~converter.source.SourceModel`, gives the original
model's reference outputs, and converts it with a recipe. Kinds today: Keras (``.keras``, ``.h5``),
SavedModel (a directory) and TFLite (bundled as is).

A new source kind (PyTorch: ``converter/torch_source.py``) subclasses :class:`SourceKind` and is
added to :func:`source_kinds`; nothing else in the pipeline changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from sdk.dataset import Dataset
from sdk.errors import ConfigError, ConversionError, ModelLoadError, ModelNotFoundError, UnsupportedOpError
from sdk.runtime import DelegateOptions, open_engine

from . import source as source_mod
from .evaluation import run_engine
from .options import ConvertOptions
from .recipes import Recipe, convert_saved_model
from .source import SourceModel

__all__ = ["SourceKind", "KerasKind", "SavedModelKind", "TFLiteKind", "source_kinds", "kind_for"]


class SourceKind:
    """How one kind of source model is recognised, loaded, run for reference and converted."""

    name = "?"
    #: ``False`` for a model that is bundled as is (no recipes are tried).
    convertible = True
    #: ``True`` when the loaded model has Keras layers that ``--prune`` can prune.
    prunable = False

    def accepts(self, model: Any) -> bool:
        """Whether ``model`` (a path, or an in-memory object) is of this kind; must not load it."""
        raise NotImplementedError

    def load(self, model: Any, options: ConvertOptions) -> SourceModel:
        raise NotImplementedError

    def reference(self, src: SourceModel, data: Dataset, delegate: DelegateOptions) -> list[np.ndarray]:
        """The original model's outputs on ``data``: what every candidate is scored against."""
        return src.predict(data.xs)

    def convert(self, src: SourceModel, recipe: Recipe, calibration: Optional[Dataset]) -> bytes:
        """A ``.tflite`` of ``src`` made with ``recipe``. With a dynamic batch that the converter
        refuses, again with a static batch of 1 (and so every later recipe of ``src``)."""
        try:
            return convert_saved_model(src.saved_model_dir(), recipe, calibration)
        except (ConversionError, UnsupportedOpError) as exc:
            if not src.dynamic_batch:
                raise
            src.drop_dynamic_batch(exc)
            return convert_saved_model(src.saved_model_dir(), recipe, calibration)


def _path(model: Any) -> Optional[Path]:
    return Path(model) if isinstance(model, (str, Path)) or hasattr(model, "__fspath__") else None


class _FileKind(SourceKind):
    suffixes: tuple[str, ...] = ()

    def accepts(self, model: Any) -> bool:
        p = _path(model)
        return p is not None and p.is_file() and p.suffix.lower() in self.suffixes


class KerasKind(_FileKind):
    name, prunable, suffixes = "keras", True, (".keras", ".h5", ".hdf5")

    def load(self, model: Any, options: ConvertOptions) -> SourceModel:
        return source_mod._load_keras(Path(model), options.input_shapes,
                                      source_mod.wants_dynamic_batch(options.target, options.input_shapes))


class SavedModelKind(SourceKind):
    name = "saved_model"

    def accepts(self, model: Any) -> bool:
        p = _path(model)
        return p is not None and p.is_dir()

    def load(self, model: Any, options: ConvertOptions) -> SourceModel:
        p = Path(model)
        if not (p / "saved_model.pb").exists():
            raise ModelLoadError(f"{p} is a directory without saved_model.pb: pass a SavedModel directory or a model file")
        return source_mod._load_saved_model(p, options.signature, options.input_shapes,
                                            source_mod.wants_dynamic_batch(options.target, options.input_shapes))


class TFLiteKind(_FileKind):
    name, convertible, suffixes = "tflite", False, (".tflite",)

    def load(self, model: Any, options: ConvertOptions) -> SourceModel:
        if options.input_shapes:
            raise ConfigError("a .tflite model is bundled as is, with its own input shapes: drop --input-shape, or "
                              "pass the Keras/SavedModel source")
        return source_mod._load_tflite(Path(model))

    def reference(self, src: SourceModel, data: Dataset, delegate: DelegateOptions) -> list[np.ndarray]:
        return run_engine(open_engine(src.tflite_bytes, "cpu", delegate), data, outputs=src.outputs)


def source_kinds() -> list[SourceKind]:
    """Every kind the converter takes, asked in order.

    The PyTorch kind (``converter/torch_source.py``: an ``nn.Module`` with ``sample_inputs``, or a
    ``.pt2`` archive) goes here, imported lazily so that torch is only needed for torch models.
    """
    from .torch_source import TorchKind  # torch itself is imported only when a torch model is loaded

    return [KerasKind(), SavedModelKind(), TFLiteKind(), TorchKind()]


def kind_for(model: Any) -> SourceKind:
    """The kind that takes ``model``, or the error that says what to pass instead."""
    for kind in source_kinds():
        if kind.accepts(model):
            return kind
    p = _path(model)
    if p is None:
        raise ModelLoadError(f"cannot convert a {type(model).__name__}: pass a model file, a SavedModel directory or a torch nn.Module")
    if not p.exists():
        raise ModelNotFoundError(f"no model at {p}: check the path")
    raise ModelLoadError(f"{p}: unsupported model file; pass a .keras, .h5, .tflite, .pt2 file or a SavedModel directory")
