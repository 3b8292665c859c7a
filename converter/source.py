"""The model to convert: a Keras file (``.keras``, legacy Keras 2 ``.h5``), a SavedModel
directory, or an existing ``.tflite`` (analysed, measured and bundled as is).

This module is the boundary where TensorFlow and Keras load errors become
:class:`~sdk.errors.ModelLoadError` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from sdk.deps import require
from sdk.errors import ModelLoadError, ModelNotFoundError
from sdk.modelinfo import read_model_info
from sdk.native import native_stderr_to_log

from sdk.dataset import InputSpec

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["SourceModel", "load_source", "tensorflow", "keras"]


def tensorflow() -> Any:
    """Import TensorFlow quietly, or say which extra brings it."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_to_log(logging.getLogger("edgesdk.converter")):
        return require("tensorflow", "converter", "to convert models")


def keras() -> Any:
    tensorflow()
    return require("keras", "converter", "to load Keras models")


def _digest(path: Path) -> tuple[str, int]:
    """sha256 over a file, or over every file of a directory (relative path + bytes)."""
    h = hashlib.sha256()
    total = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        data = f.read_bytes()
        total += len(data)
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(data)
    return h.hexdigest(), total


@dataclass
class SourceModel:
    """A loaded source model and what the converter needs from it."""

    kind: str  # "keras" | "saved_model" | "tflite"
    path: Path
    digest: str
    size_bytes: int
    inputs: list[InputSpec]
    keras_model: Any = None
    tflite_bytes: Optional[bytes] = None
    _predict: Optional[Callable[[list[np.ndarray]], list[np.ndarray]]] = field(default=None, repr=False)
    _saved_model_dir: Optional[Path] = field(default=None, repr=False)
    _tmp: Any = field(default=None, repr=False)

    def predict(self, xs: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """The original model's float outputs for a batch (what quantization is judged against)."""
        if self._predict is None:
            raise ModelLoadError("this source model cannot be run for reference outputs")
        n = xs[0].shape[0]
        chunks = [self._predict([x[i : i + batch_size] for x in xs]) for i in range(0, n, batch_size)]
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]

    def saved_model_dir(self) -> Path:
        """A SavedModel with a static batch of 1, which every target (the Edge TPU first) needs."""
        if self._saved_model_dir is not None:
            return self._saved_model_dir
        if self.keras_model is None:
            raise ModelLoadError("no SavedModel for this source")
        self._saved_model_dir = export_keras(self.keras_model, self.inputs, self._tmpdir())
        return self._saved_model_dir

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgesdk-convert-")
        return Path(self._tmp.name)

    def with_keras_model(self, model: Any) -> "SourceModel":
        """A copy that converts ``model`` instead (e.g. the pruned model)."""
        return SourceModel(
            "keras", self.path, self.digest, self.size_bytes, self.inputs, keras_model=model,
            _predict=_keras_predict(model),
        )


def export_keras(model: Any, inputs: list[InputSpec], directory: Path) -> Path:
    tf = tensorflow()
    out = Path(tempfile.mkdtemp(prefix="saved_model_", dir=directory))
    specs = [tf.TensorSpec([1, *s.shape[1:]], s.dtype, name=s.name) for s in inputs]
    signature = specs if len(specs) == 1 else [specs]
    try:
        model.export(str(out), format="tf_saved_model", input_signature=signature, verbose=False)
    except Exception as exc:  # Keras raises a wide range of errors for untraceable models
        raise ModelLoadError(f"cannot export the Keras model for conversion: {exc}") from exc
    return out


def _keras_predict(model: Any) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    def predict(xs: list[np.ndarray]) -> list[np.ndarray]:
        out = model(xs[0] if len(xs) == 1 else xs, training=False)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [np.asarray(o) for o in outs]

    return predict


def _keras_inputs(model: Any) -> list[InputSpec]:
    specs = []
    for i, t in enumerate(model.inputs):
        shape = tuple(-1 if d is None else int(d) for d in t.shape)
        if any(d < 0 for d in shape[1:]):
            raise ModelLoadError(
                f"model input {i} has an unknown dimension {list(shape)}: rebuild it with a fixed input "
                "shape (keras.Input(shape=(...)))"
            )
        name = getattr(t, "name", f"input_{i}") or f"input_{i}"
        specs.append(InputSpec(str(name).split(":")[0], shape, str(np.dtype(getattr(t, "dtype", "float32")))))
    return specs


def _load_keras(path: Path) -> SourceModel:
    k = keras()
    try:
        model = k.models.load_model(str(path), compile=False)
    except Exception as exc:  # Keras/h5py raise ValueError, OSError, TypeError, KeyError...
        raise ModelLoadError(
            f"cannot load Keras model {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
            "is it a complete .keras or .h5 file saved with model.save()?"
        ) from exc
    digest, size = _digest(path)
    return SourceModel("keras", path, digest, size, _keras_inputs(model), keras_model=model, _predict=_keras_predict(model))


def _load_saved_model(path: Path) -> SourceModel:
    tf = tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
        fn = loaded.signatures["serving_default"]
    except KeyError as exc:
        raise ModelLoadError(f"SavedModel {path} has no 'serving_default' signature: export it with one") from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot load SavedModel {path}: {str(exc).splitlines()[0]}") from exc
    _, kwargs = fn.structured_input_signature
    names = sorted(kwargs)
    specs = []
    for name in names:
        spec = kwargs[name]
        shape = tuple(-1 if d is None else int(d) for d in spec.shape)
        if any(d < 0 for d in shape[1:]):
            raise ModelLoadError(f"SavedModel input {name!r} has unknown dimensions {list(shape)}: export with a fixed shape")
        specs.append(InputSpec(name, shape, spec.dtype.name))
    out_keys = sorted(fn.structured_outputs)

    def predict(xs: list[np.ndarray]) -> list[np.ndarray]:
        res = fn(**{n: tf.constant(x) for n, x in zip(names, xs)})
        return [res[k].numpy() for k in out_keys]

    digest, size = _digest(path)
    src = SourceModel("saved_model", path, digest, size, specs, _predict=predict)
    src._saved_model_dir = path
    src._keep = loaded  # keep the loaded object (and its variables) alive
    return src


def _load_tflite(path: Path) -> SourceModel:
    data = path.read_bytes()
    info = read_model_info(data)
    specs = [InputSpec(t.name, tuple(t.shape), "float32") for t in info.inputs]
    digest, size = _digest(path)
    return SourceModel("tflite", path, digest, size, specs, tflite_bytes=data)


def load_source(path: PathLike) -> SourceModel:
    """Load a model from a path; the kind is decided by what is there."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"no model at {p}: check the path")
    if p.is_dir():
        if not (p / "saved_model.pb").exists():
            raise ModelLoadError(f"{p} is a directory without saved_model.pb: pass a SavedModel directory or a model file")
        return _load_saved_model(p)
    suffix = p.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return _load_keras(p)
    if suffix == ".tflite":
        return _load_tflite(p)
    raise ModelLoadError(f"{p}: unsupported model file; pass a .keras, .h5, .tflite file or a SavedModel directory")
