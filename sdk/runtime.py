"""Load a TFLite model on whatever runtime and delegate the machine has, without TensorFlow.

Runtimes, in order of preference:

1. ``ai_edge_litert`` (LiteRT, the maintained runtime; wheels for x86-64 and aarch64),
2. ``tflite_runtime`` (legacy 2.14, what older device images ship; supported, not preferred),
3. ``tensorflow.lite`` (workstation only: imported last, never on a device that has 1 or 2).

Delegates: ``cpu`` (XNNPACK, ``num_threads``), ``gpu`` (an external GPU delegate library at a
configured path, else LiteRT's GPU accelerator through ``CompiledModel``), ``edgetpu``
(``libedgetpu.so.1`` with a pycoral-style device string such as ``usb:0`` or ``pci``), and
``auto`` (Edge TPU, then GPU, then CPU). An explicit request that cannot be met raises
:class:`~sdk.errors.DelegateUnavailableError`; under ``auto`` each miss is logged and recorded in
:attr:`Engine.fallbacks`. :attr:`Engine.delegate` always says what actually runs.

All LiteRT/TensorFlow errors are translated here, at this one boundary.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import (
    DelegateUnavailableError,
    ModelLoadError,
    RuntimeUnavailableError,
    UnsupportedOpError,
)
from .modelinfo import TensorInfo, version_tuple
from .native import native_stderr_to_log

log = logging.getLogger("edgesdk.runtime")

DELEGATES = ("auto", "cpu", "gpu", "edgetpu")
EDGETPU_LIBRARY = "libedgetpu.so.1"
GPU_DELEGATE_LIBRARY = "libtensorflowlite_gpu_delegate.so"

__all__ = [
    "DELEGATES",
    "Runtime",
    "DelegateOptions",
    "Engine",
    "InterpreterEngine",
    "CompiledModelEngine",
    "find_runtime",
    "open_engine",
    "available_delegates",
    "quantize",
    "dequantize",
]


@dataclass(frozen=True)
class Runtime:
    """An importable TFLite runtime."""

    name: str
    version: str
    tflite_version: str
    interpreter_cls: Any = field(repr=False)
    load_delegate: Callable[..., Any] = field(repr=False)
    module: Any = field(repr=False, default=None)

    def supports(self, min_runtime_version: Optional[str]) -> bool:
        """Whether this runtime is at least the TFLite version a model needs."""
        if not min_runtime_version:
            return True
        return version_tuple(self.tflite_version) >= version_tuple(min_runtime_version)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "tflite_version": self.tflite_version}


def _litert_tflite_version(version: str) -> str:
    # LiteRT is built from the TFLite tree; map its release line to the TFLite release whose
    # op versions it understands (a lower bound: 2.x was cut after TF 2.21, 1.x after 2.18).
    return "2.21.0" if version_tuple(version) >= (2,) else "2.18.0"


def _load_runtime(name: str) -> Runtime:
    if name == "ai_edge_litert":
        mod = importlib.import_module("ai_edge_litert.interpreter")
        pkg = importlib.import_module("ai_edge_litert")
        version = getattr(pkg, "__version__", "0")
        return Runtime(name, version, _litert_tflite_version(version), mod.Interpreter, mod.load_delegate, pkg)
    if name == "tflite_runtime":
        mod = importlib.import_module("tflite_runtime.interpreter")
        pkg = importlib.import_module("tflite_runtime")
        version = getattr(pkg, "__version__", "0")
        return Runtime(name, version, version, mod.Interpreter, mod.load_delegate, pkg)
    if name == "tensorflow":
        tf = importlib.import_module("tensorflow")
        return Runtime(name, tf.__version__, tf.__version__, tf.lite.Interpreter, tf.lite.experimental.load_delegate, tf)
    raise RuntimeUnavailableError(f"unknown runtime {name!r}: use ai_edge_litert, tflite_runtime or tensorflow")


_runtime_cache: dict[tuple[Optional[str], bool], Runtime] = {}
_runtime_lock = threading.Lock()


def find_runtime(prefer: Optional[str] = None, *, allow_tensorflow: bool = True) -> Runtime:
    """The first importable runtime (or exactly ``prefer`` when given)."""
    key = (prefer, allow_tensorflow)
    with _runtime_lock:
        if key in _runtime_cache:
            return _runtime_cache[key]
        order = [prefer] if prefer else ["ai_edge_litert", "tflite_runtime"] + (["tensorflow"] if allow_tensorflow else [])
        errors = []
        for name in order:
            try:
                rt = _load_runtime(name)
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
                continue
            _runtime_cache[key] = rt
            return rt
    raise RuntimeUnavailableError(
        "no TFLite runtime can be imported (" + "; ".join(errors) + "): run pip install 'edgesdk[agent]'"
    )


@dataclass
class DelegateOptions:
    """How to build delegates. Defaults suit a Raspberry Pi-class CPU."""

    num_threads: Optional[int] = None
    gpu_delegate_path: Optional[str] = None
    edgetpu_library: str = EDGETPU_LIBRARY
    edgetpu_device: Optional[str] = None


def quantize(x: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """Float values to the tensor's integer representation (round, add zero point, clip)."""
    dtype = np.dtype(spec.dtype)
    if not spec.quantized:
        return np.asarray(x, dtype=dtype)
    info = np.iinfo(dtype)
    q = np.divide(x, np.float32(spec.scale), dtype=np.float32)  # one new buffer, then in place
    np.rint(q, out=q)
    q += spec.zero_point
    np.clip(q, info.min, info.max, out=q)
    return q.astype(dtype)


