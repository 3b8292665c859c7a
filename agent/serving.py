"""Serving one model: a small pool of pre-allocated, warmed-up interpreters.

An :class:`ActiveModel` holds ``pool_size`` engines (TFLite interpreters are not thread-safe),
created once at load with tensors allocated and one warm-up invoke each. A request takes a free
engine from the pool, so up to ``pool_size`` requests run in parallel; the rest wait their turn.
Inputs come by position or by name; float inputs are quantized with the manifest's scale and
zero point and outputs dequantized, unless ``raw=True`` (integer I/O as the model has it).
A wrong model name, input count, shape or dtype raises :class:`~sdk.errors.InferenceError` for
that caller only.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from sdk.errors import InferenceError
from sdk.modelinfo import TensorInfo
from sdk.runtime import DelegateOptions, Engine, dequantize, open_engine, quantize

from .metrics import ModelStats

Inputs = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]

__all__ = ["ActiveModel", "Inputs"]


class ActiveModel:
    def __init__(self, name: str, version: str, manifest: Mapping[str, Any], engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("an ActiveModel needs at least one engine")
        self.name, self.version, self.manifest = name, version, dict(manifest)
        self.inputs: list[TensorInfo] = engines[0].inputs
        self.outputs: list[TensorInfo] = engines[0].outputs
        self.delegate = engines[0].delegate
        self.engines = list(engines)
        self._pool: "queue.SimpleQueue[Engine]" = queue.SimpleQueue()
        for e in engines:
            self._pool.put(e)
        self.stats = ModelStats()
        self._names = {manifest_name: i for i, manifest_name in enumerate(self._input_names())}
        # A list of arrays with exactly these shapes and dtypes needs no conversion: the fast path.
        self._direct = [(tuple(t.shape), np.dtype(t.dtype)) for t in self.inputs]
        self._float_direct = not any(t.quantized for t in self.inputs)
        self._raw_out = not any(t.quantized for t in self.outputs)

    def _input_names(self) -> list[str]:
        names = [str(t.get("name", "")) for t in self.manifest.get("inputs", [])]
        return names if len(names) == len(self.inputs) else [t.name for t in self.inputs]

    @classmethod
    def load(cls, name: str, version: str, manifest: Mapping[str, Any], model: bytes, *, delegate: str = "auto",
             options: DelegateOptions | None = None, pool_size: int = 1) -> "ActiveModel":
        """Create ``pool_size`` engines (the first decides the delegate; the rest use the same)."""
        first = open_engine(model, delegate, options)
        engines = [first] + [open_engine(model, first.delegate, options) for _ in range(pool_size - 1)]
        for e in engines:  # warm-up: first invokes pay for lazy allocation and XNNPACK packing
            e.run([np.zeros([max(1, d) for d in t.shape], dtype=t.dtype) for t in e.inputs])
        return cls(name, version, manifest, engines)

    # --- requests ------------------------------------------------------------------------------
    def _arrange(self, inputs: Inputs) -> list[np.ndarray]:
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(self._names))
            if unknown:
                raise InferenceError(f"{self.name}: unknown input(s) {', '.join(unknown)}; inputs are {', '.join(self._names)}")
            missing = sorted(set(self._names) - set(inputs))
            if missing:
                raise InferenceError(f"{self.name}: missing input(s) {', '.join(missing)}")
            ordered = [None] * len(self.inputs)
            for key, value in inputs.items():
                ordered[self._names[key]] = value
            inputs = ordered
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if len(inputs) != len(self.inputs):
            raise InferenceError(f"{self.name} takes {len(self.inputs)} input(s), got {len(inputs)}")
        return [np.asarray(x) for x in inputs]

    def _prepare(self, xs: list[np.ndarray], raw: bool) -> list[np.ndarray]:
        out = []
        for x, spec in zip(xs, self.inputs):
            want = tuple(spec.shape)
            if x.shape != want:
                if x.size == int(np.prod(want)) and x.shape == want[1:]:
                    x = x.reshape(want)  # a single sample without its batch axis
                else:
                    raise InferenceError(f"{self.name}: input {spec.name} must have shape {list(want)}, got {list(x.shape)}")
            if raw:
                if x.dtype != np.dtype(spec.dtype):
                    raise InferenceError(f"{self.name}: raw input {spec.name} must be {spec.dtype}, got {x.dtype}")
                out.append(x)
            elif x.dtype.kind in "fiub":
                out.append(quantize(x, spec) if spec.quantized else x.astype(spec.dtype, copy=False))
            else:
                raise InferenceError(f"{self.name}: input {spec.name} has unsupported dtype {x.dtype}")
        return out

    def _is_direct(self, inputs: Inputs, raw: bool) -> bool:
        """Whether ``inputs`` can go to the engine as they are (checked in one comparison: after
        a multi-millisecond inference each Python step costs microseconds)."""
        if type(inputs) is not list or not (raw or self._float_direct):
            return False
        try:
            return [(x.shape, x.dtype) for x in inputs] == self._direct
        except AttributeError:
            return False

    def predict(self, inputs: Inputs, *, raw: bool = False,
                reply: Optional[Callable[[list[np.ndarray]], None]] = None) -> list[np.ndarray]:
        """Run one request; see the module docstring. ``reply`` is called with the outputs as soon
        as they exist, before the engine goes back to the pool and the statistics are recorded
        (the local API answers from it, so its caller does not wait for the bookkeeping)."""
        t0 = time.perf_counter()
        if self._is_direct(inputs, raw):
            xs = inputs
        else:
            try:
                xs = self._prepare(self._arrange(inputs), raw)
            except InferenceError:
                self.stats.error()
                raise
        engine = self._pool.get()
        try:
            try:
                ys = engine.run(xs)
            except Exception as exc:  # a runtime failure on this request must not take the agent down
                self.stats.error()
                raise InferenceError(f"{self.name}: inference failed: {exc}") from exc
            if not raw and not self._raw_out:
                ys = [dequantize(y, spec) for y, spec in zip(ys, self.outputs)]
            elapsed = time.perf_counter() - t0
            if reply is not None:
                reply(ys)
        finally:
            self._pool.put(engine)
        self.stats.ok(elapsed)
        return ys

    def run_raw_on_one_engine(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Run raw inputs on one pool engine (health checks, not counted in the request stats)."""
        engine = self._pool.get()
        try:
            return engine.run(xs)
        finally:
            self._pool.put(engine)
