"""What the commands share: a user's mistake is one line on stderr and exit status 2, never a
traceback; a traceback is left for bugs.

Light to import (argparse only), so that a command without torch can use it too."""

import argparse
import math
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def at_least(minimum, kind=int):
    """An argparse type that refuses values below `minimum`, and NaN or infinity."""

    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'abc'"
    return parse


finite_float = at_least(-math.inf, float)  # any float but NaN and infinity


def run(main) -> None:
    """Run a command's main(), turning a DataError, a diverged loss or a failed file operation
    (disk full, permission denied) into one line and exit status 2; Ctrl-C is exit status 130."""
    from data import DataError  # here, not at the top: data imports torch and Lightning

    try:
        sys.exit(main())
    except (DataError, FloatingPointError, OSError) as error:  # bad data, a diverged loss, the disk
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        sys.exit(130)
