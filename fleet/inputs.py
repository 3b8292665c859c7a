"""A batch job's inputs, from what the user hands the fleet: arrays, or a path to a ``.npz``/``.npy``
file or a folder of images, read with the model's input specs from its manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from sdk.errors import JobError

__all__ = ["Inputs", "load_job_inputs"]

Inputs = Union[str, os.PathLike, np.ndarray, Sequence[np.ndarray]]


def load_job_inputs(model: str, inputs: Inputs, manifest: Optional[Mapping[str, Any]]) -> list[np.ndarray]:
    """One array per model input, samples first.

    Arrays are taken as they are. A ``.npz`` may hold one array per input signature name (taken
    in the model's own input order); integer and boolean inputs that are not quantized (token
    ids, masks) keep their dtype; an input with a uint8 normalisation takes an image folder as
    uint8 pixels (1 byte a value on the wire). Without a ``manifest`` (no bundle of ``model`` is
    known) a ``.npz``/``.npy`` is taken unchecked and an image folder cannot be sized."""
    if isinstance(inputs, np.ndarray):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        return [np.asarray(x) for x in inputs]
    from sdk.dataset import InputSpec, load_dataset

    path = Path(inputs)
    if manifest is None:
        if path.is_dir():
            raise JobError(f"no bundle of {model!r} is known to this fleet, so image sizes are unknown: "
                           "deploy it first (edgesdk fleet deploy) or pass a .npz/.npy")
        return load_dataset(path, None, what="job input").xs
    specs = [InputSpec.from_manifest(t, i) for i, t in enumerate(manifest["inputs"])]
    value_range = tuple(manifest["inputs"][0].get("value_range", (0.0, 1.0)))
    return load_dataset(path, specs, what="job input", value_range=value_range,  # type: ignore[arg-type]
                        extra="fleet").xs
