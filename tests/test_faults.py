"""Faults and bad input, through the real commands: each case runs run_training.py, predict.py,
data.py or synthetic_faces.py as `python SCRIPT ARGS` with the repo root as working directory and
checks its exit status (2 for a user's mistake, 0 for a counted skip or a conversion), that stderr
holds one `error: ...` line naming the problem and no traceback, and that no file that existed
before the command was changed (every file hashed before and after).

Starting Python with torch and Lightning takes 4 to 12 s on two shared cores, for every case. So
by default the commands run in children forked from one process that imported those
modules once (`Commands`); each child still runs the script as __main__, with its own argv, exit
status, stdout and stderr, as `python SCRIPT` would. FAULTS_FRESH_PYTHON=1 runs every case in a
fresh interpreter instead, and one test checks that both give the same result.

Covered elsewhere, not repeated here: SIGKILL mid-run then --resume
(test_training.test_sigkill_mid_run_then_resume_finishes_the_planned_epochs), a second run into
an --out that holds one (test_training.test_second_run_into_the_same_out_is_refused), and the
in-process DataError cases of tests/test_data.py and tests/test_predict.py.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
TRAIN, PREDICT, DATA, SYNTH = (str(ROOT / name) for name in ("run_training.py", "predict.py", "data.py", "synthetic_faces.py"))
ONE_EPOCH = [*FAST, "--epochs", "1"]
FRESH_PYTHON = os.environ.get("FAULTS_FRESH_PYTHON") == "1"


# -----------------------------------------------------------------------------
# running the commands

# A process that imports the commands' modules once, then for each request forks a child that
# runs one script as __main__ with the requested argv, its stdout and stderr going to files.
ZYGOTE = r"""
import atexit, json, os, runpy, sys, traceback
root = sys.argv[1]
sys.path[:1] = [root]
import data, predict, run_training, synthetic_faces, torchvision  # the slow imports, once

