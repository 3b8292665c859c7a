"""``python -m sdk`` is the ``edgesdk`` command."""

from .cli import main

main()
