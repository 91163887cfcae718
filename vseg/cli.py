"""Shared behaviour of the command-line entry points: config errors end the run with one clear message."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from vseg.config import ConfigError


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turns a ConfigError into its message on stderr and exit status 2, without a stack trace."""
    try:
        yield
    except ConfigError as err:
        print(f"vseg: {err}", file=sys.stderr)
        sys.exit(2)
