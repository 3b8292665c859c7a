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
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from sdk.deps import require
from sdk.errors import ModelLoadError
from sdk.modelinfo import read_model_info
from sdk.native import native_stderr_to_log

from sdk.dataset import InputSpec

PathLike = Union[str, "os.PathLike[str]"]

log = logging.getLogger("edgesdk.converter")

__all__ = ["SourceModel", "load_source", "tensorflow", "keras", "fixed_input_specs", "keras_output_names", "DEFAULT_SIGNATURE",
           "DYNAMIC_BATCH_TARGETS", "wants_dynamic_batch"]


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
    #: the names of the outputs :meth:`predict` returns, in its order (the signature's names: a
    #: converted model's outputs are matched to them by name, never by position)
    outputs: list[str] = field(default_factory=list)
    #: whether the SavedModel given to the TFLite converter keeps the source's unknown batch
    #: dimension (``shape_signature`` -1, ``shape`` 1: devices resize it and run a whole task in one
    #: ``invoke``); ``inputs`` stay batch 1 either way, which is what everything measured here uses
    dynamic_batch: bool = False
    #: makes that SavedModel: ``_export(dynamic_batch)`` (None: the source has none to make)
    _export: Optional[Callable[[bool], Path]] = field(default=None, repr=False)

    def predict(self, xs: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """The original model's float outputs for a batch (what quantization is judged against)."""
        if self._predict is None:
            raise ModelLoadError("this source model cannot be run for reference outputs")
        n = xs[0].shape[0]
        chunks = [self._predict([x[i : i + batch_size] for x in xs]) for i in range(0, n, batch_size)]
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]

    def saved_model_dir(self) -> Path:
        """The SavedModel to convert: every input shape fixed, except the batch dimension when
        :attr:`dynamic_batch` (the Edge TPU, and ``--input-shape``, get a static batch of 1). A
        model that cannot be exported with a dynamic batch gets a static one instead."""
        if self._saved_model_dir is not None:
            return self._saved_model_dir
        if self._export is None:
            raise ModelLoadError("no SavedModel for this source")
        try:
            self._saved_model_dir = self._export(self.dynamic_batch)
        except ModelLoadError as exc:
            if not self.dynamic_batch:
                raise
            self.drop_dynamic_batch(exc)
            self._saved_model_dir = self._export(False)
        return self._saved_model_dir

    def drop_dynamic_batch(self, why: Exception) -> None:
        """Convert with a static batch of 1 from now on (``why``: what the dynamic batch broke)."""
        log.info("a dynamic batch does not convert (%s): converting with a static batch of 1",
                 str(why).splitlines()[0] if str(why) else type(why).__name__)
        self.dynamic_batch = False
        self._saved_model_dir = None

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgesdk-convert-")
        return Path(self._tmp.name)

    def with_keras_model(self, model: Any) -> "SourceModel":
        """A copy that converts ``model`` instead (e.g. the pruned model)."""
        return _keras_source(self.path, self.digest, self.size_bytes, self.inputs, model, self.dynamic_batch)


def _keras_source(path: Path, digest: str, size: int, inputs: list[InputSpec], model: Any, dynamic_batch: bool) -> SourceModel:
    src = SourceModel("keras", path, digest, size, inputs, keras_model=model, _predict=_keras_predict(model),
                      outputs=keras_output_names(model), dynamic_batch=dynamic_batch)
    src._export = lambda dynamic: export_keras(model, inputs, src._tmpdir(), dynamic)
    return src


#: the targets whose bundles keep a source's unknown batch dimension dynamic. Not the Edge TPU
#: (its compiler needs static shapes), nor the GPU: with an unknown batch, TensorFlow lowers a
#: Flatten/Reshape to SHAPE + STRIDED_SLICE + PACK + a computed RESHAPE, which the GPU delegate does
#: not take (the digits CNN goes from fully mapped to split around a CPU op), and the GPU engine
#: (LiteRT's CompiledModel) runs one sample at a time anyway.
DYNAMIC_BATCH_TARGETS = ("cpu",)


def wants_dynamic_batch(target: str, shapes: "Shapes") -> bool:
    """Whether a conversion for ``target`` keeps an unknown batch dynamic: not for the Edge TPU,
    and not when ``--input-shape`` fixes the shapes (the batch included)."""
    return target in DYNAMIC_BATCH_TARGETS and not shapes


def _unknown_batch(raw: Sequence[tuple[str, Sequence[Optional[int]], str]]) -> bool:
    """Every input has a batch dimension, and it is unknown in the source (None or -1)."""
    return bool(raw) and all(len(shape) >= 1 and (shape[0] is None or int(shape[0]) < 0) for _, shape, _ in raw)


