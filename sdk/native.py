"""Keep native libraries' console chatter out of the user's terminal.

TensorFlow's converter and LiteRT's accelerators write INFO/WARNING/error lines straight to file
descriptor 2 from C++ (``fully_quantize: 0 ...``, ``error: failed while converting``, dozens of
accelerator-registry lines), even when edgesdk handles the situation and reports it in one line.
:func:`native_stderr_to_log` captures fd 2 for the duration of a call and hands the text to the
debug log (``edgesdk -vv`` shows it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

__all__ = ["native_stderr_to_log"]


@contextlib.contextmanager
def native_stderr_to_log(logger: logging.Logger) -> Iterator[None]:
    """Redirect fd 2 to a temporary file meanwhile; log what was written at DEBUG level."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # pytest capture, IDEs: no real fd 2
        yield
        return
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace").strip()
            if text:
                logger.debug("native library output:\n%s", text)
