"""`python data.py split SRC OUT`: a folder of identity folders laid out as train/dev/test, every
image in one split, every identity in each, the same split for the same seed, bad files named
and left out, nothing of the user's written over; and run_training.py trains on what it writes."""

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import predict
import run_training
from cli import UserError
from data import main, plan_split, split_identities, split_sizes
from tests.conftest import FAST, REAL_LFW

LFW = REAL_LFW / "images"
SPLITS = ("train", "dev", "test")


def make_faces(root: Path, counts: dict[str, int], size=32) -> Path:
    """counts[identity] JPEGs of random noise in root/<identity>/, named <identity>_NNNN.jpg as
    LFW names them: every image different, so a content hash tells them apart."""
    rng = np.random.default_rng(0)
    for identity, count in counts.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / identity / f"{identity}_{k + 1:04d}.jpg", quality=95)
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(out: Path) -> dict[str, list[str]]:
    """Each split's files, relative to the split, sorted."""
    return {split: sorted(str(p.relative_to(out / split)) for p in (out / split).rglob("*") if p.is_file())
            for split in SPLITS}


def read_test_labels(out: Path) -> list[list[str]]:
    with open(out / "test_labels.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def src(tmp_path):
    return make_faces(tmp_path / "src", {"Ann_Lee": 3, "Bo_Ma": 5, "Cy_Ng": 8, "Di_Oz": 13})


def test_each_identitys_images_split_by_rounding_each_fraction():
    assert split_sizes(3, 0.2, 0.2) == (1, 1, 1)
    assert split_sizes(3, 0.1, 0.1) == (1, 1, 1)  # round(0.3) is 0, but each split gets one
    assert split_sizes(10, 0.2, 0.2) == (6, 2, 2)
    assert split_sizes(13, 0.2, 0.2) == (7, 3, 3)  # round(2.6) each, not round(5.2) together
    assert split_sizes(60, 0.2, 0.2) == (36, 12, 12)
    assert split_sizes(5, 0.0, 0.2) == (4, 0, 1)  # no dev at all


def test_no_image_in_two_splits_and_every_identity_in_each(src, tmp_path):
    out = tmp_path / "out"
    counts = split_identities(src, out, min_images=3, dev=0.2, test=0.2, seed=0)
    hashes = {split: [digest(p) for p in (out / split).rglob("*.jpg")] for split in SPLITS}
    every = [digest(p) for p in src.rglob("*.jpg")]
    assert sorted(sum(hashes.values(), [])) == sorted(every)  # each source image once, in one split
    assert counts == dict(identities=4, train=1 + 3 + 4 + 7, dev=1 + 1 + 2 + 3, test=1 + 1 + 2 + 3, dropped=0,
                          unreadable=0)
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in (out / "train").iterdir()) == names
    assert sorted(p.name for p in (out / "dev").iterdir()) == names
    assert sorted({label for _, label in read_test_labels(out)[1:]}) == names
    assert not [p for p in (out / "test").iterdir() if p.is_dir()]  # flat


def test_same_seed_same_split_whatever_the_listing_order_and_another_seed_another(src, tmp_path, monkeypatch):
    split_identities(src, tmp_path / "a", seed=0)
    visible = data.visible
    monkeypatch.setattr(data, "visible", lambda folder: visible(folder)[::-1])  # as another file system might list
    split_identities(src, tmp_path / "b", seed=0)
    split_identities(src, tmp_path / "c", seed=1)
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert listing(tmp_path / "a") != listing(tmp_path / "c")
    assert (tmp_path / "a" / "test_labels.csv").read_bytes() == (tmp_path / "b" / "test_labels.csv").read_bytes()


