"""Real camera JPEGs through every command, in every CI run: 20 of LFW's people split by `data.py
split`, trained on by run_training.py, submitted and scored by predict.py, and LFW pairs verified.
The other tests draw cartoon faces and save them with PIL; these catch what only real
photographs bring (JPEGs from other encoders, real faces' statistics), for a few seconds."""

import contextlib
import csv
import io
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest

import data
import predict
import run_training
from checkpoints import read_checkpoint
from tests.conftest import FAST, REAL_LFW
from tests.test_lfw_pairs import loaded  # noqa: F401 (a fixture)
from tests.test_commands import read_rows, run_command

if not (REAL_LFW / "images").is_dir() or not (REAL_LFW / "pairsDevTest.txt").is_file():
    pytest.skip(f"LFW is not at {REAL_LFW} (see shared/realfaces/README.md); nothing of it is in the repository",
                allow_module_level=True)

PEOPLE = 20
PAIRS = 20  # same pairs, and as many different ones: a View 1 file of 40 pairs, 4 per fold
SPLIT = ["--min-images", "10", "--cap", "12", "--dev", "0.2", "--test", "0.2", "--seed", "0"]
# the tiny network at 32 px for one epoch: seconds on two cores
TRAIN = ["--image-size", "32", "--epochs", "1", *FAST, "--batch-size", "16"]