def dequantize(y: np.ndarray, spec: TensorInfo) -> np.ndarray:
    if not spec.quantized:
        return y
    return (y.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)


class Engine:
    """A model ready to run: tensors allocated once; subclasses implement :meth:`run`.

    ``run`` takes and returns arrays in the model's own dtypes (``raw``); :meth:`run_float`
    quantizes float inputs and dequantizes outputs with each tensor's scale and zero point.
    An engine is not thread-safe: use one per thread.
    """

    delegate: str
    runtime: Runtime
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    fallbacks: list[str]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_float(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        raw = [quantize(x, s) for x, s in zip(inputs, self.inputs)]
        return [dequantize(y, s) for y, s in zip(self.run(raw), self.outputs)]

    def run_batch(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run ``inputs`` of N samples each (batch first, the model's dtypes and sample shapes)
        and return outputs of N rows each. Here: in slices of the model's own batch (the last
        one padded with zeros), for engines that cannot resize; :class:`InterpreterEngine`
        resizes a model with a dynamic batch dimension to N instead and runs it once."""
        n = int(inputs[0].shape[0])
        b = max(1, int(self.inputs[0].shape[0])) if self.inputs and self.inputs[0].shape else 1
        outs: Optional[list[np.ndarray]] = None
        for s in range(0, n, b):
            part = [x[s : s + b] for x in inputs]
            k = int(part[0].shape[0])
            if k < b:  # the last slice of a fixed batch larger than 1: pad, keep the first k rows
                part = [np.concatenate([p, np.zeros((b - k, *p.shape[1:]), p.dtype)]) for p in part]
            ys = self.run(part)
            if outs is None:
                outs = [np.empty((n, *y.shape[1:]), y.dtype) for y in ys]
            for o, y in zip(outs, ys):
                o[s : s + k] = y[:k]
        return outs or []

    def describe(self) -> dict[str, Any]:
        return {"delegate": self.delegate, "runtime": self.runtime.describe(), "fallbacks": list(self.fallbacks)}


def _tensor_info(d: dict[str, Any], keys: Optional[dict[int, str]] = None) -> TensorInfo:
    scale, zero = d.get("quantization", (0.0, 0))
    return TensorInfo(
        name=str(d["name"]),
        shape=[int(v) for v in d["shape"]],
        shape_signature=[int(v) for v in d.get("shape_signature", d["shape"])],
        dtype=np.dtype(d["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero),
        key=(keys or {}).get(int(d["index"]), ""),
    )


def _signature_keys(interpreter: Any) -> tuple[dict[int, str], dict[int, str]]:
    """Tensor index -> signature name for inputs and outputs (the first signature), or empty maps
    for a model without signatures or a runtime that cannot list them."""
    try:
        sigs = interpreter._get_full_signature_list() or {}
    except Exception:  # older runtimes: no signature API; names fall back to tensor names
        return {}, {}
    first = next(iter(sigs.values()), {})
    inverse = lambda m: {int(i): str(k) for k, i in (m or {}).items()}  # noqa: E731
    return inverse(first.get("inputs")), inverse(first.get("outputs"))


class InterpreterEngine(Engine):
    """Runs an already-created Interpreter (passed in, pycoral style, so tests can swap it)."""

    def __init__(self, interpreter: Any, runtime: Runtime, delegate: str, fallbacks: Sequence[str] = ()) -> None:
        self.interpreter = interpreter
        self.runtime = runtime
        self.delegate = delegate
        self.fallbacks = list(fallbacks)
        in_details = interpreter.get_input_details()
        # Models with a dynamic batch dimension run with batch 1, allocated once here.
        for d in in_details:
            shape = list(d["shape"])
            if any(s <= 0 for s in shape) or any(s < 0 for s in d.get("shape_signature", [])):
                interpreter.resize_tensor_input(d["index"], [max(1, int(s)) for s in shape])
        _translate(interpreter.allocate_tensors, "allocate tensors")
        self._in = [d["index"] for d in interpreter.get_input_details()]
        self._out = [d["index"] for d in interpreter.get_output_details()]
        in_keys, out_keys = _signature_keys(interpreter)
        self.inputs = [_tensor_info(d, in_keys) for d in interpreter.get_input_details()]
        self.outputs = [_tensor_info(d, out_keys) for d in interpreter.get_output_details()]
        #: the batch the input tensors are allocated for now (``inputs`` always describe batch 1);
        #: resizable only when every input's batch dimension is dynamic (-1 in its signature)
        self._batch = 1
        self.batchable = bool(self.inputs) and all(
            len(t.shape_signature) >= 1 and t.shape_signature[0] < 0 and t.shape[:1] == [1] for t in self.inputs)

    def _resize(self, n: int) -> None:
        """Allocate the input tensors for a batch of ``n`` (strict: only a dynamic batch dimension)."""
        it = self.interpreter
        for idx, t in zip(self._in, self.inputs):
            it.resize_tensor_input(idx, [n, *t.shape[1:]], strict=True)
        it.allocate_tensors()
        self._batch = n

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        it = self.interpreter
        if self._batch != 1:
            self._resize(1)
        for idx, x in zip(self._in, inputs):
            it.set_tensor(idx, x)
        it.invoke()
        return [it.get_tensor(idx) for idx in self._out]

    def run_batch(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``invoke`` for the whole batch when the model's batch dimension is dynamic; else (a
        fixed batch, or a model whose graph refuses the new size: then never tried again) slice
        by slice. The tensors stay allocated for the last batch size until another one comes."""
        n = int(inputs[0].shape[0])
        if n == 1 or not self.batchable:
            return self._run_each(inputs) if self.inputs[0].shape[:1] == [1] else super().run_batch(inputs)
        it = self.interpreter
        try:
            if self._batch != n:
                self._resize(n)
            for idx, x in zip(self._in, inputs):
                it.set_tensor(idx, x)
            it.invoke()
            ys = [it.get_tensor(idx) for idx in self._out]
            if any(y.ndim < 1 or y.shape[0] != n for y in ys):
                raise ValueError(f"outputs {[list(y.shape) for y in ys]} do not keep the batch of {n}")
            return ys
        except (ValueError, RuntimeError) as exc:  # the graph fixes its batch somewhere (a Reshape, say)
            log.info("batched invoke refused (%s): running this model sample by sample", str(exc).splitlines()[0])
            self.batchable = False
            self._resize(1)
            return self._run_each(inputs)

    def _run_each(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A model of batch 1, sample by sample: the bare ``set_tensor``/``invoke``/``get_tensor``
        loop, each output row written into one array per output (LiteRT refuses ``invoke`` while
        a view of its buffers is held, so this is as direct as it gets from Python)."""
        it = self.interpreter
        if self._batch != 1:
            self._resize(1)
        n = int(inputs[0].shape[0])
        set_tensor, invoke, get_tensor = it.set_tensor, it.invoke, it.get_tensor
        pairs = list(zip(self._in, inputs))
        first = [get_tensor(idx) for idx in self._out]  # shapes and dtypes of the outputs
        outs = [np.empty((n, *y.shape[1:]), y.dtype) for y in first]
        out_pairs = list(zip(self._out, outs))
        for s in range(n):
            for idx, x in pairs:
                set_tensor(idx, x[s : s + 1])
            invoke()
            for idx, o in out_pairs:
                o[s] = get_tensor(idx)[0]
        return outs


class CompiledModelEngine(Engine):
    """LiteRT 2.x ``CompiledModel`` (the path to LiteRT's own GPU accelerator)."""

    def __init__(self, compiled: Any, runtime: Runtime, delegate: str, fallbacks: Sequence[str] = ()) -> None:
        self.compiled = compiled
        self.runtime = runtime
        self.delegate = delegate
        self.fallbacks = list(fallbacks)
        sig = next(iter(compiled.get_signature_list()))
        ins = compiled.get_input_tensor_details(sig)
        outs = compiled.get_output_tensor_details(sig)

        def info(name: str, d: dict[str, Any]) -> TensorInfo:
            shape = [int(v) for v in d["shape"]]
            return TensorInfo(str(d.get("name", name)), shape, shape, np.dtype(d["dtype"]).name, key=str(name))

        self.inputs = [info(k, v) for k, v in ins.items()]
        self.outputs = [info(k, v) for k, v in outs.items()]
        self._in_buf = compiled.create_input_buffers(0)
        self._out_buf = compiled.create_output_buffers(0)
        self._out_meta = [(int(np.prod(o.shape)), np.dtype(o.dtype), o.shape) for o in self.outputs]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        for buf, x in zip(self._in_buf, inputs):
            buf.write(np.ascontiguousarray(x))
        self.compiled.run_by_index(0, self._in_buf, self._out_buf)
        return [buf.read(n, dt).reshape(shape) for buf, (n, dt, shape) in zip(self._out_buf, self._out_meta)]


_OP_MISSING = [
    re.compile(r"unresolved custom op: (\w+)"),
    re.compile(r"Didn't find op for builtin opcode '(\w+)' version '(\d+)'"),
    re.compile(r"Op type not registered '(\w+)'"),
]


def _translate(fn: Callable[[], Any], what: str) -> Any:
    """Call a LiteRT function, turning its ValueError/RuntimeError into ours."""
    try:
        return fn()
    except (ValueError, RuntimeError) as exc:
        msg = str(exc)
        for pat in _OP_MISSING:
            m = pat.search(msg)
            if m:
                op = m.group(1) + (f" version {m.group(2)}" if m.lastindex and m.lastindex > 1 else "")
                raise UnsupportedOpError(
                    f"this runtime cannot run op {op}: re-convert with builtin ops only, "
                    "or upgrade the device runtime (pip install -U ai-edge-litert)",
                    ops=[m.group(1)],
                ) from exc
        first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
        raise ModelLoadError(f"cannot {what}: {first}") from exc


def _preflight_library(path: str, what: str, hint: str) -> None:
    """Check a delegate library loads and exports the external-delegate entry point.

    Done with ctypes first so a missing library gives our message (and no noisy half-built
    delegate object from the runtime).
    """
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise DelegateUnavailableError(f"{what} library {path} cannot be loaded ({exc}): {hint}") from exc
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        raise DelegateUnavailableError(
            f"{path} is not a TFLite external delegate (no tflite_plugin_create_delegate): {hint}"
        )


def _make_interpreter(rt: Runtime, model: bytes, threads: Optional[int], delegates: list[Any]) -> Any:
    kwargs: dict[str, Any] = {"model_content": model}
    if threads:
        kwargs["num_threads"] = threads
    if delegates:
        kwargs["experimental_delegates"] = delegates
    return _translate(lambda: rt.interpreter_cls(**kwargs), "load the model")


def _open_cpu(rt: Runtime, model: bytes, opts: DelegateOptions, fallbacks: list[str]) -> Engine:
    return InterpreterEngine(_make_interpreter(rt, model, opts.num_threads, []), rt, "cpu", fallbacks)


def _open_edgetpu(rt: Runtime, model: bytes, opts: DelegateOptions, fallbacks: list[str]) -> Engine:
    hint = "install the Edge TPU runtime (libedgetpu1-std from Coral's apt repository) and plug in the device"
    _preflight_library(opts.edgetpu_library, "Edge TPU runtime", hint)
    options = {"device": opts.edgetpu_device} if opts.edgetpu_device else {}
    try:
        delegate = rt.load_delegate(opts.edgetpu_library, options)
    except ValueError as exc:
        raise DelegateUnavailableError(
            f"no Edge TPU found (device {opts.edgetpu_device or 'any'}): check the USB/PCIe connection and udev rules"
        ) from exc
    except (OSError, AttributeError) as exc:
        raise DelegateUnavailableError(f"Edge TPU delegate failed to load ({exc}): {hint}") from exc
    return InterpreterEngine(_make_interpreter(rt, model, opts.num_threads, [delegate]), rt, "edgetpu", fallbacks)


def _open_gpu(rt: Runtime, model: bytes, opts: DelegateOptions, fallbacks: list[str]) -> Engine:
    if opts.gpu_delegate_path:
        hint = "build or install the TFLite GPU delegate for this board and set gpu_delegate_path to it"
        _preflight_library(opts.gpu_delegate_path, "GPU delegate", hint)
        try:
            delegate = rt.load_delegate(opts.gpu_delegate_path)
        except (ValueError, OSError, AttributeError) as exc:
            raise DelegateUnavailableError(f"GPU delegate {opts.gpu_delegate_path} failed to load ({exc}): {hint}") from exc
        return InterpreterEngine(_make_interpreter(rt, model, opts.num_threads, [delegate]), rt, "gpu", fallbacks)
    if rt.name != "ai_edge_litert":
        raise DelegateUnavailableError(
            f"runtime {rt.name} has no built-in GPU accelerator: set gpu_delegate_path to a GPU delegate library "
            "or install ai-edge-litert"
        )
    try:
        cm = importlib.import_module("ai_edge_litert.compiled_model")
        ha = importlib.import_module("ai_edge_litert.hardware_accelerator")
    except ImportError as exc:
        raise DelegateUnavailableError(
            f"this ai-edge-litert ({rt.version}) has no CompiledModel GPU accelerator: pip install -U ai-edge-litert"
        ) from exc
    failure = ""
    with native_stderr_to_log(log):
        try:
            compiled = cm.CompiledModel.from_buffer(model, hardware_accel=ha.HardwareAccelerator.GPU)
        except RuntimeError as exc:
            failure = str(exc).strip().splitlines()[0] if str(exc).strip() else "RuntimeError"
        gc.collect()  # the failed accelerator environment logs its teardown: let it happen in here
    if failure:
        log.debug("LiteRT GPU accelerator failed: %s", failure)
        raise DelegateUnavailableError(
            "LiteRT's GPU accelerator found no usable GPU (it needs a Vulkan/OpenCL driver): "
            "install the GPU driver, or set gpu_delegate_path to a GPU delegate library"
        )
    return CompiledModelEngine(compiled, rt, "gpu", fallbacks)


def available_delegates(options: Optional[DelegateOptions] = None) -> list[str]:
    """Delegates whose libraries load here (cheap: no model is created). LiteRT's built-in GPU
    accelerator can only be probed with a model, so ``gpu`` is listed only for a configured
    external GPU delegate library."""
    opts = options or DelegateOptions()
    found = ["cpu"]
    if opts.gpu_delegate_path:
        try:
            _preflight_library(opts.gpu_delegate_path, "GPU delegate", "")
            found.append("gpu")
        except DelegateUnavailableError:
            pass
    try:
        _preflight_library(opts.edgetpu_library, "Edge TPU runtime", "")
        found.append("edgetpu")
    except DelegateUnavailableError:
        pass
    return found


_OPENERS = {"edgetpu": _open_edgetpu, "gpu": _open_gpu, "cpu": _open_cpu}


def open_engine(
    model: bytes,
    delegate: str = "auto",
    options: Optional[DelegateOptions] = None,
    *,
    runtime: Optional[Runtime] = None,
) -> Engine:
    """Load ``model`` (the .tflite bytes) on ``delegate``; see the module docstring."""
    if delegate not in DELEGATES:
        raise DelegateUnavailableError(f"unknown delegate {delegate!r}: choose one of {', '.join(DELEGATES)}")
    rt = runtime or find_runtime()
    opts = options or DelegateOptions()
    if delegate != "auto":
        return _OPENERS[delegate](rt, model, opts, [])
    fallbacks: list[str] = []
    for name in ("edgetpu", "gpu"):
        try:
            return _OPENERS[name](rt, model, opts, fallbacks)
        except DelegateUnavailableError as exc:
            fallbacks.append(f"{name}: {exc}")
            log.info("delegate %s unavailable, falling back: %s", name, exc)
    return _open_cpu(rt, model, opts, fallbacks)