def _specs(inputs: list[InputSpec], dynamic_batch: bool) -> list[Any]:
    """TensorSpecs for ``inputs`` (batch 1), the batch unknown when ``dynamic_batch``."""
    tf = tensorflow()
    return [tf.TensorSpec((None, *s.shape[1:]) if dynamic_batch else s.shape, s.dtype, name=s.name) for s in inputs]


def export_keras(model: Any, inputs: list[InputSpec], directory: Path, dynamic_batch: bool = False) -> Path:
    """``model`` as a SavedModel with ``inputs``' shapes (their batch unknown when ``dynamic_batch``)."""
    out = Path(tempfile.mkdtemp(prefix="saved_model_", dir=directory))
    specs = _specs(inputs, dynamic_batch)
    signature = specs if len(specs) == 1 else [specs]
    try:
        model.export(str(out), format="tf_saved_model", input_signature=signature, verbose=False)
    except Exception as exc:  # Keras raises a wide range of errors for untraceable models
        raise ModelLoadError(f"cannot export the Keras model for conversion: {exc}") from exc
    return out


def keras_output_names(model: Any) -> list[str]:
    """The names a Keras model's outputs get in its exported signature: the keys of a dict of
    outputs, else ``output_0``, ``output_1``... in the model's order."""
    out = model.output if hasattr(model, "output") else None
    if isinstance(out, dict):
        return [str(k) for k in out]
    count = len(model.outputs) if getattr(model, "outputs", None) is not None else 1
    return [f"output_{i}" for i in range(count)]


def _keras_predict(model: Any) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    names = keras_output_names(model)

    def predict(xs: list[np.ndarray]) -> list[np.ndarray]:
        out = model(xs[0] if len(xs) == 1 else xs, training=False)
        if isinstance(out, dict):
            return [np.asarray(out[n]) for n in names]
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [np.asarray(o) for o in outs]

    return predict


Shapes = Optional[Mapping[str, Sequence[int]]]


def fixed_input_specs(raw: Sequence[tuple[str, Sequence[Optional[int]], str]], shapes: Shapes, where: str) -> list[InputSpec]:
    """Input specs with every dimension known: ``shapes`` (``--input-shape NAME=1,43844,1``) fixes
    an input's whole shape, an unknown batch becomes 1, and any other unknown dimension is an
    error that names every one of them and the option that fixes it."""
    shapes = dict(shapes or {})
    names = [name for name, _, _ in raw]
    unknown_names = sorted(set(shapes) - set(names))
    if unknown_names:
        raise ModelLoadError(f"--input-shape names {', '.join(unknown_names)}, but the {where} inputs are {', '.join(names)}")
    specs, open_dims = [], []
    for name, shape, dtype in raw:
        dims = [-1 if d is None or int(d) < 0 else int(d) for d in shape]
        if name in shapes:
            given = [int(d) for d in shapes[name]]
            if len(given) != len(dims) or any(d > 0 and g != d for g, d in zip(given, dims)) or any(g < 1 for g in given):
                raise ModelLoadError(f"--input-shape {name}={','.join(map(str, given))} does not fit the {where} input "
                                     f"{name!r} of shape {dims} (-1: unknown)")
            dims = given
        elif dims and dims[0] < 0:
            dims[0] = 1
        missing = [i for i, d in enumerate(dims) if d < 0]
        if missing:
            open_dims.append(f"{name!r} {dims} (dimension {', '.join(map(str, missing))})")
        specs.append(InputSpec(name, tuple(dims), dtype))
    if open_dims:
        example = next(s for s in specs if any(d < 0 for d in s.shape))
        fix = ",".join("N" if d < 0 else str(d) for d in example.shape)
        raise ModelLoadError(f"the {where} has inputs of unknown size: {'; '.join(open_dims)}: fix each with "
                             f"--input-shape NAME=DIMS (e.g. --input-shape {example.name}={fix})")
    return specs


def _keras_raw_inputs(model: Any) -> list[tuple[str, tuple[Optional[int], ...], str]]:
    raw = []
    for i, t in enumerate(model.inputs):
        name = str(getattr(t, "name", f"input_{i}") or f"input_{i}").split(":")[0]
        raw.append((name, tuple(t.shape), str(np.dtype(getattr(t, "dtype", "float32")))))
    return raw


def _keras_inputs(model: Any, shapes: Shapes = None) -> list[InputSpec]:
    return fixed_input_specs(_keras_raw_inputs(model), shapes, "Keras model")