def run_script(argv, stdout, stderr):
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` sets it
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

requests, replies = os.fdopen(os.dup(0), "r"), os.dup(1)
for line in requests:
    argv, stdout, stderr = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run_script(argv, stdout, stderr)
    os.write(replies, f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    os.write(replies, f"{os.waitstatus_to_exitcode(status)}\n".encode())
"""


def as_in_a_terminal():
    """Ctrl-C reaches the command as it would in a terminal: a job a shell started in the background
    (a CI runner's, say) inherits SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Commands:
    """`commands(script, *args)` runs `python script args` in ROOT and returns a CompletedProcess;
    `start` and `finish` split that in two, for signalling the process (`pid`) in between."""

    def __init__(self, fresh: bool):
        self.fresh, self.zygote, self.buffer, self.running = fresh, None, b"", None
        self.dir = Path(tempfile.mkdtemp(prefix="faults-"))

    def __call__(self, script, *args, timeout=180) -> subprocess.CompletedProcess:
        self.start(script, *args)
        return self.finish(timeout)

    def start(self, script, *args) -> int:
        """Starts the command; returns its process id."""
        assert self.running is None, "one command at a time"
        argv = [str(script), *map(str, args)]
        out, err = self.dir / "stdout", self.dir / "stderr"
        if self.fresh:
            process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=open(out, "w"), stderr=open(err, "w"),
                                       preexec_fn=as_in_a_terminal)
            self.running = argv, process
            return process.pid
        if self.zygote is None:
            self.zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(ROOT)], cwd=ROOT, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=open(self.dir / "zygote.err", "w"),
                                           preexec_fn=as_in_a_terminal)
        self.zygote.stdin.write((json.dumps([argv, str(out), str(err)]) + "\n").encode())
        self.zygote.stdin.flush()
        pid = int(self._reply(time.monotonic() + 240))  # the first call waits for the imports
        self.running = argv, pid
        return pid

    def finish(self, timeout=180) -> subprocess.CompletedProcess:
        """Waits for the started command; kills it after `timeout` seconds and raises TimeoutExpired."""
        (argv, process), self.running = self.running, None
        try:
            if self.fresh:
                code = process.wait(timeout)
            else:
                code = int(self._reply(time.monotonic() + timeout))
        except subprocess.TimeoutExpired:
            if self.fresh:
                process.kill()
                process.wait()
            else:
                os.kill(process, signal.SIGKILL)
                self._reply(time.monotonic() + 60)
            raise
        out, err = ((self.dir / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(argv, code, out, err)

    def _reply(self, deadline) -> str:
        fd = self.zygote.stdout.fileno()
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired("zygote", deadline)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the command runner died: {(self.dir / 'zygote.err').read_text()[-2000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def close(self):
        if self.zygote is not None:
            self.zygote.stdin.close()
            self.zygote.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def commands():
    runner = Commands(fresh=FRESH_PYTHON)
    yield runner
    runner.close()


def error_line(result, *expected) -> str:
    """The one `error: ...` line of a failed command, after checking exit status 2, no traceback,
    and that the line holds every `expected` text. Warnings may come before it."""
    context = f"exit {result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, context
    assert result.returncode == 2, context
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], context  # one, and last
    for text in expected:
        assert text in lines[0], context
    return lines[0]


def succeeded(result):
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert not any(line.startswith("error:") for line in result.stderr.splitlines()), result.stderr[-3000:]
    return result


def snapshot(*roots) -> dict[Path, str]:
    """sha256 of every file under `roots` (files or directories)."""
    files = []
    for root in map(Path, roots):
        files += [root] if root.is_file() else [path for path in root.rglob("*") if path.is_file()]
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def assert_kept(before: dict[Path, str]):
    """Every file of `before` still there, byte for byte."""
    assert before, "nothing was hashed"
    after = {path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "gone" for path in before}
    assert after == before, [str(path) for path in before if after[path] != before[path]]


def load_epoch(path) -> int:
    """The epoch of a checkpoint that predict.py can load, with finite weights."""
    model = predict.load_model(path, "cpu")
    assert all(torch.isfinite(value).all() for value in model.state_dict().values() if value.is_floating_point())
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


# -----------------------------------------------------------------------------
# small data sets and bad files

def write_image(path, size=32, mode="RGB", seed=0):
    """A noise image in `mode`: PNG for RGBA and palette, JPEG otherwise; `path` may be a BytesIO."""
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng([seed, size]).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, "PNG" if mode in ("RGBA", "P") else "JPEG")
    return path


def make_set(root: Path, identities=("a", "b"), train=4, dev=2, test=2, size=32) -> Path:
    """identities x (train, dev) noise JPEGs at size px, and a flat test/ of `test` per identity."""
    for split, count in (("train", train), ("dev", dev)):
        for i, identity in enumerate(identities):
            for k in range(count):
                write_image(root / split / identity / f"{k:03d}.jpg", size, seed=i * 100 + k + (split == "dev") * 50)
    for k in range(test * len(identities)):
        write_image(root / "test" / f"{k:03d}.jpg", size, seed=1000 + k)
    return root


def write_bad(path: Path, kind: str) -> Path:
    """A file named .jpg that no decoder can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    good = write_image(io.BytesIO(), 32).getvalue()
    noise = np.random.default_rng(1).integers(0, 256, len(good), dtype=np.uint8).tobytes()
    path.write_bytes({
        "corrupt header": b"\0" * 16 + good[16:],
        "corrupt data": good[: len(good) // 2] + noise[: len(good) // 2],
        "truncated": good[: len(good) // 2],
        "zero bytes": b"",
        "text named .jpg": b"this is not a jpeg\n",
    }[kind])
    with pytest.raises(OSError):  # PIL's errors for these are OSErrors: the guard for the case itself
        with Image.open(path) as image:
            image.convert("RGB")
    return path


BAD_KINDS = ["corrupt header", "corrupt data", "truncated", "zero bytes", "text named .jpg"]
MODES = ["L", "RGBA", "CMYK", "P"]  # grayscale, alpha, CMYK JPEG, palette


@pytest.fixture
def small(tmp_path):
    return make_set(tmp_path / "data")


def train(commands, data_dir, out, *flags, timeout=180):
    return commands(TRAIN, "--data-dir", data_dir, "--out", out, *ONE_EPOCH, *flags, timeout=timeout)


# -----------------------------------------------------------------------------
# data: every bad layout is one line naming the path; nothing under the data dir changes

def rename_images_to_txt(split: Path):
    for path in split.rglob("*.jpg"):
        path.rename(path.with_suffix(".txt"))


DATA_ERRORS = {  # case: (how to break the small set, text of the error line[, extra flags])
    "no data directory": (lambda root: shutil.rmtree(root), "no data directory at"),
    "train/ missing": (lambda root: shutil.rmtree(root / "train"), "train: directory not found"),
    "train/ without identity folders": (
        lambda root: [shutil.rmtree(root / "train"), (root / "train").mkdir()], "train: no identity folders"),
    "dev/ without identity folders": (
        lambda root: [shutil.rmtree(root / "dev"), (root / "dev").mkdir()], "dev: no identity folders"),
    "train/ without images": (lambda root: rename_images_to_txt(root / "train"), "train: no images"),
    "dev/ without images": (lambda root: rename_images_to_txt(root / "dev"), "dev: no images"),
    "empty train identity folder": (lambda root: (root / "train" / "c").mkdir(), "train/c: no images"),
    "dev identity not in train": (
        lambda root: shutil.copytree(root / "dev" / "b", root / "dev" / "stranger"), "dev/stranger: identity not in"),
    "every train image unreadable": (
        lambda root: [write_bad(path, "truncated") for path in list((root / "train").rglob("*.jpg"))],
        "none of its 8 images can be read"),
    "mixed sizes without --image-size": (  # one batch holds all 9 train images
        lambda root: write_image(root / "train" / "a" / "wide.jpg", 40), "images of different sizes in one batch",
        ["--batch-size", "16"]),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_data_is_one_line_and_changes_nothing(commands, small, tmp_path, case):
    breakage, expected, *flags = DATA_ERRORS[case]
    breakage(small)
    (tmp_path / "keep.txt").write_text("a file of the user's\n")
    before = snapshot(tmp_path)
    line = error_line(train(commands, small, tmp_path / "out", *(flags[0] if flags else [])), expected)
    assert str(small) in line or "images of different sizes" in line  # names the path, where there is one
    assert_kept(before)
    assert not (tmp_path / "out" / "last.ckpt").exists()


def corrupt_every_kind(root: Path) -> list[Path]:
    """One file of each BAD_KINDS in train/a and train/b, and one in dev/a."""
    bad = [write_bad(root / "train" / "ab"[i % 2] / f"bad-{i}.jpg", kind) for i, kind in enumerate(BAD_KINDS)]
    return bad + [write_bad(root / "dev" / "a" / "bad.jpg", "truncated")]


def every_mode(root: Path) -> list[Path]:
    return [write_image(root / "train" / "ab"[i % 2] / f"mode-{mode}.{'png' if mode in ('RGBA', 'P') else 'jpg'}",
                        mode=mode) for i, mode in enumerate(MODES)]


UNICODE_NAMES = ("José Ñúñez", "名前 空白", "with  two spaces", "émoji 🙂")

DATA_THAT_TRAINS = {  # case: (change to the small set, extra flags)
    "unreadable train and dev images are skipped": (corrupt_every_kind, []),
    "grayscale, RGBA, CMYK and palette images": (every_mode, []),
    "mixed sizes with --image-size": (lambda root: write_image(root / "train" / "a" / "wide.jpg", 40), ["--image-size", "32"]),
    "empty dev identity folder": (lambda root: [path.unlink() for path in list((root / "dev" / "b").iterdir())], []),
    "one image past a full batch": (lambda root: write_image(root / "train" / "a" / "extra.jpg"), []),
    "dev lacks an identity": (lambda root: shutil.rmtree(root / "dev" / "b"), []),
}


@pytest.mark.parametrize("case", DATA_THAT_TRAINS)
def test_data_that_trains(commands, small, tmp_path, case):
    change, flags = DATA_THAT_TRAINS[case]
    bad = change(small) or []
    before = snapshot(small)
    result = succeeded(train(commands, small, tmp_path / "out", *flags))
    assert load_epoch(tmp_path / "out" / "last.ckpt") == 0
    for path in bad if case.startswith("unreadable") else []:  # each skip counted once, by name
        assert len(re.findall(rf"skipping unreadable image {re.escape(str(path))}:", result.stderr)) == 1, result.stderr
    assert_kept(before)


def test_unicode_and_spaces_in_identity_names_train_evaluate_and_submit(commands, tmp_path):
    data = make_set(tmp_path / "data", identities=UNICODE_NAMES)
    before = snapshot(data)
    succeeded(train(commands, data, tmp_path / "out"))
    checkpoint = tmp_path / "out" / "last.ckpt"
    assert predict.load_model(checkpoint, "cpu").class_names == sorted(UNICODE_NAMES)
    result = succeeded(commands(PREDICT, "evaluate", "--checkpoint", checkpoint, "--data-dir", data / "dev", "--num-workers", "0"))
    assert f"on {2 * len(UNICODE_NAMES)} images" in result.stdout
    out = tmp_path / "submission.csv"
    succeeded(commands(PREDICT, "submit", "--checkpoint", checkpoint, "--test-dir", data / "test", "--out", out,
                       "--label-names", "--num-workers", "0"))
    rows = out.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 2 * len(UNICODE_NAMES) and {row.split(",", 1)[1] for row in rows[1:]} <= set(UNICODE_NAMES)
    assert_kept(before)


# data.py stats and predict.py submit on the same kinds of files

@pytest.mark.parametrize("kind", BAD_KINDS)
def test_stats_skips_an_unreadable_image_by_name(commands, small, kind):
    bad = write_bad(small / "train" / "a" / "bad.jpg", kind)
    before = snapshot(small)
    result = succeeded(commands(DATA, "stats", small / "train", "--num-workers", "0"))
    assert result.stderr.count(f"skipping unreadable image {bad}:") == 1 and "mean (" in result.stdout
    assert_kept(before)


@pytest.mark.parametrize("mode", MODES)
def test_stats_and_submit_convert_any_image_mode(commands, small, trained_run, tmp_path, mode):
    suffix = "png" if mode in ("RGBA", "P") else "jpg"
    write_image(small / "train" / "a" / f"odd.{suffix}", mode=mode)
    test_dir = tmp_path / "test"
    for k in range(3):
        write_image(test_dir / f"{k}.{suffix}", 48, mode=mode)
    assert Image.open(test_dir / f"0.{suffix}").mode == mode
    succeeded(commands(DATA, "stats", small / "train", "--num-workers", "0"))
    out = tmp_path / "submission.csv"
    succeeded(commands(PREDICT, "submit", "--checkpoint", trained_run / "best.ckpt", "--test-dir", test_dir, "--out", out,
                       "--num-workers", "0"))
    assert len(out.read_text().splitlines()) == 4


STATS_ERRORS = {  # case: (arguments after `stats`, given the small set; text of the error line)
    "missing directory": (lambda root: [root / "nowhere"], "nowhere: directory not found"),
    "no identity folders": (lambda root: [root / "test"], "test: no identity folders"),
    "every image unreadable": (
        lambda root: [[write_bad(path, "zero bytes") for path in list((root / "train").rglob("*.jpg"))], root / "train"][1:],
        "none of its 8 images can be read"),
}


@pytest.mark.parametrize("case", STATS_ERRORS)
def test_stats_errors(commands, small, case):
    arguments, expected = STATS_ERRORS[case]
    arguments = arguments(small)
    before = snapshot(small)
    error_line(commands(DATA, "stats", *arguments, "--num-workers", "0"), expected)
    assert_kept(before)


@pytest.fixture(scope="module")
def earlier_outputs(tmp_path_factory):
    """Files predict.py would write, holding an earlier run's output."""
    root = tmp_path_factory.mktemp("earlier")
    for name in ("submission.csv", "emb.npy", "emb.txt", "scores.csv", "identities.csv"):
        (root / name).write_text(f"earlier {name}\n")
    (root / "pairs.csv").write_text("img1,img2,same\n")  # predict_command fills it for verify
    return root


@pytest.mark.parametrize("kind", [*BAD_KINDS, "mixed sizes"])
def test_submit_names_the_unreadable_test_image_and_keeps_the_earlier_submission(commands, trained_run, tiny_faces,
                                                                                   earlier_outputs, tmp_path, kind):
    test_dir = shutil.copytree(tiny_faces / "test", tmp_path / "test")
    if kind == "mixed sizes":
        bad, expected = write_image(test_dir / "zz-wide.jpg", 40), "images of different sizes in one batch"
    else:
        bad = write_bad(test_dir / "bad.jpg", kind)
        expected = f"{bad}: unreadable image"
    before = snapshot(earlier_outputs, test_dir)
    error_line(commands(PREDICT, "submit", "--checkpoint", trained_run / "best.ckpt", "--test-dir", test_dir,
                        "--out", earlier_outputs / "submission.csv", "--num-workers", "0"), expected)
    assert_kept(before)
    assert sorted(path.name for path in earlier_outputs.iterdir()) == ["emb.npy", "emb.txt", "identities.csv", "pairs.csv",
                                                                        "scores.csv", "submission.csv"]


def test_submit_skip_bad_counts_every_unreadable_image(commands, trained_run, tiny_faces, tmp_path):
    test_dir = shutil.copytree(tiny_faces / "test", tmp_path / "test")
    bad = [write_bad(test_dir / f"bad-{i}.jpg", kind) for i, kind in enumerate(BAD_KINDS)]
    out = tmp_path / "submission.csv"
    result = succeeded(commands(PREDICT, "submit", "--checkpoint", trained_run / "best.ckpt", "--test-dir", test_dir,
                                "--out", out, "--skip-bad", "--num-workers", "0"))
    assert f"leaving out {len(bad)} unreadable images" in result.stdout
    assert all(result.stderr.count(f"leaving out unreadable test image {path}:") == 1 for path in bad), result.stderr
    assert len(out.read_text().splitlines()) == 1 + len(list((tiny_faces / "test").iterdir()))


# -----------------------------------------------------------------------------
# checkpoints: a missing, damaged or foreign checkpoint is one line naming it, for every command

@pytest.fixture(scope="module")
def bad_checkpoints(trained_run, tmp_path_factory):
    """Checkpoints that are not a FaceClassifier run_training.py could resume or predict.py load."""
    import torchvision

    root = tmp_path_factory.mktemp("bad_checkpoints")
    good = (trained_run / "best.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (root / "zero.ckpt").write_bytes(b"")
    (root / "directory.ckpt").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.ckpt")

    def edited(name, change):
        checkpoint = torch.load(trained_run / "best.ckpt", map_location="cpu", weights_only=False)
        change(checkpoint["hyper_parameters"])
        torch.save(checkpoint, root / name)

    edited("no_facenn.ckpt", lambda hp: hp["architecture"].update(widths=(8, 16, 24)))  # 3 widths, 4 depths
    edited("unknown_setting.ckpt", lambda hp: hp.update(colour="blue"))
    edited("other_widths.ckpt", lambda hp: hp["architecture"].update(widths=(16, 16, 24, 32)))  # weights do not fit
    return root


CHECKPOINT_FAULTS = {  # checkpoint: (text of predict.py's error line, of run_training.py --resume's)
    "missing.ckpt": ("checkpoint not found", "no checkpoint to resume at"),
    "directory.ckpt": ("checkpoint not found", "no checkpoint to resume at"),
    "truncated.ckpt": ("cannot read checkpoint", "cannot read checkpoint"),
    "zero.ckpt": ("cannot read checkpoint", "cannot read checkpoint"),
    "resnet18.ckpt": ("not a FaceClassifier checkpoint", "not a FaceClassifier checkpoint"),
    "no_facenn.ckpt": ("do not fit FaceClassifier", "do not fit FaceClassifier"),
    "unknown_setting.ckpt": ("do not fit FaceClassifier", "do not fit FaceClassifier"),
    "other_widths.ckpt": ("do not fit FaceClassifier", "do not fit FaceClassifier"),
}


def predict_command(command, checkpoint, tiny_faces, outputs):
    """predict.py arguments for `command`, writing over the earlier outputs."""
    workers = ["--num-workers", "0", "--checkpoint", checkpoint]
    if command == "submit":
        return ["submit", *workers, "--test-dir", tiny_faces / "test", "--out", outputs / "submission.csv"]
    if command == "evaluate":
        return ["evaluate", *workers, "--data-dir", tiny_faces / "dev"]
    if command == "embed":
        return ["embed", *workers, "--images", tiny_faces / "test", "--out", outputs / "emb.npy"]
    if command == "identify":
        return ["identify", *workers, "--known", tiny_faces / "train", "--unknown", tiny_faces / "test",
                "--out", outputs / "identities.csv", "--threshold", "0.5"]
    names = sorted(path.name for path in (tiny_faces / "test").iterdir())
    pairs = outputs / "pairs.csv"
    pairs.write_text(f"img1,img2,same\n{names[0]},{names[1]},1\n{names[0]},{names[2]},0\n")
    return ["verify", *workers, "--pairs", pairs, "--images", tiny_faces / "test", "--out", outputs / "scores.csv"]


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
@pytest.mark.parametrize("command", ["submit", "evaluate", "embed", "verify", "identify"])
def test_predict_refuses_a_bad_checkpoint_in_one_line(commands, bad_checkpoints, tiny_faces, earlier_outputs, command, fault):
    argv = predict_command(command, bad_checkpoints / fault, tiny_faces, earlier_outputs)
    before = snapshot(earlier_outputs, bad_checkpoints)
    error_line(commands(PREDICT, *argv), f"{bad_checkpoints / fault}: ", CHECKPOINT_FAULTS[fault][0])
    assert_kept(before)


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_resume_refuses_a_bad_checkpoint_in_one_line(commands, bad_checkpoints, tiny_faces, tmp_path, fault):
    before = snapshot(bad_checkpoints)
    result = train(commands, tiny_faces, tmp_path / "out", "--epochs", "2", "--resume", bad_checkpoints / fault)
    error_line(result, str(bad_checkpoints / fault), CHECKPOINT_FAULTS[fault][1])
    assert_kept(before)


@pytest.mark.parametrize("fault", ["missing.ckpt", "truncated.ckpt", "other_widths.ckpt"])
def test_init_from_refuses_a_bad_checkpoint_in_one_line(commands, bad_checkpoints, tiny_faces, tmp_path, fault):
    result = train(commands, tiny_faces, tmp_path / "out", "--init-from", bad_checkpoints / fault)
    error_line(result, str(bad_checkpoints / fault), CHECKPOINT_FAULTS[fault][0])
    assert not (tmp_path / "out" / "last.ckpt").exists()


@pytest.fixture
def other_identities(tiny_faces, tmp_path):
    """The tiny set with one identity renamed, in train and dev: classes the checkpoint lacks."""
    data = tmp_path / "other"
    for split in ("train", "dev"):
        shutil.copytree(tiny_faces / split, data / split)
        (data / split / "n000004").rename(data / split / "someone_else")
    return data


def test_resume_on_other_identities_is_refused(commands, trained_run, other_identities, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = snapshot(run, other_identities)
    error_line(train(commands, other_identities, run, "--resume"), "last.ckpt was trained on other identities")
    assert_kept(before)


def test_init_from_another_network_is_refused_on_other_identities_too(commands, trained_run, other_identities, tmp_path):
    """Other identities start a new classifier; another network is still refused, naming the flag."""
    result = train(commands, other_identities, tmp_path / "out", "--loss", "arcface", "--init-from", trained_run / "best.ckpt",
                   "--widths", "8,16,24,48")
    error_line(result, "best.ckpt: its network differs from this one: it has --widths 8,16,24,32, this run 8,16,24,48")
    assert not (tmp_path / "out" / "last.ckpt").exists()


def test_evaluate_on_identities_the_checkpoint_lacks_is_refused(commands, trained_run, other_identities):
    result = commands(PREDICT, "evaluate", "--checkpoint", trained_run / "best.ckpt", "--data-dir",
                      other_identities / "dev", "--num-workers", "0")
    error_line(result, "someone_else: identity unknown to")


def test_scoring_against_identities_the_checkpoint_lacks_is_refused(commands, trained_run, tmp_path):
    labels, submission = tmp_path / "labels.csv", tmp_path / "submission.csv"
    labels.write_text("id,label\n0.jpg,n000001\n1.jpg,someone_else\n")
    submission.write_text("id,label\n0.jpg,0\n1.jpg,1\n")
    result = commands(PREDICT, "evaluate", "--submission", submission, "--labels", labels, "--checkpoint",
                      trained_run / "best.ckpt")
    error_line(result, "identity someone_else unknown to")


# -----------------------------------------------------------------------------
# runs: Ctrl-C, an existing --out, a failed checkpoint write, a diverged loss

@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_run_says_so_and_leaves_a_resumable_last_checkpoint(commands, small, tmp_path, signum, status):
    """Ctrl-C in a terminal, or SIGTERM from a scheduler (SLURM preemption, kill): not exit 0."""
    out = tmp_path / "out"
    args = ["--data-dir", small, "--out", out, *FAST, "--epochs", "16"]  # one step an epoch: 15 to stop in, if busy
    pid = commands.start(TRAIN, *args)
    deadline = time.monotonic() + 180
    while not (out / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):  # (gone already only if all 16 epochs ran: the asserts say so)
        os.kill(pid, signum)  # once the first epoch is saved
    result = commands.finish(timeout=120)
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"continue from {out / 'last.ckpt'} with --resume" in result.stderr.strip().splitlines()[-1]
    assert load_epoch(out / "last.ckpt") < 15
    succeeded(commands(TRAIN, *args, "--resume"))
    assert load_epoch(out / "last.ckpt") == 15
    assert predict.load_model(out / "best.ckpt", "cpu").hparams.max_epochs == 16


def wrapper(tmp_path, patch: str) -> Path:
    """A script that applies `patch`, then runs run_training.py's main as the script does."""
    script = tmp_path / "patched_run_training.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n{patch}\n"
                      "import run_training\nfrom cli import run\nrun(run_training.main)\n")
    return script


INTERRUPT_AT_STEP_1 = """
import training
step = training.FaceClassifier.training_step
def training_step(self, batch, batch_idx):
    if self.global_step == 1:
        raise KeyboardInterrupt  # what Ctrl-C raises
    return step(self, batch, batch_idx)
training.FaceClassifier.training_step = training_step
"""


def test_ctrl_c_exits_130_and_says_how_to_resume(commands, small, tmp_path):
    result = commands(wrapper(tmp_path, INTERRUPT_AT_STEP_1), "--data-dir", small, "--out", tmp_path / "out",
                      *FAST, "--epochs", "2")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--resume" in result.stderr.strip().splitlines()[-1]
    assert load_epoch(tmp_path / "out" / "last.ckpt") == 0


@pytest.fixture
def earlier_run(trained_run, tmp_path):
    """A copy of the session's trained run, so that a bug here cannot spoil it for other tests."""
    return shutil.copytree(trained_run, tmp_path / "run")


def test_overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start(commands, earlier_run, tmp_path):
    broken = tmp_path / "broken"
    (broken / "dev" / "a").mkdir(parents=True)  # no train/
    before = snapshot(earlier_run)
    error_line(train(commands, broken, earlier_run, "--overwrite"), "train: directory not found")
    assert_kept(before)


def test_overwrite_replaces_the_earlier_run(commands, earlier_run, tiny_faces):
    old = torch.load(earlier_run / "last.ckpt", map_location="cpu", weights_only=True)
    succeeded(train(commands, tiny_faces, earlier_run, "--overwrite"))
    assert old["epoch"] == 7 and load_epoch(earlier_run / "last.ckpt") == 0
    assert (earlier_run / "metrics.csv").read_text().count("\n") < 20  # the new run's log only


# Each patch makes the first checkpoint write of epoch 1 fail as a full disk would; epoch 0's
# last.ckpt and best.ckpt must survive whole.
WRITE_FAULTS = {
    "torch.save raises": """
import errno, torch
save = torch.save
def failing_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch", 0) >= 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return save(obj, f, *args, **kwargs)
torch.save = failing_save
""",
    "half the file written": """
import errno, io, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
save = TorchCheckpointIO.save_checkpoint
def half_save(self, checkpoint, path, storage_options=None):
    if checkpoint.get("epoch", 0) >= 1:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    save(self, checkpoint, path, storage_options)
TorchCheckpointIO.save_checkpoint = half_save
""",
    "rename fails": """
import errno, pathlib, torch
replace = pathlib.Path.replace
def failing_replace(self, target):
    if self.name.endswith(".ckpt.partial") and torch.load(self, map_location="cpu", weights_only=False)["epoch"] >= 1:
        raise OSError(errno.ENOSPC, "No space left on device", str(self), None, str(target))
    return replace(self, target)
pathlib.Path.replace = failing_replace
""",
}


@pytest.fixture(scope="module")
def failed_writes(commands, tmp_path_factory):
    """For each WRITE_FAULTS: (the command's result, its --out), from a 2-epoch run."""
    data = make_set(tmp_path_factory.mktemp("write_fault") / "data")
    results = {}
    for fault, patch in WRITE_FAULTS.items():
        root = tmp_path_factory.mktemp("write_fault")
        result = commands(wrapper(root, patch), "--data-dir", data, "--out", root / "out", *FAST, "--epochs", "2")
        results[fault] = result, root / "out"
    return results


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_failed_checkpoint_write_keeps_the_previous_checkpoints(failed_writes, fault):
    result, out = failed_writes[fault]
    error_line(result, "No space left on device")
    assert load_epoch(out / "last.ckpt") == 0
    assert load_epoch(out / "best.ckpt") == 0


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_failed_checkpoint_write_leaves_no_partial_file(failed_writes, fault):
    _, out = failed_writes[fault]
    assert sorted(path.name for path in out.glob("*.ckpt*")) == ["best.ckpt", "last.ckpt"]


POISON_STEP_3 = """
import training
step = training.FaceClassifier.training_step
def training_step(self, batch, batch_idx):
    images, labels = batch
    if self.global_step == 3:
        images = images * float("nan")  # one poisoned batch
    return step(self, (images, labels), batch_idx)
training.FaceClassifier.training_step = training_step
"""


@pytest.mark.parametrize("how", ["--lr 1e30", "a NaN batch at step 3"])
def test_diverged_loss_stops_naming_the_step(commands, small, tmp_path, how):
    out = tmp_path / "out"
    if how == "--lr 1e30":  # no warm-up: the first update blows the weights up
        result = train(commands, small, out, "--epochs", "3", "--warmup-epochs", "0", "--lr", "1e30", "--batch-size", "4")
        expected = re.compile(r"training loss is (nan|inf|-inf) at step \d+ \(epoch \d+\): lower --lr")
    else:  # 8 images, batch 4: steps 0 and 1 are epoch 0, so last.ckpt of epoch 0 must survive whole
        result = commands(wrapper(tmp_path, POISON_STEP_3), "--data-dir", small, "--out", out, *FAST,
                          "--epochs", "2", "--batch-size", "4")
        expected = re.compile(r"training loss is nan at step 3 \(epoch 1\)")
        assert load_epoch(out / "last.ckpt") == 0
    assert expected.search(error_line(result)), result.stderr[-2000:]


# -----------------------------------------------------------------------------
# command lines: one line naming the flag

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

CLI_ERRORS = [  # (script, arguments, text of the error line); {data}: the tiny set, {out}: an empty directory,
    # {ckpt}: the trained run's best.ckpt
    (TRAIN, "--epochs 0", "--epochs: must be >= 1, got 0"),
    (TRAIN, "--epochs abc", "--epochs: invalid int value: 'abc'"),
    (TRAIN, "--epochs 2.5", "--epochs: invalid int value: '2.5'"),
    (TRAIN, "--image-size 31", "--image-size: must be >= 32, got 31"),
    (TRAIN, "--std 0 0 0", "--std: must be >= 1e-06, got 0"),
    (TRAIN, "--std 0.2 0 0.2", "--std: must be >= 1e-06, got 0"),
    (TRAIN, "--std nan 1 1", "--std: must be a finite number, got nan"),
    (TRAIN, "--std 0.2 0.2", "--std: expected 3 arguments"),
    (TRAIN, "--lr 0", "--lr: must be >= 1e-12, got 0"),
    (TRAIN, "--lr nan", "--lr: must be a finite number, got nan"),
    (TRAIN, "--lr inf", "--lr: must be a finite number, got inf"),
    (TRAIN, "--weight-decay -0.1", "--weight-decay: must be >= 0.0"),
    (TRAIN, "--subset-classes 0", "--subset-classes: must be >= 1"),
    (TRAIN, "--num-workers -1", "--num-workers: must be >= 0"),
    (TRAIN, "--head-layers 3", "--head-layers: invalid choice"),
    (TRAIN, "--widths 8,x", "--widths: invalid int_list value"),
    (TRAIN, "--resume a b", "unrecognized arguments: b"),
    (TRAIN, "--data-dir {data} --out {out} --subset-classes 9", "has 4 identities (expected subset_classes from 1 to 4"),
    (TRAIN, "--data-dir {data} --out {out} --mean nan 0.5 0.5", "--mean: must be a finite number"),
    (TRAIN, "--widths 8,16,24", "--widths (8, 16, 24) and --depths (2, 2, 6, 2)"),
    (TRAIN, "--depths 1,1,1,1,1", "--widths (80, 160, 320, 640) and --depths (1, 1, 1, 1, 1)"),
    (TRAIN, "--widths 0,8,16,32", "--widths: expected positive integers"),
    (TRAIN, "--data-dir {data} --out {out} --wandb off --precision bogus", "Precision 'bogus' is invalid"),
    (TRAIN, "--data-dir {data} --out {out} --wandb off --strategy bogus", "invalid strategy name"),
    (TRAIN, "--data-dir {data} --out {out} --wandb off --devices 0", "devices='0'"),
    pytest.param(TRAIN, "--data-dir {data} --out {out} --wandb off --accelerator gpu", "No supported gpu backend found", marks=NO_GPU),
    (PREDICT, "", "the following arguments are required: command"),
    (PREDICT, "bogus", "invalid choice: 'bogus'"),
    (PREDICT, "submit --checkpoint x.ckpt --bogus", "unrecognized arguments: --bogus"),
    (PREDICT, "submit --checkpoint x.ckpt --batch-size 0", "--batch-size: must be >= 1, got 0"),
    (PREDICT, "submit --checkpoint x.ckpt --num-workers -1", "--num-workers: must be >= 0"),
    (PREDICT, "submit --checkpoint x.ckpt --device tpu", "--device: invalid choice"),
    (PREDICT, "submit", "required: --checkpoint"),
    (PREDICT, "submit --checkpoint x.ckpt --out {out}", "is a directory"),
    (PREDICT, "evaluate --data-dir {data}/dev", "evaluate --data-dir needs --checkpoint"),
    (PREDICT, "evaluate --submission x.csv", "evaluate --submission needs --labels"),
    (PREDICT, "embed --checkpoint x.ckpt --images {data}/test", "required: --out"),
    pytest.param(PREDICT, "submit --checkpoint {ckpt} --test-dir {data}/test --out {out}/s.csv --device cuda",
                 "no CUDA device here", marks=NO_GPU),
    (DATA, "", "required: command"),
    (DATA, "stats {data}/train --bogus", "unrecognized arguments: --bogus"),
    (DATA, "stats {data}/train --max-images 0", "--max-images: must be >= 1, got 0"),
    (DATA, "stats {data}/train --image-size 0", "--image-size: must be >= 1, got 0"),
    (DATA, "stats {data}/train --num-workers -2", "--num-workers: must be >= 0"),
    (SYNTH, "--out {out} --image-size 16", "image_size must be at least 32"),
    (SYNTH, "--out {out} --workers 0", "workers must be at least 1"),
    (SYNTH, "--out {data}/test_labels.csv", "is a file, not a directory"),
    (SYNTH, "--out {data}", "holds a synthetic face set made with other arguments"),
    (SYNTH, "--out {out} --bogus", "unrecognized arguments: --bogus"),
    (SYNTH, "--out {out} --identities many", "--identities: invalid int value"),
    (SYNTH, "", "required: --out"),
]

CLI_ERRORS = [  # each named "script flags" rather than by its absolute path
    pytest.param(*case.values, marks=case.marks, id=f"{Path(case.values[0]).stem} {case.values[1]}".strip())
    for case in (case if hasattr(case, "values") else pytest.param(*case) for case in CLI_ERRORS)
]


@pytest.mark.parametrize("script, flags, expected", CLI_ERRORS)
def test_bad_command_line_is_one_line(commands, tiny_faces, trained_run, tmp_path, script, flags, expected):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tiny_faces, trained_run)
    argv = [arg.format(data=tiny_faces, out=out, ckpt=trained_run / "best.ckpt") for arg in flags.split()]
    if script == TRAIN and "--data-dir" not in argv:  # should the flags pass, still no run in the repo's data/
        argv += ["--data-dir", out / "no_data", "--out", out / "run"]
    error_line(commands(script, *argv), expected)
    assert_kept(before)
    assert not any(out.iterdir())


def test_forked_and_fresh_interpreters_agree(commands, small, tmp_path):
    """The fast runner gives what `python SCRIPT` gives: exit status, stdout and stderr."""
    cases = [(TRAIN, "--batch-size", "0"), (SYNTH, "--out", tmp_path / "s", "--workers", "0")]
    for case in cases:
        fresh = subprocess.run([sys.executable, *map(str, case)], cwd=ROOT, capture_output=True, text=True, timeout=180)
        forked = commands(*case)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
