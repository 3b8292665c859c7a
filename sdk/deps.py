"""Import optional dependencies with an error that names the extra to install.

edgesdk keeps heavy packages behind extras (``converter`` brings TensorFlow, ``agent`` LiteRT and
paho-mqtt, ``fleet`` paho-mqtt and Pillow). Every optional import goes through :func:`require` so a
missing package always produces :class:`~sdk.errors.MissingDependencyError` with the exact
``pip install``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def require(module: str, extra: str | tuple[str, ...], purpose: str = "") -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming ``edgesdk[extra]`` (a tuple when
    several roles' extras bring it and any of them may be the caller: ``("agent", "fleet")``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra, purpose) from exc
