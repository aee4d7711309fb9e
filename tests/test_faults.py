"""Faults that need a real process, through the real commands: each case runs run_training.py,
predict.py or data.py as `python SCRIPT ARGS` with the repo root as working directory: Ctrl-C and
SIGTERM, a checkpoint write that fails as a full disk would, a diverged loss, and files the commands
read past (unreadable images skipped and counted, odd image modes, unicode names); a failure is one
`error: ...` line and no file that existed before the command is changed (every file hashed before
and after).

Starting Python with torch and Lightning takes 4 to 12 s on two shared cores, for every case. So
by default the commands run in children forked from one process that imported those
modules once (`Commands`); each child still runs the script as __main__, with its own argv, exit
status, stdout and stderr, as `python SCRIPT` would. FAULTS_FRESH_PYTHON=1 runs every case in a
fresh interpreter instead, and one test checks that both give the same result.

Covered elsewhere, not repeated here: the user's mistakes, one line each (tests/test_commands.py),
and SIGKILL mid-run then --resume (test_training.test_sigkill_mid_run_then_resume_finishes_the_planned_epochs).
"""

import contextlib
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
    noise = ("💡 Tip", "LeafSpec")  # Lightning's ad for its cloud logger; torch 2.14's deprecation inside Lightning 2.6
    assert not [text for text in noise if text in result.stdout + result.stderr], result.stderr[-3000:]
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
# data the commands read past: unreadable images skipped by name, any image mode, unicode names

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


def test_forked_and_fresh_interpreters_agree(commands, small, tmp_path):
    """The fast runner gives what `python SCRIPT` gives: exit status, stdout and stderr."""
    cases = [(TRAIN, "--batch-size", "0"), (SYNTH, "--out", tmp_path / "s", "--workers", "0")]
    for case in cases:
        fresh = subprocess.run([sys.executable, *map(str, case)], cwd=ROOT, capture_output=True, text=True, timeout=180)
        forked = commands(*case)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
