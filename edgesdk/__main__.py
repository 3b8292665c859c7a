"""``python -m edgesdk`` is the ``edgesdk`` command (what the agent's systemd unit runs)."""

from .cli import main

main()