def _load_keras(path: Path, shapes: Shapes = None, dynamic_batch: bool = False) -> SourceModel:
    """A Keras file; ``dynamic_batch``: keep its unknown batch dimension (if every input has one)
    in the converted model."""
    k = keras()
    try:
        model = k.models.load_model(str(path), compile=False)
    except Exception as exc:  # Keras/h5py raise ValueError, OSError, TypeError, KeyError...
        raise ModelLoadError(
            f"cannot load Keras model {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
            "is it a complete .keras or .h5 file saved with model.save()?"
        ) from exc
    digest, size = _digest(path)
    raw = _keras_raw_inputs(model)
    specs = fixed_input_specs(raw, shapes, "Keras model")
    return _keras_source(path, digest, size, specs, model, dynamic_batch and not shapes and _unknown_batch(raw))


DEFAULT_SIGNATURE = "serving_default"


def _load_saved_model(path: Path, signature: Optional[str] = None, shapes: Shapes = None,
                      dynamic_batch: bool = False) -> SourceModel:
    """A SavedModel's signature; ``dynamic_batch`` as for :func:`_load_keras`."""
    tf = tensorflow()
    signature = signature or DEFAULT_SIGNATURE
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load SavedModel {path}: {str(exc).splitlines()[0]}") from exc
    if signature not in loaded.signatures:
        have = ", ".join(sorted(loaded.signatures)) or "none"
        raise ModelLoadError(f"SavedModel {path} has no signature {signature!r} (its signatures: {have}): "
                             "pick one with --signature NAME, or export the model with a serving signature")
    fn = loaded.signatures[signature]
    _, kwargs = fn.structured_input_signature
    names = sorted(kwargs)
    raw = [(n, tuple(kwargs[n].shape.as_list() if kwargs[n].shape.rank is not None else []), kwargs[n].dtype.name)
           for n in names]
    specs = fixed_input_specs(raw, shapes, f"SavedModel signature {signature!r}")
    out_keys = sorted(fn.structured_outputs)

    def predict(xs: list[np.ndarray]) -> list[np.ndarray]:
        res = fn(**{n: tf.constant(x) for n, x in zip(names, xs)})
        return [res[k].numpy() for k in out_keys]

    digest, size = _digest(path)
    dynamic = dynamic_batch and not shapes and _unknown_batch(raw)
    src = SourceModel("saved_model", path, digest, size, specs, _predict=predict, outputs=out_keys, dynamic_batch=dynamic)

    def export(dynamic: bool) -> Path:
        # the directory as it is when its signature already has exactly the shapes wanted
        wanted = [(None, *s.shape[1:]) if dynamic else tuple(s.shape) for s in specs]
        if signature == DEFAULT_SIGNATURE and all(tuple(w) == tuple(r[1]) for w, r in zip(wanted, raw)):
            return path
        return _fixed_saved_model(loaded, fn, specs, src._tmpdir(), dynamic)

    src._export = export
    src._saved_model_dir = None if dynamic else export(False)  # a static one is checked at load, as before
    src._keep = loaded  # keep the loaded object (and its variables) alive
    return src


def _fixed_saved_model(loaded: Any, fn: Any, specs: list[InputSpec], directory: Path, dynamic_batch: bool = False) -> Path:
    """A SavedModel whose one ``serving_default`` signature is ``fn`` with every input shape fixed
    (the chosen signature, its unknown dimensions set; the batch left unknown when
    ``dynamic_batch``): what the TFLite converter is given."""
    tf = tensorflow()
    names = [s.name for s in specs]

    def call(*args: Any) -> Any:
        return fn(**dict(zip(names, args)))

    fixed = tf.function(call, input_signature=_specs(specs, dynamic_batch))
    out = Path(tempfile.mkdtemp(prefix="saved_model_fixed_", dir=directory))
    try:
        tf.saved_model.save(loaded, str(out), signatures={DEFAULT_SIGNATURE: fixed.get_concrete_function()})
    except Exception as exc:  # tracing with the fixed shapes, or saving the restored objects
        raise ModelLoadError(f"cannot fix the SavedModel's input shapes to {[list(s.shape) for s in specs]}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return out


def _load_tflite(path: Path) -> SourceModel:
    data = path.read_bytes()
    info = read_model_info(data)
    # quantized inputs take float data (quantized as the agent does); others keep their dtype (ids, masks)
    specs = [InputSpec(t.io_name, tuple(t.shape), "float32" if t.quantized else t.dtype) for t in info.inputs]
    digest, size = _digest(path)
    return SourceModel("tflite", path, digest, size, specs, tflite_bytes=data, outputs=[t.io_name for t in info.outputs])


def load_source(path: PathLike) -> SourceModel:
    """Load a model from a path; the kind is decided by what is there (see ``converter/loaders.py``)."""
    from .loaders import kind_for
    from .options import ConvertOptions

    return kind_for(path).load(path, ConvertOptions())
