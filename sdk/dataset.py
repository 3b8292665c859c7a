"""Calibration, evaluation and training data: ``.npz``, ``.npy`` or a folder of images.

* ``.npz``: ``x`` (and optional integer labels ``y``); a multi-input model takes its inputs by
  name (one array per input name) or ``x0``, ``x1``... in the order the converter lists them.
* ``.npy``: inputs only.
* a folder of images (png/jpg/bmp/gif/webp), or one image file (:func:`load_image`): resized to
  the model's input height and width, converted to 1 or 3 channels as the input needs, scaled to
  ``value_range`` (default [0, 1]), or kept as uint8 pixels for an input with a uint8
  normalisation (``InputSpec.pixels``).
  Images in sub-folders are labelled by the sorted index of their sub-folder (ImageNet layout).

Every array is checked against the model's input shape here, so a wrong shape is reported
once, clearly, and not as a TensorFlow stack trace mid-conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from sdk.deps import require
from sdk.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}

__all__ = ["Dataset", "InputSpec", "load_dataset", "load_image", "synthetic_dataset", "IMAGE_SUFFIXES"]


@dataclass(frozen=True)
class InputSpec:
    """A model input as the data loader needs it: name, shape (batch first) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    #: the input has a uint8 normalisation (:mod:`sdk.encoding`): image folders load as uint8
    #: pixels and uint8 arrays keep their dtype, so they travel as 1 byte per value
    pixels: bool = False

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any], index: int = 0) -> "InputSpec":
        """The spec of a bundle manifest's input entry, as data for the model is given: floats for
        a quantized or float input, integer and boolean inputs (token ids, masks) in their own
        dtype; uint8 pixels for an input with a uint8 normalisation."""
        quantized_or_float = entry.get("scale") or np.dtype(str(entry["dtype"])).kind == "f"
        return cls(str(entry.get("key") or entry.get("name", f"x{index}")), tuple(int(d) for d in entry["shape"]),
                   "float32" if quantized_or_float else str(entry["dtype"]),
                   pixels=entry.get("normalization") is not None)


@dataclass
class Dataset:
    """Inputs (one array per model input, batch first) and optional labels."""

    xs: list[np.ndarray]
    y: Optional[np.ndarray]
    source: str
    #: the model input each array of ``xs`` feeds, by name (None: by position)
    names: Optional[list[str]] = None

    def __len__(self) -> int:
        return int(self.xs[0].shape[0])

    def take(self, n: Optional[int]) -> "Dataset":
        if n is None or n >= len(self):
            return self
        return Dataset([x[:n] for x in self.xs], None if self.y is None else self.y[:n], self.source, self.names)

    def named(self) -> dict[str, np.ndarray]:
        """The inputs by model input name (``x0``, ``x1``... when the names are unknown)."""
        names = self.names or [f"x{i}" for i in range(len(self.xs))]
        return dict(zip(names, self.xs))

    def sample(self, i: int) -> list[np.ndarray]:
        """Sample ``i`` as a batch of one per input."""
        return [x[i : i + 1] for x in self.xs]

    @property
    def value_range(self) -> list[tuple[float, float]]:
        return [(float(np.min(x)), float(np.max(x))) for x in self.xs]


def _image_size(spec: InputSpec, what: str) -> tuple[int, int, int]:
    """The (height, width, channels) of an image input; DataError for an input that is not one."""
    if len(spec.shape) != 4:
        raise DataError(
            f"{what} given, but model input {spec.name!r} has shape {list(spec.shape)}, "
            "not (batch, height, width, channels): pass a .npz or .npy instead"
        )
    _, height, width, channels = spec.shape
    if channels not in (1, 3):
        raise DataError(f"model input {spec.name!r} has {channels} channels; images work for 1 or 3")
    return height, width, channels


def _read_image(Image: Any, path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file, resized and with the input's channels, as float32 pixel values 0..255."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR),
                             dtype=np.float32)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return arr.reshape(height, width, channels)


def _pixels_as_input(pixels: np.ndarray, spec: InputSpec, value_range: tuple[float, float]) -> np.ndarray:
    """Stacked pixel values as the input takes them: uint8 for an input that normalises them on
    the device, else floats scaled to ``value_range``."""
    if spec.pixels:
        return pixels.astype(np.uint8)
    low, high = value_range
    return (pixels / 255.0 * (high - low) + low).astype(np.float32)


def load_image(path: PathLike, spec: InputSpec, value_range: tuple[float, float] = (0.0, 1.0), *,
               extra: str | tuple[str, ...] = "images") -> np.ndarray:
    """One image file as a batch of one for ``spec`` (resized, 1 or 3 channels; uint8 pixels for an
    input with a uint8 normalisation, else scaled to ``value_range``). ``extra``: the caller's
    extra that brings Pillow, named when it is missing."""
    p = Path(path)
    height, width, channels = _image_size(spec, f"image {p}")
    if not p.is_file():
        raise DataError(f"image {p} does not exist: check the path")
    Image = require("PIL.Image", extra, "to read images")
    return _pixels_as_input(_read_image(Image, p, height, width, channels)[None], spec, value_range)


