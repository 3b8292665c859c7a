"""``ConvertOptions``: everything :func:`converter.convert` is told, in one checked object.

``convert(model, **kwargs)`` builds one of these from its keywords (the field names *are* the
keywords; an unknown one is a ``TypeError``), checks it once with :meth:`ConvertOptions.validate`,
and every step of the plan reads from it. A new option is one field here (with its default and, if it can be wrong, a check in
``validate``), one ``click.option`` in ``converter/cli.py`` passing it through, and the step that
uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from sdk.dataset import Dataset
from sdk.encoding import Normalization
from sdk.errors import ConfigError
from sdk.paths import SAFE_NAME as ID_PATTERN

from .recipes import RECIPES

PathLike = Union[str, "os.PathLike[str]"]
DataArg = Union[PathLike, Dataset, None]
Progress = Callable[[str, int, int], None]

TARGETS = ("cpu", "gpu", "edgetpu")
OPTIMIZE = ("latency", "size")
QUANTIZE_MODES = RECIPES + ("auto",)
AUTO_DEFAULT_BUDGET = 1.0
DISTILL_EPOCHS = 30  # --epochs when distilling and none is given
# measured on digits with a student under 1 % of the teacher (see converter/distill.py): T=4, alpha=0.5
# cost the student up to 4 points against training it alone; T=2 with the labels weighted 0.8 did not
DISTILL_TEMPERATURE = 2.0
DISTILL_ALPHA = 0.8

__all__ = ["ConvertOptions", "Progress", "TARGETS", "OPTIMIZE", "QUANTIZE_MODES", "AUTO_DEFAULT_BUDGET", "DISTILL_EPOCHS",
           "DISTILL_TEMPERATURE", "DISTILL_ALPHA"]


@dataclass
class ConvertOptions:
    """What to convert for, how to measure it and where the bundle goes (see ``edgesdk convert --help``)."""

    target: str = "cpu"
    output: Optional[PathLike] = None
    quantize: Optional[str] = None
    io_dtype: Optional[str] = None
    calibration: DataArg = None
    eval_data: DataArg = None
    max_accuracy_drop: Optional[float] = None
    optimize: str = "latency"
    prune: Optional[float] = None
    train: DataArg = None
    epochs: int = 0
    threads: Optional[int] = None
    runs: int = 50
    warmup: int = 5
    name: Optional[str] = None
    version: str = "1"
    key: Any = None
    report_dir: Optional[PathLike] = None
    calibration_limit: Optional[int] = 300
    eval_limit: Optional[int] = 1000
    image_range: tuple[float, float] = (0.0, 1.0)
    latency_limit_ms: Optional[float] = None
    golden_pairs: int = 3
    edgetpu_compiler: Optional[str] = None
    progress: Optional[Progress] = None
    #: the SavedModel signature to convert (``--signature``; default ``serving_default``)
    signature: Optional[str] = None
    #: whole input shapes by input name (``--input-shape NAME=1,43844,1``) for unknown dimensions
    input_shapes: Optional[dict[str, tuple[int, ...]]] = None
    #: a PyTorch module's example inputs (one tensor or array per input, batch 1)
    sample_inputs: Optional[tuple[Any, ...]] = None
    #: PyTorch: take NHWC inputs (the module is wrapped to permute them to its NCHW)
    channels_last: bool = False
    #: a Keras student model file to distil the model into (``--distill-into``; needs ``train``)
    distill_into: Optional[PathLike] = None
    #: distillation: the softmax temperature of teacher and student outputs
    temperature: float = DISTILL_TEMPERATURE
    #: distillation: the labels' weight in the loss (the teacher's is 1 - alpha)
    alpha: float = DISTILL_ALPHA
    #: distillation: also train the same student on the labels alone, to report what distilling bought
    compare_alone: bool = False
    #: uint8 normalisation recorded in the manifest (``--input-normalization [NAME=]SCALE,OFFSET``):
    #: ``x_float = x_uint8 * scale + offset``; a ``(scale, offset)`` pair for every float input, or
    #: ``{input name: (scale, offset)}``. Devices then take uint8 images for those inputs and
    #: normalise them; uint8 calibration, evaluation and training data (and image folders) are
    #: normalised the same way here.
    input_normalization: Any = None

    def validate(self) -> None:
        """Reject contradictory or out-of-range options before anything is loaded."""
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"unknown --quantize {self.quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        if self.optimize not in OPTIMIZE:
            raise ConfigError(f"unknown --optimize {self.optimize!r}: choose latency or size")
        if self.target == "edgetpu" and self.quantize not in (None, "int8", "auto"):
            raise ConfigError(f"the Edge TPU runs only fully integer models: use --quantize int8 (not {self.quantize})")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ConfigError("--max-accuracy-drop must be zero or more points")
        if self.runs < 1:
            raise ConfigError("--runs must be at least 1")
        for name, dims in (self.input_shapes or {}).items():
            if not dims or any(int(d) < 1 for d in dims):
                raise ConfigError(f"--input-shape {name}={','.join(map(str, dims))}: give every dimension as a positive "
                                  "integer, batch first (e.g. 1,43844,1)")
        self._validate_distillation()
        self.normalizations()  # raises ConfigError on a malformed one
        for option, value in (("--name", self.name), ("--model-version", self.version)):
            if value is not None and not ID_PATTERN.fullmatch(str(value)):
                raise ConfigError(f"{option} {str(value)!r} cannot name a model on devices: use letters, digits, '.', '_' "
                                  "and '-' (at most 128, starting with a letter or digit)")

    def _validate_distillation(self) -> None:
        if self.distill_into is None:
            if self.compare_alone:
                raise ConfigError("--compare-alone compares a distilled student: give --distill-into STUDENT")
            return
        if self.train is None:
            raise ConfigError("--distill-into needs --train DATA (labelled) for the student to learn on")
        if self.prune:
            raise ConfigError("--distill-into and --prune: choose one per conversion (prune the student in a second "
                              "conversion)")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature}: give a positive temperature (e.g. 4)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha}: give the labels' weight between 0 and 1 (e.g. 0.5)")
        if self.epochs < 0:
            raise ConfigError("--epochs must be zero or more")

    def normalizations(self) -> dict[str, Normalization]:
        """``input_normalization`` as ``{name: Normalization}``; the name ``""`` means every float input."""
        value = self.input_normalization
        if value is None:
            return {}
        if isinstance(value, Normalization):
            return {"": value}
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            return {"": Normalization(float(value[0]), float(value[1]))}
        if isinstance(value, dict):
            out = {}
            for name, v in value.items():
                out[str(name)] = v if isinstance(v, Normalization) else Normalization(float(v[0]), float(v[1]))
            return out
        raise ConfigError(f"input_normalization {value!r}: give (scale, offset) or {{input name: (scale, offset)}}")

    @property
    def distill_epochs(self) -> int:
        """Epochs of distillation: ``epochs``, or :data:`DISTILL_EPOCHS` when none is given."""
        return self.epochs or DISTILL_EPOCHS

    @property
    def thread_count(self) -> int:
        """CPU threads for measurement: the option, or min(4, cores)."""
        return self.threads or min(4, os.cpu_count() or 1)

    @property
    def budget(self) -> Optional[float]:
        """The accuracy-drop budget in points: the option, 1.0 for ``auto``, else none."""
        if self.max_accuracy_drop is not None:
            return self.max_accuracy_drop
        return AUTO_DEFAULT_BUDGET if self.quantize == "auto" else None

    def output_path(self, name: str) -> Path:
        return Path(self.output) if self.output else Path(f"{name}.edgebundle")
