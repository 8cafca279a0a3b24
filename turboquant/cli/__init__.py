"""The ``turboquant`` command-line tool (see :mod:`turboquant.cli._main`)."""

import sys

from ._main import build_parser, main


def main_exit():
    """Entry point of the ``turboquant`` console script."""
    sys.exit(main())


__all__ = ["build_parser", "main", "main_exit"]
