"""The ``trimode`` command line (entry point ``trimode.runtime.cli:main``): see ``main``."""

from trimode.runtime.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