def test_min_images_drops_small_identities_and_cap_takes_the_first_after_the_shuffle(src, tmp_path, capsys):
    assert main(["split", str(src), str(tmp_path / "out"), "--min-images", "5", "--cap", "6", "--seed", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["Bo_Ma", "Cy_Ng", "Di_Oz"]
    per_identity = {name: sum(1 for p in (tmp_path / "out").rglob(f"{name}_*.jpg")) for name in ["Bo_Ma", "Cy_Ng", "Di_Oz"]}
    assert per_identity == {"Bo_Ma": 5, "Cy_Ng": 6, "Di_Oz": 6}
    # the capped images are the first six of the seeded shuffle: a larger cap keeps them and adds others
    splits, _, _ = plan_split(src, min_images=5, cap=7, seed=3)
    kept = {p.name for split in splits.values() for p in split["Di_Oz"]}
    capped = {p.name for p in (tmp_path / "out").rglob("Di_Oz_*.jpg")}
    assert capped < kept and capped != {f"Di_Oz_{k:04d}.jpg" for k in range(1, 7)}  # not the first six by name
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == (f"{tmp_path / 'out'}: 3 identities; 11 train, 3 dev, 3 test images (copied from {src}); "
                       "skipped 1 identities with under 5 readable images, 0 unreadable files")


def test_unreadable_files_are_named_counted_and_in_no_split(src, tmp_path):
    folder = src / "Di_Oz"
    truncated = folder / "Di_Oz_0099.jpg"
    jpeg = (folder / "Di_Oz_0001.jpg").read_bytes()
    truncated.write_bytes(jpeg[: len(jpeg) * 2 // 3])  # the header and part of the pixel data
    assert data.read_header(truncated.read_bytes()).size == (32, 32)  # only a whole decode finds it
    text = folder / "Di_Oz_0100.jpg"
    text.write_text("not a jpeg")
    (src / "Ann_Lee" / "Ann_Lee_0009.jpg").write_bytes(b"")  # Ann_Lee: 3 readable of 4, still kept
    (src / "Eve_Uy").mkdir()
    (src / "Eve_Uy" / "Eve_Uy_0001.jpg").write_text("not a jpeg either")  # too few anyway: never read
    with pytest.warns(UserWarning, match=r"3 unreadable files left out .*Ann_Lee_0009\.jpg.*Di_Oz_0099\.jpg.*Di_Oz_0100\.jpg"):
        counts = split_identities(src, tmp_path / "out", min_images=3)
    assert counts["unreadable"] == 3 and counts["identities"] == 4
    names = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert not {"Ann_Lee_0009.jpg", "Di_Oz_0099.jpg", "Di_Oz_0100.jpg", "Eve_Uy_0001.jpg"} & names
    assert counts["train"] + counts["dev"] + counts["test"] == 3 + 5 + 8 + 13


def test_hidden_files_and_folders_and_other_files_are_not_images(src, tmp_path):
    make_faces(src / ".ipynb_checkpoints", {"Zed": 4})
    (src / "Bo_Ma" / ".Bo_Ma_0001.jpg").write_bytes((src / "Bo_Ma" / "Bo_Ma_0001.jpg").read_bytes())
    (src / "Bo_Ma" / "notes.txt").write_text("not an image, by its name")
    counts = split_identities(src, tmp_path / "out")
    assert counts["identities"] == 4 and counts["unreadable"] == 0
    names = {p.name for p in (tmp_path / "out").rglob("*")}
    assert not {".ipynb_checkpoints", "Zed", ".Bo_Ma_0001.jpg", "notes.txt"} & names


def test_test_labels_name_every_test_image_and_clashing_names_get_the_identity(tmp_path):
    src = make_faces(tmp_path / "src", {"a": 4, "b": 4})
    split_identities(src, tmp_path / "unique")
    rows = read_test_labels(tmp_path / "unique")
    assert rows[0] == ["id", "label"]
    assert sorted(rows[1:]) == sorted([p.name, p.name.split("_")[0]] for p in (tmp_path / "unique" / "test").iterdir())

    for folder in (src / "a", src / "b"):  # 0.jpg ... 3.jpg under both identities
        for k, path in enumerate(sorted(folder.iterdir())):
            path.rename(folder / f"{k}.jpg")
    split_identities(src, tmp_path / "clash")
    rows = read_test_labels(tmp_path / "clash")
    names = sorted(p.name for p in (tmp_path / "clash" / "test").iterdir())
    assert names == sorted(name for name, _ in rows[1:]) and len(names) == 2
    assert all(name.startswith(f"{label}_") and (src / label / name.removeprefix(f"{label}_")).is_file()
               for name, label in rows[1:])
    assert all("_" not in name for name in listing(tmp_path / "clash")["train"])  # train and dev keep their names


def test_two_test_images_still_named_alike_after_the_prefix_are_named_in_the_error():
    a, a_b = Path("src/a"), Path("src/a_b")  # a/b_c.jpg and a_b/c.jpg both become a_b_c.jpg
    test = {"a": [a / "0.jpg", a / "b_c.jpg"], "a_b": [a_b / "0.jpg", a_b / "c.jpg"]}
    with pytest.raises(data.DataError) as error:
        data.flat_test_names({"train": test, "dev": {}, "test": test})
    assert str(error.value) == (f"{a_b / 'c.jpg'}: test name a_b_c.jpg is also {a / 'b_c.jpg'}'s "
                                "(expected unique file names: rename one)")


def test_link_makes_symlinks_to_the_source_images(src, tmp_path):
    split_identities(src, tmp_path / "out", link=True)
    files = [p for p in (tmp_path / "out").rglob("*.jpg")]
    assert len(files) == 3 + 5 + 8 + 13 and all(p.is_symlink() for p in files)
    assert all(p.resolve().parent.parent == src.resolve() for p in files)
    assert not any(p.is_symlink() for p in src.rglob("*"))  # the sources are untouched


def test_an_empty_out_is_used(src, tmp_path):
    """A non-empty one is refused: tests/test_commands.py."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert split_identities(src, empty)["identities"] == 4


def test_out_inside_src_is_refused(src):
    with pytest.raises(UserError, match="inside"):
        split_identities(src, src / "split")


def test_run_training_trains_on_the_split_and_predict_scores_its_test_labels(tmp_path):
    src = make_faces(tmp_path / "src", {"a": 6, "b": 6, "c": 6})
    out = tmp_path / "faces"
    split_identities(src, out, link=True)
    run = tmp_path / "run"
    assert run_training.main(["--data-dir", str(out), "--out", str(run), "--epochs", "1", "--image-size", "32", *FAST]) == 0
    submission = tmp_path / "submission.csv"
    predict.submit(run / "last.ckpt", out / "test", submission, num_workers=0)
    score = predict.score_submission(submission, out / "test_labels.csv", run / "last.ckpt")
    assert score["rows"] == 3 and 0 <= score["accuracy"] <= 1


def test_lfw_gives_the_issues_158_identities_and_2080_train_images():
    if not LFW.is_dir():
        pytest.skip(f"LFW absent (expected its images at {LFW})")
    splits, unreadable, dropped = plan_split(LFW, min_images=10, cap=60, dev=0.2, test=0.2, seed=0)
    counts = {split: sum(map(len, splits[split].values())) for split in SPLITS}
    assert len(splits["train"]) == len(splits["dev"]) == len(splits["test"]) == 158
    assert counts == {"train": 2080, "dev": 688, "test": 688}
    assert unreadable == [] and dropped == 5749 - 158