def _images(folder: Path, spec: InputSpec, value_range: tuple[float, float],
            extra: str | tuple[str, ...]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    Image = require("PIL.Image", extra, "to read image folders")
    height, width, channels = _image_size(spec, f"image folder {folder}")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    labelled = [(p, i) for i, d in enumerate(subdirs) for p in sorted(d.iterdir())] if subdirs else []
    files = labelled or [(p, -1) for p in sorted(folder.iterdir())]
    files = [(p, label) for p, label in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    x = np.stack([_read_image(Image, path, height, width, channels) for path, _ in files])
    y = np.array([label for _, label in files], dtype=np.int64) if labelled else None
    return _pixels_as_input(x, spec, value_range), y


def _check(x: np.ndarray, spec: InputSpec, what: str, source: str) -> np.ndarray:
    want = tuple(spec.shape[1:])
    got = tuple(x.shape[1:])
    if x.ndim != len(spec.shape) or any(w > 0 and w != g for w, g in zip(want, got)):
        hint = ""
        if x.ndim + 1 == len(spec.shape) and got == want[:-1] and want[-1] == 1:
            hint = " (add the channel axis: x[..., None])"
        raise DataError(
            f"{what} data {source} has samples of shape {list(got)}, but model input {spec.name!r} "
            f"expects {list(want)}{hint}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{what} data {source} is empty")
    if spec.pixels and x.dtype == np.uint8:
        return x
    return x.astype(np.dtype(spec.dtype), copy=False)


def load_dataset(
    path: PathLike,
    inputs: Optional[Sequence[InputSpec]],
    *,
    what: str = "calibration",
    limit: Optional[int] = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    extra: str | tuple[str, ...] = ("converter", "fleet"),
) -> Dataset:
    """Load ``path`` for a model with ``inputs``; raise DataError with the fix when it does not fit.

    ``inputs=None`` (the model's inputs are unknown): a ``.npz``/``.npy`` is taken as it is
    (``x``, else ``x0``, ``x1``, ...), unchecked; an image folder needs the inputs' sizes.
    ``extra``: the caller's extra that brings Pillow (for image folders), named when it is missing."""
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise DataError(f"{what} data {p} does not exist: check the path")
    y = None
    if p.is_dir():
        if inputs is None:
            raise DataError(f"{what} data {p} is a folder of images, but the model's input size is unknown")
        if len(inputs) != 1:
            raise DataError("image folders work for single-input models only: pass a .npz with x0, x1, ...")
        x, y = _images(p, inputs[0], value_range, extra)
        xs = [x]
    elif p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:
                keys = set(npz.files)
                count = len(inputs) if inputs is not None else max(1, sum(f"x{i}" in keys for i in range(len(keys))))
                if inputs is not None and all(s.name in keys for s in inputs) and not (count == 1 and "x" in keys):
                    xs = [npz[s.name] for s in inputs]
                elif "x" in keys and count == 1:
                    xs = [npz["x"]]
                elif all(f"x{i}" in keys for i in range(count)):
                    xs = [npz[f"x{i}"] for i in range(count)]
                else:
                    names = "x" if count == 1 else ", ".join(f"x{i}" for i in range(count))
                    if inputs is not None and count > 1:
                        names += " or the input names " + ", ".join(s.name for s in inputs)
                    raise DataError(f"{what} data {p} has arrays {sorted(keys)}; expected {names} (and optional y)")
                y = npz["y"] if "y" in keys else None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {what} data {p}: {exc}") from exc
    elif p.suffix == ".npy":
        if inputs is not None and len(inputs) != 1:
            raise DataError(".npy holds one array: a multi-input model needs a .npz with x0, x1, ...")
        try:
            xs = [np.load(p, allow_pickle=False)]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {what} data {p}: {exc}") from exc
    else:
        raise DataError(f"{what} data {p}: use a .npz (x, optional y), a .npy, or a folder of images")
    if inputs is not None:
        xs = [_check(np.asarray(x), spec, what, source) for x, spec in zip(xs, inputs)]
    elif any(np.asarray(x).ndim == 0 or len(x) == 0 for x in xs):
        raise DataError(f"{what} data {p} holds no samples")
    if len({x.shape[0] for x in xs}) != 1:
        raise DataError(f"{what} data {p}: inputs have different sample counts")
    if y is not None:
        y = np.asarray(y)
        if y.shape[0] != xs[0].shape[0]:
            raise DataError(f"{what} data {p}: {y.shape[0]} labels for {xs[0].shape[0]} samples")
    return Dataset(xs, y, source, None if inputs is None else [s.name for s in inputs]).take(limit)


def synthetic_dataset(inputs: Sequence[InputSpec], count: int, *, seed: int = 0,
                      ranges: Optional[dict[str, tuple[float, float]]] = None,
                      float_range: tuple[float, float] = (0.0, 1.0), int_range: tuple[int, int] = (0, 2)) -> Dataset:
    """``count`` random samples shaped and typed as ``inputs``: floats uniform in ``float_range``,
    integers (token ids) uniform in ``[low, high)`` of ``int_range``, booleans (masks) half true;
    ``ranges`` overrides the range per input name. For measuring agreement when no data is given,
    and for calibrating models whose data is not at hand."""
    rng = np.random.default_rng(seed)
    xs = []
    for spec in inputs:
        shape = (count, *[max(1, int(d)) for d in spec.shape[1:]])
        dtype = np.dtype(spec.dtype)
        low, high = (ranges or {}).get(spec.name, float_range if dtype.kind == "f" else int_range)
        if dtype.kind == "b":
            xs.append(rng.random(shape) < 0.5)
        elif dtype.kind in "iu":
            xs.append(rng.integers(int(low), max(int(low) + 1, int(high)), size=shape).astype(dtype))
        else:
            xs.append((low + (high - low) * rng.random(shape)).astype(dtype))
    return Dataset(xs, None, "synthetic", [s.name for s in inputs])
