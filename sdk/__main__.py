"""``python -m sdk`` was the ``edgesdk`` command before it moved to a package of its own: say where
it went (one line, the configuration error's exit code) instead of running it, since ``sdk``
imports nothing above it. Agent units written before the move run ``python -m sdk``: ``edgesdk
agent install`` writes them again with ``python -m edgesdk``."""

import sys

from .errors import ConfigError

print("error: `python -m sdk` is now `python -m edgesdk` (the edgesdk command); a systemd unit that runs it "
      "was written by an older edgesdk: run edgesdk agent install again", file=sys.stderr)
sys.exit(ConfigError.exit_code)
