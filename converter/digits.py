"""The small real-data example edgesdk uses in its main job, tests and benchmarks.

scikit-learn ships the digits set (1,797 8x8 grey images) inside the package, so nothing is
downloaded. One split, one CNN, defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdk.deps import require

from .source import keras

__all__ = ["DigitsData", "load_digits_split", "build_digits_cnn", "train_digits_cnn"]


@dataclass
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(train: int = 1400, seed: int = 0) -> DigitsData:
    """Images scaled to [0, 1] with a channel axis, shuffled with ``seed``, split at ``train``."""
    datasets = require("sklearn.datasets", "converter", "for the bundled digits data set")
    d = datasets.load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    return DigitsData(x[:train], y[:train], x[train:], y[train:])


def build_digits_cnn(seed: int = 0, width: int = 1) -> Any:
    """The digits CNN, untrained: two convolutions (16 and 32 filters) and a 64-unit dense layer,
    each ``width`` times as wide (``width=2`` gives the ~151k-parameter teacher of the
    distillation tests)."""
    k = keras()
    k.utils.set_random_seed(seed)
    return k.Sequential([
        k.Input((8, 8, 1)),
        k.layers.Conv2D(16 * width, 3, activation="relu", padding="same"),
        k.layers.MaxPooling2D(),
        k.layers.Conv2D(32 * width, 3, activation="relu", padding="same"),
        k.layers.Flatten(),
        k.layers.Dense(64 * width, activation="relu"),
        k.layers.Dense(10, activation="softmax"),
    ])


def train_digits_cnn(data: DigitsData, epochs: int = 10, seed: int = 0) -> tuple[Any, float]:
    """Train the CNN (a few seconds on 2 cores); return it and its test accuracy."""
    model = build_digits_cnn(seed)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=32, verbose=0)
    return model, float(model.evaluate(data.x_test, data.y_test, verbose=0)[1])
