"""edgesdk's shared foundation and public Python API.

What the converter, the agent and the fleet share: the bundle format and its signing, errors,
the TFLite runtime/delegate loader, model inspection. Importing ``sdk`` never imports
TensorFlow (a test guards it), so it is safe on devices.
"""

from .bundle import Bundle, Manifest, write_bundle
from .errors import *  # noqa: F401,F403 - the error tree is part of the public API
from .errors import __all__ as _error_names
from .runtime import DelegateOptions, Engine, find_runtime, open_engine
from .signing import generate_keys, load_private_key, load_public_key

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Bundle",
    "Manifest",
    "write_bundle",
    "DelegateOptions",
    "Engine",
    "find_runtime",
    "open_engine",
    "generate_keys",
    "load_private_key",
    "load_public_key",
    *_error_names,
]
