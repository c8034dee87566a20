"""Output of the command line: plain lines on stdout."""

from __future__ import annotations

import sys


def out(text: str = "") -> None:
    """Print one line of the command's output (stdout; logging goes to stderr)."""
    sys.stdout.write(text + "\n")
