"""The ``edgesdk`` command: the root of the command line, above every role.

``sdk`` is the shared foundation and imports nothing above it; ``converter``, ``agent`` and
``fleet`` build on it; this package sits on top and attaches each role's commands lazily
(:mod:`edgesdk.cli`), so a device running ``edgesdk agent run`` loads neither the fleet nor the
converter. It also holds what needs every role at once: ``edgesdk demo`` (:mod:`edgesdk.demo`).
"""

from sdk import __version__

__all__ = ["__version__"]
