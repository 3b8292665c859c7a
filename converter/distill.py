"""Knowledge distillation: a small Keras student learns from the teacher's softened outputs and
the labels (``keras.distillation.Distiller``), then replaces the teacher as the model converted.

``edgesdk convert TEACHER --distill-into STUDENT --train DATA [--epochs N] [--temperature T]
[--alpha A] [--compare-alone]``: STUDENT is a Keras model file (an architecture, trained or not)
whose inputs and output have the teacher's shapes. Its loss is ``A * CE(labels, student) +
(1 - A) * T² * KL(softmax(teacher/T) || softmax(student/T))`` (Keras' ``LogitsDistillation``).

Logits: models that end in a softmax are trained through a thin wrapper that outputs the *log*
of their probabilities. ``log softmax(z) = z - logsumexp(z)`` differs from the logits ``z`` by a
constant per sample, so ``softmax(log p / T) == softmax(z / T)``: the temperature softens exactly
as on the logits, with no surgery on the model (which would need rebuilding, as a compiled model
keeps its predict path). The wrapper shares the student's layers, so training it trains the
student, which keeps its softmax. Models that already output logits are used as they are.

With ``compare_alone`` the same student (the same initial weights, loaded again from its file) is
trained on the labels alone for the same epochs, with the same optimizer, batches and seed, so the
report shows what the teacher's soft targets bought.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sdk.dataset import Dataset
from sdk.errors import ConfigError, DataError, ModelLoadError

from .source import SourceModel, _load_keras, keras

__all__ = ["DistillResult", "load_student", "logits_view", "distill", "train_alone", "param_count", "LEARNING_RATE",
           "BATCH_SIZE", "SEED"]

LEARNING_RATE = 1e-3
BATCH_SIZE = 32
SEED = 0  # both trainings start from the same shuffles, so the comparison is like for like
_EPS = 1e-30  # log(0) guard for probabilities that underflowed


@dataclass
class DistillResult:
    model: Any  # the trained student (keeps its own output activation)
    epochs: int
    loss: Optional[float]


def param_count(model: Any) -> int:
    """Every weight of the model, trainable or not (N for the teacher, N' for the student)."""
    return int(model.count_params())


def load_student(path: Any, teacher: SourceModel) -> SourceModel:
    """The student file as a Keras model, checked against the teacher: same input and output shapes."""
    from .loaders import KerasKind, _path

    p = _path(path)
    if p is None or not p.exists():
        raise ConfigError(f"--distill-into {path}: no such file; pass the student as a Keras model file (.keras or .h5)")
    if not KerasKind().accepts(p):
        raise ConfigError(f"--distill-into {p}: the student must be a Keras model file (.keras or .h5), "
                          "an architecture saved with model.save(), trained or not")
    student = _load_keras(Path(p))
    t_in = [tuple(s.shape[1:]) for s in teacher.inputs]
    s_in = [tuple(s.shape[1:]) for s in student.inputs]
    if t_in != s_in:
        raise ConfigError(f"--distill-into {p}: the student's inputs {s_in} differ from the teacher's {t_in}: "
                          "give the student the teacher's input shapes")
    t_out, s_out = _output_shape(teacher.keras_model), _output_shape(student.keras_model)
    if t_out != s_out:
        raise ConfigError(f"--distill-into {p}: the student's output shape {list(s_out)} differs from the teacher's "
                          f"{list(t_out)}: the student must predict the same classes")
    return student


def _output_shape(model: Any) -> tuple[Any, ...]:
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise ConfigError("distillation needs a classifier with one (batch, classes) output, for teacher and student")
    return tuple(outputs[0].shape[1:])


def _outputs_probabilities(model: Any, x: np.ndarray) -> bool:
    out = np.asarray(model(x[:32], training=False))
    return bool(np.all(out >= -1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def logits_view(model: Any, x: np.ndarray) -> Any:
    """``model`` itself when it outputs logits, else a wrapper giving the log of its probabilities
    (equal to the logits up to a per-sample constant: see the module docstring). The wrapper
    shares ``model``'s layers and weights."""
    if not _outputs_probabilities(model, x):
        return model
    k = keras()
    inp = k.Input(tuple(x.shape[1:]), dtype=str(x.dtype))
    log_p = k.layers.Lambda(lambda p: k.ops.log(k.ops.maximum(p, _EPS)), name="log_probabilities")(model(inp))
    return k.Model(inp, log_p, name=f"{model.name}_logits")


def _labels(train: Dataset) -> np.ndarray:
    if len(train.xs) != 1:
        raise ConfigError("distillation takes models with one input")
    if train.y is None or not np.issubdtype(np.asarray(train.y).dtype, np.integer):
        raise DataError(f"--train {train.source}: distillation needs integer class labels (y in the .npz, or "
                        "labelled image sub-folders)")
    return np.asarray(train.y).reshape(-1)


def _student_loss() -> Any:
    return keras().losses.SparseCategoricalCrossentropy(from_logits=True)


def distill(teacher: Any, student: Any, train: Dataset, *, epochs: int, temperature: float, alpha: float) -> DistillResult:
    """Train ``student`` (in place) on ``train``'s labels and ``teacher``'s outputs softened by
    ``temperature``; ``alpha`` weighs the labels' loss, ``1 - alpha`` the teacher's."""
    k = keras()
    x, y = train.xs[0], _labels(train)
    try:
        distiller = k.distillation.Distiller(
            teacher=logits_view(teacher, x),
            student=logits_view(student, x),
            # the KLDivergence *object*: Keras 3.15's default "kl_divergence" string becomes a plain
            # function, which LogitsDistillation then applies to logits without softmax/temperature
            distillation_losses=k.distillation.LogitsDistillation(temperature=temperature, loss=k.losses.KLDivergence()),
            student_loss_weight=alpha,
        )
        distiller.compile(optimizer=k.optimizers.Adam(LEARNING_RATE), loss=_student_loss())
        k.utils.set_random_seed(SEED)
        hist = distiller.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, verbose=0)
    except ValueError as exc:  # Keras' shape and configuration checks
        raise ModelLoadError(f"cannot distil into the student: {str(exc).splitlines()[0]}") from exc
    return DistillResult(student, epochs, float(hist.history["loss"][-1]))


def train_alone(student: Any, train: Dataset, *, epochs: int) -> DistillResult:
    """Train ``student`` (in place) on the labels alone, as :func:`distill` would without a teacher."""
    k = keras()
    x, y = train.xs[0], _labels(train)
    view = logits_view(student, x)
    view.compile(optimizer=k.optimizers.Adam(LEARNING_RATE), loss=_student_loss())
    k.utils.set_random_seed(SEED)
    hist = view.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, verbose=0)
    return DistillResult(student, epochs, float(hist.history["loss"][-1]))
