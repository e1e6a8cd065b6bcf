"""Command-line entry point (the full CLI lands with the checkpoint format)."""

import sys

from . import __version__


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--version", "-V", "version"):
        print(f"expandctl {__version__}")
        return
    print(f"expandctl {__version__}")
