"""edgesdk's converter: Keras / SavedModel / TFLite → pruned, quantized, measured, signed bundle.

Workstation only (needs ``pip install 'edgesdk[converter]'``). TensorFlow is imported when a
conversion runs, not when this package is imported, so ``edgesdk --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import ConversionResult

__all__ = ["convert", "ConversionResult"]


def convert(model: Any, **kwargs: Any) -> "ConversionResult":
    """Convert ``model`` to a bundle; the keywords are the fields of :class:`converter.options.ConvertOptions`."""
    from .pipeline import convert as _convert

    return _convert(model, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "ConversionResult":
        from .pipeline import ConversionResult

        return ConversionResult
    raise AttributeError(name)
