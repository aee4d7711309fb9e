"""What the commands share: a user's mistake is one line on stderr and exit status 2, never a
traceback; a traceback is left for bugs. Progress on stderr, the device to run on, exclusive use of an output
folder, outputs that never replace inputs nor lie half written, and freed CPU memory staying ready for reuse.

Light to import (the standard library; torch only inside the functions that need it), so that
every other module can build on it."""

import argparse
import csv
import ctypes
import fcntl
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

NO_MATCH = "n000000"  # the verification task's label for an unknown face matching no known identity


class UserError(Exception):
    """Something the user must change (a flag, a path, a file): the commands print it as one line,
    `error: <message>`, and exit with status 2. Everything else keeps its traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def at_least(minimum, kind=int, below=math.inf):
    """An argparse type that refuses values below `minimum` or from `below` up, and NaN or infinity."""

    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        if value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'abc'"
    return parse


finite_float = at_least(-math.inf, float)  # any float but NaN and infinity


def option(name: str) -> str:
    """A setting's command-line flag: --name-with-dashes."""
    return "--" + name.replace("_", "-")


def log(message: str) -> None:
    """Progress, on stderr: stdout holds a command's results."""
    print(message, file=sys.stderr, flush=True)


def keep_freed_memory() -> bool:
    """Make glibc keep the memory of freed tensors for the next ones, as CUDA's caching allocator
    does, instead of unmapping each large one so that every training step page-faults its largest
    activations in afresh (docs/performance.md). The process then holds its peak memory until it
    exits. False where the C library is not glibc (Windows, macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def pick_device(name: str = "auto"):
    """torch.device `name`; `auto` is CUDA where there is one, else the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here (expected a GPU, or --device cpu)")
    return torch.device(name)


def check_outputs(outputs: dict, inputs: dict) -> None:
    """Refuse, before any work, an output that would replace one of the command's inputs (a file, or
    a file inside an input directory) or another of its outputs, or that names a directory. Both map
    a flag (for the message) to a path, or to None for one not given."""
    given = lambda paths: {flag: Path(path) for flag, path in paths.items() if path is not None}
    inputs, seen = given(inputs), {}
    for flag, path in given(outputs).items():
        if path.is_dir():
            raise UserError(f"{path}: is a directory (expected a file name to write for {flag})")
        for other, kept in [*inputs.items(), *seen.items()]:
            if overlaps(path, kept):
                raise UserError(f"{flag} {path} would write over {other} {kept}: give {flag} another file name")
        seen[flag] = path


def overlaps(output: Path, kept: Path) -> bool:
    """Whether writing `output` would replace `kept`, or a file inside `kept` if it is a directory;
    through links, `..` and case-insensitive file systems."""
    if kept.is_dir():
        return output.exists() and output.resolve().is_relative_to(kept.resolve())
    if output.exists() and kept.exists():
        return os.path.samefile(output, kept)
    return output.resolve() == kept.resolve()


@contextmanager
def atomic_write(path: Path, mode: str = "w"):
    """An open file beside `path` that replaces it only once written whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, mode, newline="" if "b" not in mode else None) as f:
            yield f
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_csv(path: Path, rows) -> None:
    with atomic_write(path) as f:
        csv.writer(f).writerows(rows)


@contextmanager
def atomic_folder(path: Path):
    """A hidden folder beside `path`, renamed to it once the block has filled it: an interrupted
    write leaves nothing behind. The rename replaces an empty folder, never a non-empty one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        partial.chmod(0o755)  # mkdtemp's folder is the owner's alone
        yield partial
        partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # removes links, never what they point to
        raise


@contextmanager
def folder_lock(folder: Path, what: str):
    """Exclusive use of `folder` while the block runs, or a one-line refusal while another process
    has it. The lock is the kernel's, on the folder itself (no lock file): it goes when its holder
    exits, however it ends (even SIGKILL), so a killed run never leaves the folder locked. A folder
    made here and left empty is removed again."""
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}: another {what} is writing into it (wait for it to end, or give another "
                            "folder)") from None
        except OSError as error:  # a file system without locks on folders (some NFS): go on unguarded
            warnings.warn(f"{folder}: cannot be locked ({error.strerror}); make sure no other {what} writes into it")
        yield
    finally:
        os.close(handle)  # lets go of the lock
        if made and not any(folder.iterdir()):
            folder.rmdir()


def run(main) -> None:
    """Run a command's main(), turning a UserError, a diverged loss or a failed file operation
    (disk full, permission denied) into one line and exit status 2; Ctrl-C is exit status 130.
    Two library lines a user can do nothing about stay out: Lightning's ad for its cloud logger and
    torch 2.14's deprecation of a pytree class inside Lightning 2.6."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_lightning_ad)  # once, however often run
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    try:
        sys.exit(main())
    except (UserError, FloatingPointError, OSError) as error:  # the user's input, a diverged loss, the disk
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        sys.exit(130)


def not_lightning_ad(record: logging.LogRecord) -> bool:
    return "💡 Tip" not in record.getMessage()


def one_line(error: Exception) -> str:
    """The error's message. A DataLoader worker re-raises an error with the worker's traceback in
    front of its message; the message is the traceback's last line, after the exception's name."""
    message = str(error).rstrip()
    if "\nOriginal Traceback" in message:
        message = message.splitlines()[-1].partition(": ")[2]
    return message
