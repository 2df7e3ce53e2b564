"""User-facing errors: one line naming the file, key or value and what to do; exit code 2."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user. The message is the whole report: one line, no traceback."""


def not_supported(flag: str) -> UserError:
    """The error for a recognised kohya option whose feature sdtune has not built yet."""
    return UserError(f"not supported yet: --{flag.lstrip('-')}")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point, turning a UserError into one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Saves are atomic: whatever was written before Ctrl-C is intact.
        print("interrupted", file=sys.stderr)
        return 130
