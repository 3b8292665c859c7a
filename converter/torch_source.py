"""PyTorch sources: an ``nn.Module`` (with ``sample_inputs``) or a ``torch.export.save`` archive (``.pt2``).

The module is converted to float TFLite with litert-torch (once, at load), then every other
recipe quantizes that float model with ai-edge-quantizer (``converter/tflite_quant.py``).
Inputs keep the module's own layout (NCHW for a CNN) unless ``channels_last`` is set; then the
module is wrapped to take NHWC and permute it back, so device data is laid out as images are.
The reference every candidate is judged against is the PyTorch module's own outputs.

torch is imported only when a PyTorch model is converted (``pip install 'edgesdk[torch]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sdk.dataset import Dataset, InputSpec
from sdk.deps import require
from sdk.errors import ConfigError, ConversionError, ModelLoadError
from sdk.modelinfo import read_model_info
from sdk.native import native_stderr_to_log
from sdk.runtime import DelegateOptions

from .loaders import SourceKind, _path
from .options import ConvertOptions
from .recipes import Recipe
from .source import SourceModel
from .tflite_quant import quantize_tflite

log = logging.getLogger("edgesdk.converter")

__all__ = ["TorchKind"]


def _torch() -> Any:
    return require("torch", "torch", "to convert PyTorch models")


def _is_module(model: Any) -> bool:
    torch = sys.modules.get("torch")  # an nn.Module exists only if torch is already imported
    return torch is not None and isinstance(model, torch.nn.Module)


def _channels_last(module: Any) -> Any:
    """``module`` taking NHWC inputs: each 4-D input is permuted to NCHW before the module."""
    torch = _torch()

    class ChannelsLast(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *xs: Any) -> Any:
            return self.inner(*[x.permute(0, 3, 1, 2) if x.dim() == 4 else x for x in xs])

    return ChannelsLast(module)  # no .eval(): a loaded ExportedProgram's module refuses train()/eval()


def _load_pt2(path: Path) -> tuple[Any, tuple[Any, ...]]:
    """The module and example inputs of a ``torch.export.save`` archive."""
    torch = _torch()
    quiet = logging.getLogger("torch.export")  # it logs a traceback before raising on a bad archive
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a zip that is not an ExportedProgram, a version mismatch...
        raise ModelLoadError(f"cannot load {path} as a torch.export archive ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}): save it with torch.export.save") from exc
    finally:
        quiet.setLevel(level)
    example = program.example_inputs
    args = tuple(example[0]) if example else ()
    if not args:
        args = tuple(_inputs_from_specs(program))
    return program.module(), args


def _inputs_from_specs(program: Any) -> list[Any]:
    """Zero tensors shaped as the program's user inputs (when it carries no example inputs)."""
    torch = _torch()
    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    tensors = []
    for name in user:
        val = nodes[name].meta.get("val")
        if val is None or any(not isinstance(d, int) for d in val.shape):
            raise ModelLoadError(f"the .pt2 archive has no example inputs and input {name!r} has no static shape: "
                                 "export it with concrete example inputs")
        tensors.append(torch.zeros(tuple(val.shape), dtype=val.dtype))
    return tensors


def _digest(module: Any, path: Optional[Path]) -> tuple[str, int]:
    """sha256 and size of the archive, or of the module's saved state (an in-memory module)."""
    if path is not None:
        data = path.read_bytes()
    else:
        buf = io.BytesIO()
        _torch().save(module.state_dict(), buf)
        data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), len(data)


def _to_numpy(out: Any) -> list[np.ndarray]:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [o.detach().cpu().numpy() for o in outs]


class TorchKind(SourceKind):
    """An ``nn.Module`` given with ``sample_inputs=(x,)``, or a ``.pt2`` archive."""

    name = "torch"

    def accepts(self, model: Any) -> bool:
        if _is_module(model):
            return True
        p = _path(model)
        return p is not None and p.is_file() and p.suffix.lower() == ".pt2"

    def load(self, model: Any, options: ConvertOptions) -> SourceModel:
        torch = _torch()
        path = None if _is_module(model) else Path(model)
        if path is None:
            if not options.sample_inputs:
                raise ConfigError("a PyTorch module needs sample_inputs=(x,): one example tensor per input, batch 1")
            module, args = model, tuple(options.sample_inputs)
            if module.training:
                module.eval()  # BatchNorm/Dropout as at inference (a .pt2 is already exported that way)
        else:
            module, args = _load_pt2(path)
        args = tuple(a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a)) for a in args)
        if options.channels_last:
            module = _channels_last(module)
            args = tuple(a.permute(0, 2, 3, 1).contiguous() if a.dim() == 4 else a for a in args)
        float_model = self._float_tflite(module, args)
        info = read_model_info(float_model)
        if len(info.inputs) != len(args):
            raise ConversionError(f"the converted model has {len(info.inputs)} inputs, the module {len(args)}")
        specs = [InputSpec(t.io_name, tuple(int(d) for d in a.shape), str(a.numpy().dtype)) for t, a in zip(info.inputs, args)]
        digest, size = _digest(module, path)

        exported = path is not None  # an exported program is specialised to its example batch: run sample by sample

        def run(xs: list[np.ndarray]) -> list[np.ndarray]:
            with torch.no_grad():
                return _to_numpy(module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in xs]))

        def predict(xs: list[np.ndarray]) -> list[np.ndarray]:
            if not exported:
                return run(xs)
            rows = [run([x[i:i + 1] for x in xs]) for i in range(xs[0].shape[0])]
            return [np.concatenate([r[j] for r in rows]) for j in range(len(rows[0]))]

        src = SourceModel("torch", path or Path("<nn.Module>"), digest, size, specs, _predict=predict,
                          outputs=[t.io_name for t in info.outputs])
        src.torch_module, src.float_tflite = module, float_model
        src.layout = "NHWC (--channels-last)" if options.channels_last else "as the module takes it (NCHW for images)"
        return src

    @staticmethod
    def _float_tflite(module: Any, args: tuple[Any, ...]) -> bytes:
        litert_torch = require("litert_torch", "torch", "to convert PyTorch models")
        try:
            with native_stderr_to_log(log), contextlib.redirect_stdout(io.StringIO()) as chatter:  # its progress lines
                model = bytes(litert_torch.convert(module, args).model_content())
            log.debug("litert-torch: %s", chatter.getvalue())
            return model
        except Exception as exc:  # torch.export and the MLIR lowering raise many error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"litert-torch cannot convert the module ({type(exc).__name__}: {first}): "
                                  "it must be exportable with torch.export and use ops LiteRT has") from exc

    def reference(self, src: SourceModel, data: Dataset, delegate: DelegateOptions) -> list[np.ndarray]:
        """The PyTorch module's own outputs."""
        return src.predict(data.xs)

    def convert(self, src: SourceModel, recipe: Recipe, calibration: Optional[Dataset]) -> bytes:
        return quantize_tflite(src.float_tflite, recipe, calibration)
