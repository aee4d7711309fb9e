"""What the commands share: a user's mistake is one line on stderr and exit status 2, never a
traceback; a traceback is left for bugs."""

import argparse
import sys

from data import DataError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def at_least(minimum, kind=int):
    """An argparse type that refuses values below `minimum`."""

    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def run(main) -> None:
    """Run a command's main(), turning a DataError or a diverged loss into one line and exit
    status 2."""
    try:
        sys.exit(main())
    except (DataError, FloatingPointError) as error:  # bad data, or a loss that diverged
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
