"""What the commands share: a user's mistake is one line on stderr and exit status 2, never a
traceback; a traceback is left for bugs. And CPU memory that is freed stays ready for reuse.

Light to import (standard library only), so that a command without torch can use it too."""

import argparse
import ctypes
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


def keep_freed_memory() -> bool:
    """Make glibc keep the memory of freed tensors for the next ones, instead of handing it back.

    By default glibc gives every allocation over 32 MB its own mmap and unmaps it on free, so each
    training step gets its largest activations as fresh pages that the kernel zero-fills at first
    touch: measured on our 2-core CPU, FaceNN's train step (batch 16, 224 px) ran 1.3-1.5x faster
    with this. CUDA's caching allocator does the same for GPU memory. The process then holds on to
    its peak memory until it exits. Returns False where the C library is not glibc (Windows, macOS,
    musl)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


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
