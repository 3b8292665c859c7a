"""Magnitude pruning of conv/dense kernels, with an optional fine-tune that keeps the masks.

tensorflow-model-optimization 0.8 only prunes tf_keras (Keras 2) models, and importing it
switches the whole process to legacy Keras, so edgesdk prunes Keras 3 models itself: each
kernel's smallest-magnitude weights are set to zero (exactly ``round(sparsity * size)`` of them)
and, while fine-tuning, re-zeroed after every batch so training cannot regrow them.

A pruned ``.tflite`` is no smaller (TFLite stores dense tensors); the win appears after
compression, and the bundle is compressed. The converter reports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from sdk.errors import ConfigError, DataError

from sdk.dataset import Dataset
from .source import keras

__all__ = ["PruneResult", "prune_model", "kernel_sparsity"]

_PRUNABLE = ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


@dataclass
class PruneResult:
    model: Any
    target_sparsity: float
    achieved_sparsity: float
    pruned_weights: int
    total_weights: int
    layers: dict[str, float] = field(default_factory=dict)
    fine_tune_epochs: int = 0
    fine_tune_loss: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": round(self.achieved_sparsity, 6),
            "pruned_weights": self.pruned_weights,
            "total_weights": self.total_weights,
            "layers": {k: round(v, 6) for k, v in self.layers.items()},
            "fine_tune_epochs": self.fine_tune_epochs,
            "fine_tune_loss": self.fine_tune_loss,
        }


def _walk(layer: Any):
    for sub in getattr(layer, "layers", []) or []:
        yield sub
        yield from _walk(sub)


def _kernels(model: Any) -> list[tuple[str, Any]]:
    """(name, variable) of every prunable kernel."""
    out = []
    for layer in _walk(model):
        if type(layer).__name__ not in _PRUNABLE:
            continue
        for var in layer.weights:
            vname = getattr(var, "path", None) or var.name
            if vname.split("/")[-1].split(":")[0].endswith("kernel"):
                out.append((vname, var))
    return out


def _mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    k = int(round(sparsity * w.size))
    mask = np.ones(w.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(np.abs(w).ravel(), k - 1)[:k]] = False
    return mask.reshape(w.shape)


def kernel_sparsity(model: Any) -> float:
    """Fraction of zeros across all prunable kernels."""
    zeros = total = 0
    for _, var in _kernels(model):
        w = np.asarray(var.numpy() if hasattr(var, "numpy") else var)
        zeros += int(np.count_nonzero(w == 0))
        total += w.size
    return zeros / total if total else 0.0


def _loss_for(model: Any, data: Dataset) -> Any:
    if data.y is None:
        raise DataError("--train data needs labels (y in the .npz, or labelled image sub-folders) to fine-tune")
    out = np.asarray(model(data.sample(0)[0] if len(data.xs) == 1 else data.sample(0), training=False))
    k = keras()
    if out.ndim == 2 and out.shape[1] > 1 and np.issubdtype(data.y.dtype, np.integer):
        probs = np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
        return k.losses.SparseCategoricalCrossentropy(from_logits=not probs)
    return k.losses.MeanSquaredError()


def prune_model(
    model: Any,
    sparsity: float,
    *,
    train: Optional[Dataset] = None,
    epochs: int = 0,
    learning_rate: float = 1e-3,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PruneResult:
    """Prune a copy of ``model``'s kernels to ``sparsity`` and optionally fine-tune it."""
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"--prune {sparsity}: sparsity must be between 0 and 1 (e.g. 0.5 for 50 %)")
    if epochs and train is None:
        raise ConfigError("--epochs needs --train DATA to fine-tune on")
    k = keras()
    pruned = k.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    kernels = _kernels(pruned)
    if not kernels:
        raise ConfigError("the model has no Dense or Conv kernels to prune")
    masks = []
    for _, var in kernels:
        w = np.asarray(var.numpy())
        m = _mask(w, sparsity)
        var.assign(w * m)
        masks.append(m)

    loss_value = None
    if train is not None and epochs > 0:
        cls = type("ReapplyMasks", (k.callbacks.Callback,), {})

        def on_train_batch_end(self, batch, logs=None):
            for (_, var), m in zip(kernels, masks):
                var.assign(var.numpy() * m)

        def on_epoch_end(self, epoch, logs=None):
            if progress:
                progress(epoch + 1, epochs)

        cls.on_train_batch_end = on_train_batch_end
        cls.on_epoch_end = on_epoch_end
        pruned.compile(optimizer=k.optimizers.Adam(learning_rate), loss=_loss_for(pruned, train))
        xs = train.xs[0] if len(train.xs) == 1 else train.xs
        hist = pruned.fit(xs, train.y, epochs=epochs, batch_size=32, verbose=0, callbacks=[cls()])
        loss_value = float(hist.history["loss"][-1])

    per_layer = {}
    zeros = total = 0
    for (name, var), m in zip(kernels, masks):
        w = var.numpy()
        per_layer[name] = float(np.count_nonzero(w == 0) / w.size)
        zeros += int(np.count_nonzero(w == 0))
        total += w.size
    return PruneResult(pruned, sparsity, zeros / total, zeros, total, per_layer, epochs if train is not None else 0, loss_value)