@contextlib.contextmanager
def recorded_warnings():
    """Every warning given inside, even one already given before (pytest would show it only once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def unreadable(caught) -> list[str]:
    """Those about an image that could not be decoded ('skipping unreadable image', 'unreadable
    files left out'): a real JPEG the loaders cannot take."""
    return [str(w.message) for w in caught if "unreadable" in str(w.message)]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The first 20 people (by name) of LFW with >= 10 images, copied (all their images, ~500
    small files), split, trained on for an epoch and submitted: each command's output and the
    warnings all of them gave."""
    root = tmp_path_factory.mktemp("realfaces")
    images = REAL_LFW / "images"
    people = [name for name in sorted(os.listdir(images)) if len(os.listdir(images / name)) >= 10][:PEOPLE]
    for name in people:  # copies: a split of links would depend on the shared folder staying put
        shutil.copytree(images / name, root / "src" / name)
    faces, run, submission = root / "faces", root / "run", root / "submission.csv"
    stdout = io.StringIO()
    with recorded_warnings() as caught, contextlib.redirect_stdout(stdout):
        assert data.main(["split", str(root / "src"), str(faces), *SPLIT]) == 0
        assert run_training.main(["--data-dir", str(faces), "--out", str(run), *TRAIN]) == 0
        assert predict.main(["submit", "--checkpoint", str(run / "best.ckpt"), "--test-dir", str(faces / "test"),
                             "--out", str(submission), "--num-workers", "0", "--device", "cpu"]) == 0
    return SimpleNamespace(src=root / "src", people=people, faces=faces, run=run, submission=submission,
                           stdout=stdout.getvalue(), caught=caught)


def test_split_keeps_the_20_people_and_every_real_jpeg_decodes(real):
    # 18 of the 20 have >= 12 images, capped to 12: 8 train, 2 dev, 2 test; Ann_Veneman's 11 give
    # 7/2/2 and Bill_McBride's 10 give 6/2/2
    summary = [line for line in real.stdout.splitlines() if line.startswith(f"{real.faces}: ")]
    assert summary == [f"{real.faces}: 20 identities; 157 train, 40 dev, 40 test images (copied from {real.src}); "
                       "skipped 0 identities with under 10 readable images, 0 unreadable files"]
    for split in ("train", "dev"):
        assert sorted(p.name for p in (real.faces / split).iterdir()) == real.people
    with open(real.faces / "test_labels.csv", newline="") as f:
        header, *rows = csv.reader(f)
    assert header == ["id", "label"] and len(rows) == 40
    assert sorted(name for name, _ in rows) == sorted(p.name for p in (real.faces / "test").iterdir())
    assert all(name.startswith(f"{label}_") for name, label in rows)  # LFW's names are unique: kept as they are
    assert unreadable(real.caught) == []  # split, training and submit decoded every image


def test_training_on_real_faces_keeps_their_names(real):
    checkpoint = read_checkpoint(real.run / "best.ckpt")
    assert checkpoint["class_names"] == real.people
    assert checkpoint["hyper_parameters"]["image_size"] == 32
    assert (real.run / "last.ckpt").is_file() and (real.run / "metrics.csv").is_file()


def test_submission_has_a_row_per_test_image_and_scores_against_the_splits_labels(real):
    header, *rows = read_rows(real.submission)
    test_images = sorted(p.name for p in (real.faces / "test").iterdir())
    assert header == ["id", "label"] and [row[0] for row in rows] == test_images
    assert f"wrote 40 rows to {real.submission}" in real.stdout
    assert all(0 <= int(label) < PEOPLE for _, label in rows)
    score = predict.score_submission(real.submission, real.faces / "test_labels.csv", real.run / "best.ckpt")
    assert score["rows"] == len(test_images) == 40 and 0 <= score["accuracy"] <= 1


def test_verify_scores_view_1_style_pairs_of_real_faces(real, tmp_path, capsys, loaded):  # noqa: F811
    # LFW's own pairsDevTest.txt cut to its first 20 same and first 20 different pairs: 72 images
    count, *lines = (REAL_LFW / "pairsDevTest.txt").read_text().splitlines()
    same, different = lines[:PAIRS], lines[int(count):int(count) + PAIRS]
    (tmp_path / "pairs.txt").write_text("\n".join([str(PAIRS), *same, *different]) + "\n")
    argv = ["verify", "--checkpoint", real.run / "best.ckpt", "--lfw-pairs", tmp_path / "pairs.txt",
            "--images", REAL_LFW / "images", "--out", tmp_path / "scores.csv", "--num-workers", "0", "--device", "cpu"]
    with recorded_warnings() as caught:
        result = run_command(predict.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    assert f"{2 * PAIRS} pairs: ROC AUC " in result.stdout
    accuracy = float(result.stdout.split("LFW 10-fold accuracy ")[1].split()[0])
    assert 0 <= accuracy <= 1
    header, *rows = read_rows(tmp_path / "scores.csv")
    assert header == ["img1", "img2", "score", "same"] and [row[3] for row in rows] == ["1"] * PAIRS + ["0"] * PAIRS
    assert unreadable(caught) == []
    pairs, _, _ = predict.read_lfw_pairs(tmp_path / "pairs.txt")
    assert len(loaded) == len({name for pair in pairs for name in pair}) == 72  # those named, of LFW's 13,233


def test_decoding_and_augmenting_on_the_device_trains_on_real_jpegs(real, tmp_path, monkeypatch):
    # --augment-on-device on is the GPU's data path (decode_batch: torchvision's decode_jpeg, then
    # BatchAugment); on the CPU it runs the same code, so a real JPEG it cannot take shows here and
    # not first on a GPU
    batches = []  # (images sent, images decoded) of each train batch
    decode = data.decode_batch

    def counted(images, paths, *args):
        decoded, kept = decode(images, paths, *args)
        batches.append((len(paths), len(kept)))
        return decoded, kept

    monkeypatch.setattr(data, "decode_batch", counted)
    with recorded_warnings() as caught:
        assert run_training.main(["--data-dir", str(real.faces), "--out", str(tmp_path / "run"), *TRAIN,
                                  "--augment-on-device", "on"]) == 0
    assert all(sent == decoded for sent, decoded in batches), batches
    assert sum(decoded for _, decoded in batches) == len(list((real.faces / "train").rglob("*.jpg")))  # each once
    assert read_checkpoint(tmp_path / "run" / "best.ckpt")["class_names"] == real.people
    assert unreadable(caught) == []
