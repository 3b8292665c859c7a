"""Serving one model: a small pool of pre-allocated, warmed-up interpreters.

An :class:`ActiveModel` holds ``pool_size`` engines (TFLite interpreters are not thread-safe),
created once at load with tensors allocated and one warm-up invoke each. A request takes a free
engine from the pool, so up to ``pool_size`` requests run in parallel; the rest wait their turn.
Inputs come by position or by name; float inputs are quantized with the manifest's scale and
zero point and outputs dequantized, unless ``raw=True`` (integer I/O as the model has it).
uint8 for an input whose manifest entry records a normalisation (:mod:`sdk.encoding`) is
normalised first (``x * scale + offset`` in float32), then quantised or fed as float; integers
the fleet quantised (``quant``: per input, the ``(scale, zero_point)`` they were quantised with)
go to the model as they are when those are the model's own, and are dequantised otherwise.
A wrong model name, input count, shape or dtype raises :class:`~sdk.errors.InferenceError` for
that caller only. :meth:`ActiveModel.request_problem` applies the same rules to dtypes and
shapes alone, so the local API can refuse a request before it reads (or allocates) its tensors.
"""

from __future__ import annotations

import math
import queue
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from sdk.encoding import Normalization, manifest_normalizations, same_quantization
from sdk.errors import InferenceError
from sdk.modelinfo import TensorInfo
from sdk.runtime import DelegateOptions, Engine, dequantize, open_engine, quantize

from .metrics import ModelStats

Inputs = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]

__all__ = ["ActiveModel", "Inputs"]

#: dtype kinds a float (not raw) request may use: quantized or cast to the model's dtype
_CONVERTIBLE = "fiub"


