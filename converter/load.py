"""The load steps: the source model (through its kind), the data sets, and the reference outputs
every candidate is judged against."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from sdk.dataset import Dataset, load_dataset, synthetic_dataset
from sdk.encoding import Normalization
from sdk.errors import ConfigError

from .source import SourceModel
from .state import Conversion

__all__ = ["load_model_and_data", "reference_outputs", "as_dataset", "input_normalizations"]


def as_dataset(value: Any, src: SourceModel, what: str, limit: Optional[int], image_range: tuple[float, float],
               normalizations: Optional[list[Optional[Normalization]]] = None) -> Optional[Dataset]:
    """``value`` (a path or a :class:`Dataset`) as a data set shaped for ``src``'s inputs. An input
    with a uint8 normalisation takes uint8 data (and image folders, as pixels) and normalises it
    exactly as a device will (:meth:`sdk.encoding.Normalization.apply`)."""
    if value is None:
        return None
    norms = normalizations or [None] * len(src.inputs)
    if isinstance(value, Dataset):
        data = value.take(limit)
    else:
        specs = [dataclasses.replace(spec, pixels=True) if n is not None else spec for spec, n in zip(src.inputs, norms)]
        data = load_dataset(value, specs, what=what, limit=limit, value_range=image_range, extra="converter")
    if any(n is not None and x.dtype == np.uint8 for n, x in zip(norms, data.xs)):
        xs = [n.apply(x) if n is not None and x.dtype == np.uint8 else x for n, x in zip(norms, data.xs)]
        data = Dataset(xs, data.y, data.source, data.names)
    return data


def input_normalizations(c: Conversion) -> list[Optional[Normalization]]:
    """Each source input's normalisation from ``input_normalization`` (by name; ``""`` for every
    float input); a name the model does not have is a ConfigError naming its inputs."""
    given = c.options.normalizations()
    names = [s.name for s in c.src.inputs]
    unknown = sorted(set(given) - set(names) - {""})
    if unknown:
        raise ConfigError(f"--input-normalization names {', '.join(unknown)}, but the model's inputs are "
                          f"{', '.join(names)}")
    out = []
    for spec in c.src.inputs:
        norm = given.get(spec.name)
        if norm is None and np.dtype(spec.dtype).kind == "f":
            norm = given.get("")
        out.append(norm)
    return out


def _evaluation_set(c: Conversion, evald: Optional[Dataset]) -> None:
    """The evaluation data: --eval, else the calibration data, else synthetic inputs (with a note)."""
    calib, src = c.calibration, c.src
    if evald is not None:
        c.eval_set, c.eval_name = evald, f"{evald.source}"
    elif calib is not None:
        c.eval_set, c.eval_name = calib, f"{calib.source} (calibration data)"
        c.notes.append("evaluated on the calibration data: pass --eval DATA for an unbiased figure")
    else:
        c.eval_set = synthetic_dataset(src.inputs, 32, seed=0)
        c.eval_name = "32 synthetic inputs (floats uniform in [0,1), integers in {0,1}, masks half true)"
        c.notes.append("no --eval or --calibration data: agreement measured on synthetic inputs only")
    c.value_ranges = (calib if calib is not None else c.eval_set).value_range


def load_model_and_data(c: Conversion) -> None:
    o = c.options
    c.src = c.conv_src = c.kind.load(c.model, o)
    norms = input_normalizations(c)
    c.calibration = as_dataset(o.calibration, c.src, "calibration", o.calibration_limit, o.image_range, norms)
    evald = as_dataset(o.eval_data, c.src, "evaluation", o.eval_limit, o.image_range, norms)
    c.train = as_dataset(o.train, c.src, "training", None, o.image_range, norms)
    _evaluation_set(c, evald)


def reference_outputs(c: Conversion) -> None:
    c.reference = c.kind.reference(c.src, c.eval_set, c.delegate)
