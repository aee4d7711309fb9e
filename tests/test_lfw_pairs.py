"""predict.py verify on LFW's protocol files (pairs.txt, pairsDev*.txt) and on pairs named by paths
relative to --images: the files parsed, only the named images read, a missing name refused before
any embedding, and the 10-fold accuracy on scores whose answer is worked out by hand."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_eer

import data
import predict
from data import DataError
from tests.conftest import REAL_LFW
from tests.test_commands import checkpoint, one_error_line, read_rows, run_command  # noqa: F401 (a fixture)

# a View 2 file of 2 folds x (2 same + 2 different pairs), and the pairs it means
PAIRS_TXT = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tBob\t2
Cid\t4\tDee\t1
Cid\t1\t2
Dee\t2\t4
Ann\t3\tCid\t2
Bob\t4\tDee\t3
"""
PAIRS = [("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg"), ("Bob/Bob_0001.jpg", "Bob/Bob_0003.jpg"),
         ("Ann/Ann_0001.jpg", "Bob/Bob_0002.jpg"), ("Cid/Cid_0004.jpg", "Dee/Dee_0001.jpg"),
         ("Cid/Cid_0001.jpg", "Cid/Cid_0002.jpg"), ("Dee/Dee_0002.jpg", "Dee/Dee_0004.jpg"),
         ("Ann/Ann_0003.jpg", "Cid/Cid_0002.jpg"), ("Bob/Bob_0004.jpg", "Dee/Dee_0003.jpg")]


def lfw_images(root, tiny_faces):
    """LFW's layout, <Name>/<Name>_%04d.jpg, of 4 images each of the tiny set's 4 train identities."""
    for name, identity in zip(("Ann", "Bob", "Cid", "Dee"), sorted((tiny_faces / "train").iterdir())):
        (root / name).mkdir(parents=True)
        for k, image in enumerate(sorted(identity.glob("*.jpg"))[:4], start=1):
            shutil.copy(image, root / name / f"{name}_{k:04d}.jpg")
    return root


def test_view_2_pairs_keep_the_files_folds(tmp_path):
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    pairs, same, folds = predict.read_lfw_pairs(tmp_path / "pairs.txt")
    assert pairs == PAIRS
    assert same.tolist() == [True, True, False, False] * 2 and folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_view_1_pairs_are_split_into_10_folds_in_file_order(tmp_path):
    # 12 same then 12 different: pair k of each kind goes to fold k * 10 // 12, so every fold holds
    # as many same pairs as different ones (1 or 2 of each)
    same_lines = [f"P{k}\t1\t2\n" for k in range(12)]
    different_lines = [f"P{k}\t1\tQ{k}\t1\n" for k in range(12)]
    (tmp_path / "pairsDevTest.txt").write_text("12\n" + "".join(same_lines + different_lines))
    pairs, same, folds = predict.read_lfw_pairs(tmp_path / "pairsDevTest.txt")
    assert pairs[0] == ("P0/P0_0001.jpg", "P0/P0_0002.jpg") and pairs[12] == ("P0/P0_0001.jpg", "Q0/Q0_0001.jpg")
    assert same.tolist() == [True] * 12 + [False] * 12
    assert folds.tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9] * 2


@pytest.mark.parametrize("text, message", [
    pytest.param("", "empty", id="empty"),
    pytest.param("ten\n", "line 1 is 'ten'", id="header"),
    pytest.param("2\t2\nAnn\t1\t2\n", "1 pairs after line 1 (expected 8", id="short"),
    pytest.param(PAIRS_TXT.replace("Bob\t1\t3", "Bob\t1\tCid\t3"), "pairs.txt:3: 4 fields", id="same pair of two"),
    pytest.param(PAIRS_TXT.replace("Cid\t4\tDee\t1", "Cid\t4\t1"), "pairs.txt:5: 3 fields", id="different pair of one"),
    pytest.param(PAIRS_TXT.replace("Cid\t1\t2", "Cid\t1\tx"), "pairs.txt:6: image number 'x'", id="not a number"),
    pytest.param(PAIRS_TXT.replace("Cid\t1\t2", "Cid\t0\t2"), "pairs.txt:6: image number '0'", id="number 0"),
    pytest.param("1\t2\n" + "".join(PAIRS_TXT.splitlines(keepends=True)[1:5]), "1 fold", id="one fold"),
])
def test_a_malformed_pairs_file_is_one_line_naming_the_line(tmp_path, text, message):
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        predict.read_lfw_pairs(tmp_path / "pairs.txt")