def _fits(shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """The model's shape, or a single sample without its batch axis."""
    return shape == want or (shape == want[1:] and math.prod(shape) == math.prod(want))


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
        # by signature name ("token_ids") or tensor name ("serving_default_token_ids:0")
        self._names = {n: i for i, t in enumerate(self.inputs) for n in (t.name, t.key) if n}
        self._names.update({manifest_name: i for i, manifest_name in enumerate(self._input_names())})
        # A list of arrays with exactly these shapes and dtypes needs no conversion: the fast path.
        self._direct = [(tuple(t.shape), np.dtype(t.dtype)) for t in self.inputs]
        self._float_direct = not any(t.quantized for t in self.inputs)
        #: per input, the uint8 normalisation its manifest entry records (None: none)
        self.normalizations: list[Optional[Normalization]] = manifest_normalizations(self.manifest, self.inputs)
        self._raw_out = not any(t.quantized for t in self.outputs)

    def _input_names(self) -> list[str]:
        """The inputs' names as callers use them: the signature's, else the tensors'."""
        names = [str(t.get("key") or t.get("name", "")) for t in self.manifest.get("inputs", [])]
        return names if len(names) == len(self.inputs) else [t.io_name for t in self.inputs]

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
                raise InferenceError(f"{self.name}: unknown input(s) {', '.join(unknown)}; inputs are "
                                     f"{', '.join(self._input_names())}")
            ordered: list[Any] = [None] * len(self.inputs)
            for key, value in inputs.items():
                if ordered[self._names[key]] is not None:
                    raise InferenceError(f"{self.name}: input {key} given twice (by two of its names)")
                ordered[self._names[key]] = value
            missing = [n for n, v in zip(self._input_names(), ordered) if v is None]
            if missing:
                raise InferenceError(f"{self.name}: missing input(s) {', '.join(missing)}")
            inputs = ordered
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if len(inputs) != len(self.inputs):
            raise InferenceError(f"{self.name} takes {len(self.inputs)} input(s), got {len(inputs)}")
        return [np.asarray(x) for x in inputs]

    def _input_problem(self, spec: TensorInfo, dtype: np.dtype, shape: tuple[int, ...], raw: bool,
                       batch: bool = False) -> Optional[str]:
        """Why an input of ``dtype`` and ``shape`` cannot go to ``spec`` (None: it can); with
        ``batch``, ``shape`` is any number (at least one) of the model's samples, batch first."""
        want = tuple(spec.shape)
        if batch:
            if len(shape) != len(want) or shape[1:] != want[1:] or not shape[:1] or shape[0] < 1:
                return (f"{self.name}: input {spec.name} must be a batch of samples of shape {list(want[1:])}, "
                        f"got {list(shape)}")
        elif not _fits(shape, want):
            return f"{self.name}: input {spec.name} must have shape {list(want)}, got {list(shape)}"
        if raw and dtype != np.dtype(spec.dtype):
            return f"{self.name}: raw input {spec.name} must be {spec.dtype}, got {dtype}"
        if not raw and dtype.kind not in _CONVERTIBLE:
            return f"{self.name}: input {spec.name} has unsupported dtype {dtype}"
        return None

    def request_problem(self, signature: Sequence[tuple[np.dtype, tuple[int, ...]]], raw: bool) -> Optional[str]:
        """Why :meth:`predict` would refuse inputs of these ``(dtype, shape)`` (by position), or None
        when it takes them: the same rules, checked without the data."""
        if len(signature) != len(self.inputs):
            return f"{self.name} takes {len(self.inputs)} input(s), got {len(signature)}"
        for (dtype, shape), spec in zip(signature, self.inputs):
            problem = self._input_problem(spec, np.dtype(dtype), tuple(shape), raw)
            if problem is not None:
                return problem
        return None

    def _prepare(self, xs: list[np.ndarray], raw: bool,
                 quant: Sequence[Optional[Sequence[float]]] = (), batch: bool = False) -> list[np.ndarray]:
        out = []
        for i, (x, spec) in enumerate(zip(xs, self.inputs)):
            problem = self._input_problem(spec, x.dtype, x.shape, raw, batch)
            if problem is not None:
                raise InferenceError(problem)
            if not batch and x.shape != tuple(spec.shape):
                x = x.reshape(spec.shape)  # a single sample without its batch axis
            q = quant[i] if i < len(quant) else None
            if raw:
                out.append(x)
                continue
            if q is not None:  # integers the fleet quantised
                qq = (float(q[0]), int(q[1]))
                if same_quantization(spec, qq) and x.dtype == np.dtype(spec.dtype):
                    out.append(x)  # the model's own: fed as they are, never quantised again
                    continue
                x = (x.astype(np.float32) - np.float32(qq[1])) * np.float32(qq[0])
            elif x.dtype == np.uint8 and self.normalizations[i] is not None:
                x = self.normalizations[i].apply(x)  # type: ignore[union-attr]
            out.append(quantize(x, spec) if spec.quantized else x.astype(spec.dtype, copy=False))
        return out

    def _is_direct(self, inputs: Inputs, raw: bool, quant: Sequence[Optional[Sequence[float]]] = ()) -> bool:
        """Whether ``inputs`` can go to the engine as they are (checked in one comparison: after
        a multi-millisecond inference each Python step costs microseconds): raw ones, floats for
        a float model without normalisations, integers the fleet quantised as the model does."""
        if type(inputs) is not list:
            return False
        if not raw:
            if quant:
                if not all(same_quantization(t, (float(q[0]), int(q[1]))) if q is not None else not t.quantized
                           for t, q in zip(self.inputs, quant)) or len(quant) != len(self.inputs):
                    return False
            elif not self._float_direct:  # (uint8 to normalise never matches a float model's dtypes)
                return False
        try:
            return [(x.shape, x.dtype) for x in inputs] == self._direct
        except AttributeError:
            return False

    def predict(self, inputs: Inputs, *, raw: bool = False,
                reply: Optional[Callable[[list[np.ndarray]], None]] = None,
                quant: Sequence[Optional[Sequence[float]]] = ()) -> list[np.ndarray]:
        """Run one request; see the module docstring. ``reply`` is called with the outputs as soon
        as they exist, before the engine goes back to the pool and the statistics are recorded
        (the local API answers from it, so its caller does not wait for the bookkeeping).
        ``quant``: per input (by position), the ``(scale, zero_point)`` the fleet quantised it
        with, or None (a task's :attr:`sdk.protocol.Task.quant`)."""
        t0 = time.perf_counter()
        if self._is_direct(inputs, raw, quant):
            xs = inputs
        else:
            try:
                xs = self._prepare(self._arrange(inputs), raw, quant)
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

    def predict_batch(self, inputs: Sequence[np.ndarray], *, raw: bool = False,
                      quant: Sequence[Optional[Sequence[float]]] = ()) -> list[np.ndarray]:
        """Run N samples at once (a fleet task): every input batch first, N rows each; outputs
        batch first. Converted as :meth:`predict` converts (whole arrays, no per-sample Python),
        then one engine from the pool runs them: one ``invoke`` when the model's batch dimension
        is dynamic, else sample by sample on that engine (:meth:`sdk.runtime.Engine.run_batch`).
        Recorded as one request whose latency is the time per sample."""
        t0 = time.perf_counter()
        try:
            xs = self._prepare(self._arrange(list(inputs)), raw, quant, batch=True)
            n = int(xs[0].shape[0])
            if any(int(x.shape[0]) != n for x in xs):
                raise InferenceError(f"{self.name}: inputs of one batch must have as many samples each, got "
                                     f"{[int(x.shape[0]) for x in xs]}")
        except InferenceError:
            self.stats.error()
            raise
        engine = self._pool.get()
        try:
            try:
                ys = engine.run_batch(xs)
            except Exception as exc:  # a runtime failure on this request must not take the agent down
                self.stats.error()
                raise InferenceError(f"{self.name}: inference failed: {exc}") from exc
        finally:
            self._pool.put(engine)
        if not raw and not self._raw_out:
            ys = [dequantize(y, spec) for y, spec in zip(ys, self.outputs)]
        self.stats.ok((time.perf_counter() - t0) / n)
        return ys

    def run_raw_on_one_engine(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Run raw inputs on one pool engine (health checks, not counted in the request stats)."""
        engine = self._pool.get()
        try:
            return engine.run(xs)
        finally:
            self._pool.put(engine)
