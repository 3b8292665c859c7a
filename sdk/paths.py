"""The one place where a value that came from the network becomes a filesystem path.

An agent keeps transfers under ``<state_dir>/transfers/<bundle sha256>`` and models under
``<state_dir>/models/<name>/<version>``; the fleet keeps bundles under
``<state_dir>/bundles/<sha256>.edgebundle``. Each of those parts arrives in a message. Even
though :mod:`sdk.protocol` already checks every id and digest against its pattern, the stores
join such values into paths only through :func:`confined`, which refuses anything that is not a
single plain name and anything whose resolved path would leave the given root (``..``, ``/``,
symlinks pointing out). ``tests/sdk/test_paths.py`` checks that the agent's and the fleet's
stores build no path from such values another way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ProtocolError

__all__ = ["confined", "SAFE_NAME"]

#: one path component: letters, digits, ``.``, ``_``, ``-``; starting with a letter or digit (so
#: never ``.`` or ``..`` or a hidden file); at most 128 characters.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def confined(root: os.PathLike | str, *parts: str, suffix: str = "") -> Path:
    """``root/part/part...`` (the last part with ``suffix`` appended), guaranteed inside ``root``.

    Every part must be one plain name (:data:`SAFE_NAME`); the joined path, with symlinks
    resolved, must stay under the resolved ``root``. Raises :class:`~sdk.errors.ProtocolError`
    naming the offending value otherwise: the caller drops the message that carried it.
    """
    if not parts:
        raise ProtocolError("confined() needs at least one path part")
    for part in parts:
        if not isinstance(part, str) or not SAFE_NAME.fullmatch(part):
            raise ProtocolError(f"{part!r} cannot name a file: use letters, digits, '.', '_' and '-' "
                                "(at most 128, starting with a letter or digit)")
    base = Path(root)
    path = base.joinpath(*parts[:-1], parts[-1] + suffix)
    real_root = os.path.realpath(base)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ProtocolError(f"{'/'.join(parts)!r} resolves outside {base}: refused")
    return path