def test_fold_accuracy_worked_out_by_hand():
    # 3 folds of (same, same, different, different)
    scores = np.array([0.55, 0.75, 0.35, 0.80,
                       0.95, 0.60, 0.40, 0.05,
                       0.20, 0.30, 0.10, 0.15])
    same = np.array([1, 1, 0, 0] * 3, dtype=bool)
    folds = np.repeat([0, 1, 2], 4)
    # Fold 0, thresholds from folds 1-2: .95s .60s .40d .30s .20s | .15d .10d .05d: accepting the top
    # five gets 7 of 8 right, every other cut fewer: threshold .175; on fold 0 it accepts .55s .75s
    # (right) and .35d .80d (wrong): 2/4.
    # Fold 1, from folds 0 and 2: .80d .75s .55s .35d .30s .20s | .15d .10d, 6 of 8: threshold .175;
    # fold 1: .95s .60s accepted, .05d rejected (right), .40d accepted (wrong): 3/4.
    # Fold 2, from folds 0-1: .95s .80d .75s .60s .55s | .40d .35d .05d, 7 of 8: threshold .475;
    # fold 2: .20s .30s rejected (wrong), .10d .15d rejected (right): 2/4.
    mean, std, per_fold = predict.fold_accuracy(scores, same, folds)
    assert per_fold == [0.5, 0.75, 0.5]
    assert mean == pytest.approx(7 / 12) and std == pytest.approx(np.sqrt(1 / 72))  # population std, as insightface's
    # what a slip would give instead: a threshold chosen with the test fold in (the best cut of all
    # 12 pairs) ...
    leaked = [float(((scores[folds == k] >= predict.best_cut(scores, same, ~same)[0]) == same[folds == k]).mean())
              for k in range(3)]
    assert np.mean(leaked) == 0.75
    # ... a pair dropped, or the folds shifted by one pair
    for k in range(12):
        keep = np.arange(12) != k
        assert predict.fold_accuracy(scores[keep], same[keep], folds[keep])[0] != pytest.approx(7 / 12)
    assert predict.fold_accuracy(scores, same, np.r_[folds[1:], 2])[0] != pytest.approx(7 / 12)
    assert predict.fold_accuracy(scores, same, np.r_[0, folds[:-1]])[0] != pytest.approx(7 / 12)


def test_the_best_cut_of_all_pairs_is_verification_metrics_best_accuracy():
    rng = np.random.default_rng(0)
    scores, same = rng.integers(-10, 10, 300) / 10, rng.random(300) < 0.5
    threshold, accuracy = predict.best_cut(scores, same, ~same)
    assert accuracy == pytest.approx(predict.verification_metrics(scores, same)["accuracy"])
    assert ((scores >= threshold) == same).mean() == pytest.approx(accuracy)


def test_eer_is_interpolated_where_torchmetrics_takes_the_nearest_roc_point():
    # same .9 .8 .6, different .7 .5: (FAR, FRR) runs (0, 1/3) -> (1/2, 1/3) -> (1/2, 0). FAR = FRR
    # at 1/3 on the first piece (facenet's lfw.py: brentq on the interpolated ROC); torchmetrics'
    # binary_eer averages the point where |FAR - FRR| is least, (1/2 + 1/3) / 2
    scores, same = [0.9, 0.8, 0.6, 0.7, 0.5], [1, 1, 1, 0, 0]
    assert predict.verification_metrics(scores, same)["eer"] == pytest.approx(1 / 3)
    assert binary_eer(torch.tensor(scores), torch.tensor(same)).item() == pytest.approx(5 / 12)
    # where the ROC has a point with FAR = FRR the two agree
    scores, same = [0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]
    theirs = binary_eer(torch.tensor(scores), torch.tensor(same)).item()
    assert predict.verification_metrics(scores, same)["eer"] == theirs == 0.5


