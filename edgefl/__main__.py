"""``python -m edgefl``: the same as the ``edgefl`` command."""

from edgefl.cli import main

main()