@pytest.fixture
def loaded(monkeypatch):
    """The paths the image loader is asked for (data loading in this process: --num-workers 0)."""
    paths = []
    load = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path: paths.append(Path(path)) or load(path))
    return paths


def test_verify_lfw_pairs_reads_only_the_named_images(checkpoint, tiny_faces, tmp_path, capsys, loaded):  # noqa: F811
    images = lfw_images(tmp_path / "images", tiny_faces)
    (images / "Zed").mkdir()
    (images / "Zed" / "Zed_0001.jpg").write_bytes(b"not an image: reading it would fail")
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    argv = ["verify", "--checkpoint", checkpoint, "--lfw-pairs", tmp_path / "pairs.txt", "--images", images,
            "--out", tmp_path / "scores.csv", "--num-workers", "0", "--tta"]
    result = run_command(predict.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    named = {images / name for pair in PAIRS for name in pair}
    assert set(loaded) == named and len(loaded) == len(named)  # each named image once, nothing else
    header, *rows = read_rows(tmp_path / "scores.csv")
    assert header == ["img1", "img2", "score", "same"] and [tuple(row[:2]) for row in rows] == PAIRS
    assert [row[3] for row in rows] == ["1", "1", "0", "0"] * 2
    scores, same = np.array([float(row[2]) for row in rows]), np.array([row[3] == "1" for row in rows])
    mean, std, _ = predict.fold_accuracy(scores, same, np.repeat([0, 1], 4))
    assert "8 pairs: ROC AUC " in result.stdout
    assert f"LFW 2-fold accuracy {mean:.4f} +- {std:.4f}" in result.stdout


def test_verify_tta_averages_each_image_with_its_mirror(checkpoint, tiny_faces, tmp_path):  # noqa: F811
    images = lfw_images(tmp_path / "images", tiny_faces)
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    plain, tta = (predict.verify(checkpoint, tmp_path / "pairs.txt", images, lfw=True, tta=tta, num_workers=0)
                  for tta in (False, True))
    model = predict.load_model(checkpoint, "cpu")
    transform = predict.model_transform(model)
    with torch.no_grad():
        def embedding(name):
            image = transform(data.load_image(images / name))[None]
            return torch.nn.functional.normalize(model.embed(image) + model.embed(image.flip(-1)), dim=1)[0]
        by_hand = [float(embedding(a) @ embedding(b)) for a, b in PAIRS]
    np.testing.assert_allclose(tta["scores"], by_hand, atol=1e-5)
    assert not np.allclose(plain["scores"], tta["scores"])
    assert tta["pairs"] == 8 and len(tta["folds"]) == 2 and tta["fold_accuracy"] == pytest.approx(np.mean(tta["folds"]))


def test_csv_pairs_name_paths_under_images(checkpoint, tiny_faces, tmp_path, capsys, loaded):  # noqa: F811
    # the real known/ layout: file names repeat across identity folders, so only the path tells them apart
    images = tmp_path / "known"
    for identity in sorted((tiny_faces / "train").iterdir()):
        (images / identity.name).mkdir(parents=True)
        for k, image in enumerate(sorted(identity.glob("*.jpg"))[:3], start=1):
            shutil.copy(image, images / identity.name / f"{k:04d}_01.jpg")
    (images / "unnamed.jpg").write_bytes(b"not an image, and in no pair")
    a, b, c = sorted(path.name for path in images.iterdir() if path.is_dir())[:3]
    rows = [(f"{a}/0001_01.jpg", f"{a}/0002_01.jpg", 1), (f"{b}/0001_01.jpg", f"{b}/0003_01.jpg", 1),
            (f"{a}/0001_01.jpg", f"{b}/0001_01.jpg", 0), (f"{c}/0002_01.jpg", f"{a}/0003_01.jpg", 0)]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("img1,img2,same\n" + "".join(f"{x},{y},{s}\n" for x, y, s in rows))
    argv = ["verify", "--checkpoint", checkpoint, "--pairs", pairs, "--images", images, "--out", tmp_path / "scores.csv",
            "--num-workers", "0"]
    result = run_command(predict.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    assert "4 pairs: ROC AUC" in result.stdout and "fold accuracy" not in result.stdout  # no folds in a CSV
    assert sorted(loaded) == sorted({images / name for row in rows for name in row[:2]})
    scores = {tuple(row[:2]): float(row[2]) for row in read_rows(tmp_path / "scores.csv")[1:]}
    assert scores[rows[0][:2]] < 1 - 1e-6  # two different images, not one read twice
    # a bare file name that several folders hold is refused, naming it
    pairs.write_text("img1,img2,same\n0001_01.jpg,0002_01.jpg,1\n0001_01.jpg,0003_01.jpg,0\n")
    line = one_error_line(run_command(predict.main, argv, capsys))
    assert "0001_01.jpg is in 4 folders of" in line


def test_a_missing_name_is_refused_before_any_embedding(checkpoint, tiny_faces, tmp_path, capsys, monkeypatch):  # noqa: F811
    images = lfw_images(tmp_path / "images", tiny_faces)
    missing = PAIRS_TXT.replace("Cid\t1\t2", "Cid\t1\t9").replace("Bob\t4\tDee\t3", "Bo\t4\tDee\t3")  # 2 of 15 names
    (tmp_path / "pairs.txt").write_text(missing)
    monkeypatch.setattr(predict, "run_model", lambda *args, **kwargs: pytest.fail("embedded before checking the names"))
    argv = ["verify", "--checkpoint", checkpoint, "--lfw-pairs", tmp_path / "pairs.txt", "--images", images,
            "--num-workers", "0"]
    line = one_error_line(run_command(predict.main, argv, capsys))
    assert f"Cid/Cid_0009.jpg is not an image in {images} (2 of the 15 names missing" in line
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("img1,img2,same\nAnn/Ann_0001.jpg,Ann/Ann_0002.jpg,1\nAnn/Ann_0001.jpg,Ann_0009.jpg,0\n")
    argv[3:5] = ["--pairs", str(pairs)]
    line = one_error_line(run_command(predict.main, argv, capsys))
    assert f"Ann_0009.jpg is not an image in {images} (1 of the 3 names missing" in line


def test_the_real_lfw_view_1_test_pairs_end_to_end(checkpoint, tmp_path, capsys, loaded):  # noqa: F811
    if not (REAL_LFW / "pairsDevTest.txt").is_file():
        pytest.skip(f"LFW is not at {REAL_LFW} (see shared/realfaces/README.md); nothing of it is in the repository")
    small = torch.load(checkpoint, weights_only=True)
    small["hyper_parameters"]["image_size"] = 48  # LFW's 150 px crops, resized as the tiny net was trained
    torch.save(small, tmp_path / "small.ckpt")
    argv = ["verify", "--checkpoint", tmp_path / "small.ckpt", "--lfw-pairs", REAL_LFW / "pairsDevTest.txt",
            "--images", REAL_LFW / "images", "--num-workers", "0", "--batch-size", "128"]
    result = run_command(predict.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    assert "1000 pairs: ROC AUC " in result.stdout and "LFW 10-fold accuracy " in result.stdout
    accuracy = float(result.stdout.split("LFW 10-fold accuracy ")[1].split()[0])
    assert 0 <= accuracy <= 1
    pairs, _, _ = predict.read_lfw_pairs(REAL_LFW / "pairsDevTest.txt")
    assert len(loaded) == len({name for pair in pairs for name in pair}) == 1549  # of LFW's 13,233
