"""predict.py: the Kaggle submission, evaluation, scoring, embeddings, verification and open-set
identification from a checkpoint, and its one-line errors."""

import csv
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import predict
import run_training
from data import DataError
from synthetic_faces import generate
from tests.conftest import FAST, TINY_SET
from tests.test_training import assert_one_line_error
from training import FaceClassifier, epoch_metrics

ROOT = Path(__file__).resolve().parents[1]
# Verification needs embeddings that tell apart people the network never saw, which four
# identities cannot teach: more identities, and 12 unseen ones paired 300 times (and 2 more that
# known/ lacks, for identification).
VERIFICATION_SET = dict(identities=24, train_per_identity=12, dev_per_identity=1, test_per_identity=4, image_size=48,
                        seed=0, verification_identities=12, pairs=300, unknown_per_identity=3)
VERIFICATION_NET = ["--epochs", "8", "--lr", "3e-3", *FAST, "--widths", "16,32,48,64", "--batch-size", "16"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def run_command(argv, capsys):
    """predict.py's command line run in this process, through cli.run as the script does; a
    subprocess per case would pay torch's start-up each time."""
    with pytest.raises(SystemExit) as exit:
        cli.run(lambda: predict.main(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit.value.code, captured.out, captured.err)


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "best.ckpt"


@pytest.fixture(scope="module")
def submission(checkpoint, tiny_faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("submit") / "submission.csv"
    result = predict.submit(checkpoint, tiny_faces / "test", out, num_workers=0)
    assert result["rows"] == len(read_rows(out)) - 1 and result["img_per_s"] > 0
    return out


def test_submission_has_a_sorted_row_per_test_image(submission, tiny_faces):
    header, *rows = read_rows(submission)
    assert header == ["id", "label"]
    assert [name for name, _ in rows] == sorted(path.name for path in (tiny_faces / "test").iterdir())
    assert {int(label) for _, label in rows} <= set(range(TINY_SET["identities"]))


def test_label_names_and_tta_change_labels_only(submission, checkpoint, tiny_faces, tmp_path):
    model = predict.load_model(checkpoint, "cpu")
    names = model.class_names
    predict.submit(checkpoint, tiny_faces / "test", tmp_path / "names.csv", num_workers=0, label_names=True)
    predict.submit(checkpoint, tiny_faces / "test", tmp_path / "tta.csv", num_workers=0, tta=True)
    plain, named, tta = (read_rows(path) for path in (submission, tmp_path / "names.csv", tmp_path / "tta.csv"))
    assert named[1:] == [[key, names[int(label)]] for key, label in plain[1:]]
    assert tta[0] == plain[0] and [key for key, _ in tta] == [key for key, _ in plain]
    assert {int(label) for _, label in tta[1:]} <= set(range(len(names)))
    images = predict.TestImages(tiny_faces / "test", predict.model_transform(model))
    logits, _, _ = predict.run_model(model, images, num_workers=0)
    averaged, _, _ = predict.run_model(model, images, tta=True, num_workers=0)
    with torch.no_grad():
        mirrored = torch.cat([model(image[None].flip(-1)) for image, _ in images])
    torch.testing.assert_close(averaged, (logits + mirrored) / 2, rtol=1e-5, atol=1e-5)


def test_predictions_are_the_models_forward_on_the_same_images(checkpoint, tiny_faces):
    model = predict.load_model(checkpoint, "cpu")
    images = predict.TestImages(tiny_faces / "test", predict.model_transform(model))
    batch = torch.stack([image for image, _ in images])
    with torch.no_grad():
        expected = {False: model(batch), True: model.embed(batch)}
    for embed in (False, True):  # batches of 3, 3 and 2 images through Trainer.predict
        outputs, keys, rate = predict.run_model(model, images, embed=embed, batch_size=3, num_workers=0)
        torch.testing.assert_close(outputs, expected[embed], rtol=1e-5, atol=1e-5)
        assert keys == [path.name for path in images.paths] and rate > 0
    assert not model.training  # the Trainer leaves the model in eval mode, as it found it


def test_the_bar_names_its_pass_on_a_terminals_stderr_and_leaves_stdout_to_the_results(checkpoint, tiny_faces,
                                                                                        monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = predict.load_model(checkpoint, "cpu")
    images = predict.TestImages(tiny_faces / "test", predict.model_transform(model))
    monkeypatch.setattr(sys, "stderr", Terminal())
    predict.run_model(model, images, batch_size=3, num_workers=0, desc="embedding known")
    assert "embedding known: 100%" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()
    assert "DataLoader" not in sys.stderr.getvalue() and capsys.readouterr().out == ""


def test_evaluate_agrees_with_the_best_validation_accuracy(checkpoint, trained_run, tiny_faces):
    result = predict.evaluate(checkpoint, tiny_faces / "dev", num_workers=0)
    states = torch.load(checkpoint, weights_only=True)["callbacks"].values()
    best = next(state["best_model_score"].item() for state in states if state.get("monitor") == "val_acc")
    assert result["images"] == TINY_SET["identities"] * TINY_SET["dev_per_identity"]
    assert result["top1"] == pytest.approx(best, abs=1e-6)
    assert result["top1"] == pytest.approx(max(v for _, v in epoch_metrics(trained_run / "metrics.csv")["val_acc"]), abs=1e-6)
    assert result["top5"] == 1.0  # four identities: the top five hold them all


def test_scoring_a_submission_counts_the_right_labels(submission, checkpoint, tiny_faces, tmp_path):
    names = predict.load_model(checkpoint, "cpu").class_names
    truth = dict(read_rows(tiny_faces / "test_labels.csv")[1:])
    rows = read_rows(submission)[1:]
    by_hand = sum(names[int(label)] == truth[key] for key, label in rows) / len(rows)
    assert predict.score_submission(submission, tiny_faces / "test_labels.csv", checkpoint)["accuracy"] == by_hand
    named = tmp_path / "named.csv"
    named.write_text("id,label\n" + "".join(f"{key},{names[int(label)]}\n" for key, label in rows))
    assert predict.score_submission(named, tiny_faces / "test_labels.csv", label_names=True)["accuracy"] == by_hand  # names need no checkpoint
    with pytest.raises(DataError, match="pass --checkpoint"):
        predict.score_submission(submission, tiny_faces / "test_labels.csv")
    short = tmp_path / "short.csv"
    short.write_text("".join(f"{','.join(row)}\n" for row in read_rows(submission)[:-1]))
    with pytest.raises(DataError, match="no row for 1 ids"):
        predict.score_submission(short, tiny_faces / "test_labels.csv", checkpoint)
    with pytest.raises(DataError, match="1 ids not in"):
        predict.score_submission(submission, short, checkpoint)


def test_embed_writes_unit_rows_and_their_file_names(checkpoint, tiny_faces, tmp_path):
    predict.embed(checkpoint, tiny_faces / "test", tmp_path / "emb.npy", num_workers=0)
    embeddings = np.load(tmp_path / "emb.npy")
    names = (tmp_path / "emb.txt").read_text().splitlines()
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(names), 32)  # the last width of FAST's net
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, rtol=1e-5)
    assert names == sorted(path.name for path in (tiny_faces / "test").iterdir())


def test_verification_metrics_on_known_scores():
    perfect = predict.verification_metrics([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0])
    assert (perfect["auc"], perfect["eer"], perfect["accuracy"]) == (1, 0, 1)
    reversed_ = predict.verification_metrics([0.9, 0.8, 0.3, 0.1], [0, 0, 1, 1])
    assert (reversed_["auc"], reversed_["eer"]) == (0, 1)
    tied = predict.verification_metrics([0.5] * 4, [1, 0, 1, 0])
    assert (tied["auc"], tied["eer"]) == (0.5, 0.5)
    mixed = predict.verification_metrics([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])  # 3 of 4 positive-negative pairs ordered
    assert (mixed["auc"], mixed["eer"], mixed["accuracy"]) == (0.75, 0.5, 0.75)
    # AUC is the chance that a same pair outscores a different one, ties counting half
    rng = np.random.default_rng(0)
    scores, same = rng.integers(0, 10, 200) / 10, rng.random(200) < 0.4
    wins = scores[same][:, None] - scores[~same][None, :]
    assert predict.verification_metrics(scores, same)["auc"] == pytest.approx((wins > 0).mean() + 0.5 * (wins == 0).mean())
    # 1000 different pairs, one of them above every same pair, five above 0.497: at FAR 1e-3 one
    # false accept is allowed (TAR 2/3), at 1e-2 ten are (all three same pairs)
    different = np.r_[np.linspace(-0.5, 0.49, 995), [0.5, 0.499, 0.498, 0.4975, 0.95]]
    metrics = predict.verification_metrics(np.r_[different, [0.9, 0.7, 0.497]], np.r_[np.zeros(1000), np.ones(3)])
    assert metrics["tar_at_far"][1e-3] == pytest.approx(2 / 3) and metrics["tar_at_far"][1e-2] == 1
    assert metrics["threshold"] == pytest.approx(0.7) and metrics["accuracy"] == pytest.approx(1001 / 1003)


@pytest.fixture(scope="module")
def verification_run(tmp_path_factory):
    """A network trained on VERIFICATION_SET, and that set's directory."""
    root = tmp_path_factory.mktemp("verification") / "data"
    generate(root, **VERIFICATION_SET, workers=1)
    out = tmp_path_factory.mktemp("verification_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin, badly on a shared CPU
    try:
        code = run_training.main(["--data-dir", str(root), "--out", str(out), *VERIFICATION_NET])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out / "last.ckpt", root


def test_verify_tells_unseen_identities_apart(verification_run, tmp_path, capsys):
    checkpoint, root = verification_run
    pairs = read_rows(root / "verification/verification_pairs.csv")
    argv = ["verify", "--checkpoint", checkpoint, "--pairs", root / "verification/verification_pairs.csv", "--images",
            root / "verification/known", "--out", tmp_path / "scores.csv", "--roc", tmp_path / "roc.png", "--num-workers", "0"]
    result = run_command(list(map(str, argv)), capsys)
    assert result.returncode == 0, result.stderr
    header, *rows = read_rows(tmp_path / "scores.csv")
    assert header == ["img1", "img2", "score", "same"] and [row[:2] + row[3:] for row in rows] == pairs[1:]
    scores = np.array([float(row[2]) for row in rows])
    assert np.all(np.abs(scores) <= 1 + 1e-6)
    metrics = predict.verification_metrics(scores, [row[3] == "1" for row in rows])
    # about 0.86, EER 0.18; untrained networks score 0.49 to 0.64
    assert metrics["auc"] > 0.75 and metrics["eer"] < 0.3 and metrics["accuracy"] > 0.7, metrics
    assert f"ROC AUC {metrics['auc']:.4f}, EER {metrics['eer']:.4f}, TAR@FAR=0.001 " in result.stdout
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_finds_the_threshold_that_is_best_by_construction():
    # right matches down to 0.8, then an unknown face, a wrong match and two more unknowns: the one
    # best cut lies between 0.8 and 0.7, and it gets all but the wrong match right
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3]
    matches = ["a", "b", "c", "a", "b", "c", "a"]
    truth = ["a", "b", "c", predict.NO_MATCH, "c", predict.NO_MATCH, predict.NO_MATCH]
    assert predict.calibrate_threshold(scores, matches, truth) == (pytest.approx(0.75), pytest.approx(6 / 7))
    # all unknown: midway from the best score to 1; all right: midway from the lowest to -1; a tie is never cut
    assert predict.calibrate_threshold([0.4, 0.2], ["a", "b"], [predict.NO_MATCH] * 2) == (pytest.approx(0.7), 1)
    assert predict.calibrate_threshold([0.4, 0.2], ["a", "b"], ["a", "b"]) == (pytest.approx(-0.4), 1)
    assert predict.calibrate_threshold([0.5, 0.5], ["a", "b"], ["a", predict.NO_MATCH])[1] == 0.5


def known_folder(root, images_by_identity):
    """The real data's known/ layout: <identity>/0001_01.jpg, 0002_01.jpg..., names repeated across identities."""
    for identity, images in images_by_identity.items():
        (root / identity).mkdir(parents=True)
        for k, image in enumerate(images, start=1):
            shutil.copy(image, root / identity / f"{k:04d}_01.jpg")
    return root


def test_identify_matches_each_face_to_the_mean_embedding_of_an_identity(checkpoint, tiny_faces, tmp_path, capsys):
    # known: two train images of each of 4 identities (the real layout); unknown: the test images
    known = known_folder(tmp_path / "known", {name.name: sorted(name.glob("*.jpg"))[:2]
                                             for name in sorted((tiny_faces / "train").iterdir())})
    argv = ["identify", "--checkpoint", checkpoint, "--known", known, "--unknown", tiny_faces / "test",
            "--out", tmp_path / "out.csv", "--threshold", "-1", "--num-workers", "0"]
    result = run_command(list(map(str, argv)), capsys)
    assert result.returncode == 0, result.stderr
    assert "wrote 8 rows" in result.stdout and "4 known identities, 0 n000000" in result.stdout
    header, *rows = read_rows(tmp_path / "out.csv")
    # by hand: the closest normalised mean of each identity's two embeddings
    model = predict.load_model(checkpoint, "cpu")
    unknown, ids, _ = predict.embed_images(model, tiny_faces / "test", num_workers=0)
    names = sorted(p.name for p in known.iterdir())
    templates = []
    for name in names:
        embeddings, _, _ = predict.embed_images(model, known / name, num_workers=0)
        templates.append(torch.nn.functional.normalize(embeddings.mean(0), dim=0))
    nearest = (unknown @ torch.stack(templates).T).argmax(1)
    assert header == ["id", "label"] and rows == [[key, names[i]] for key, i in zip(ids, nearest.tolist())]
    # a threshold above every cosine says n000000 of all
    predict.identify(checkpoint, known, tiny_faces / "test", tmp_path / "none.csv", threshold=1.01, num_workers=0)
    assert [label for _, label in read_rows(tmp_path / "none.csv")[1:]] == ["n000000"] * 8


def test_calibration_with_one_image_per_identity_and_no_face_known(checkpoint, tiny_faces, tmp_path, capsys):
    # known/ holds one image of each of identities 1-2; every unknown image is of identity 3 or 4
    train = sorted((tiny_faces / "train").iterdir())
    known = known_folder(tmp_path / "known", {path.name: sorted(path.glob("*.jpg"))[:1] for path in train[:2]})
    unknown = tmp_path / "unknown_dev"
    unknown.mkdir()
    for path in train[2:]:
        for image in sorted(path.glob("*.jpg"))[:3]:
            shutil.copy(image, unknown / f"{path.name}_{image.name}")
    labels = tmp_path / "verification_dev.csv"
    labels.write_text("id,label\n" + "".join(f"{p.name},n000000\n" for p in sorted(unknown.iterdir())))
    argv = ["identify", "--checkpoint", checkpoint, "--known", known, "--unknown", unknown, "--out", tmp_path / "out.csv",
            "--calibrate", unknown, "--labels", labels, "--num-workers", "0"]
    result = run_command(list(map(str, argv)), capsys)
    assert result.returncode == 0, result.stderr
    assert "open-set accuracy 1.0000 on 6 images" in result.stdout  # a threshold above all: every face unknown
    assert read_rows(tmp_path / "out.csv")[1:] == [[p.name, "n000000"] for p in sorted(unknown.iterdir())]
    result = run_command(list(map(str, ["evaluate", "--submission", tmp_path / "out.csv", "--labels", labels, "--open-set"])),
                         capsys)
    assert "open-set accuracy 1.0000 (6/6); said n000000 of 6/6 unknown faces and of 0/0 known ones" in result.stdout
    # a truth naming an identity that known/ lacks is one line
    labels.write_text(labels.read_text().replace(",n000000\n", ",n000004\n", 1))
    line = assert_one_line_error(run_command(list(map(str, argv)), capsys))
    assert "identity n000004 is not in" in line


def test_identify_and_score_the_synthetic_verification_task(verification_run, tmp_path, capsys):
    checkpoint, root = verification_run
    faces = root / "verification"
    argv = ["identify", "--checkpoint", checkpoint, "--known", faces / "known", "--unknown", faces / "unknown_test",
            "--out", tmp_path / "out.csv", "--calibrate", faces / "unknown_dev", "--labels", faces / "verification_dev.csv",
            "--num-workers", "0", "--tta"]
    result = run_command(list(map(str, argv)), capsys)
    assert result.returncode == 0, result.stderr
    header, *rows = read_rows(tmp_path / "out.csv")
    truth = read_rows(faces / "verification_test.csv")[1:]
    assert header == ["id", "label"] and [key for key, _ in rows] == [key for key, _ in truth]
    assert {label for _, label in rows} <= {p.name for p in (faces / "known").iterdir()} | {"n000000"}
    score = predict.score_submission(tmp_path / "out.csv", faces / "verification_test.csv", open_set=True)
    by_hand = sum(row == answer for row, answer in zip(rows, truth))
    assert score["correct"] == by_hand and score["rows"] == 14 * 3 and score["unknown"] == 2 * 3
    assert score["accuracy"] > 2 / 13, score  # 13 answers (12 identities or n000000): over twice chance
    result = run_command(list(map(str, ["evaluate", "--submission", tmp_path / "out.csv", "--labels",
                                        faces / "verification_test.csv", "--open-set"])), capsys)
    assert f"open-set accuracy {score['accuracy']:.4f} ({by_hand}/42)" in result.stdout


def make_recipe(target: str, **variables) -> list[list[str]]:
    """The commands of a Makefile target, each $(NAME) replaced by variables[NAME], split as the shell splits them."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = text.split(f"\n{target}:")[1].split("\n\n")[0].splitlines()[1:]
    return [shlex.split(re.sub(r"\$\((\w+)\)", lambda name: variables[name[1]], line)) for line in recipe]


def test_make_demo_scores_the_run_with_the_predict_commands(verification_run, tmp_path, capsys):
    checkpoint, root = verification_run
    shutil.copy(checkpoint, tmp_path / "best.ckpt")
    printed = []
    for command in make_recipe("demo-score", PYTHON="python", DEMO_DATA=str(root), DEMO_OUT=str(tmp_path)):
        assert command[:2] == ["python", "predict.py"], command
        result = run_command(command[2:], capsys)
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout)
    submitted, scored, verified, identified, open_set = printed
    assert f"wrote {24 * 4} rows" in submitted and re.search(r"accuracy 0\.\d{4} \(\d+/96\)", scored)
    auc = float(re.search(r"ROC AUC (\S+),", verified)[1])
    assert auc > 0.75 and "TAR@FAR=0.01 " in verified and (tmp_path / "roc.png").is_file()
    assert "calibrated on" in identified and len(read_rows(tmp_path / "verification.csv")) == 1 + 42
    assert float(re.search(r"open-set accuracy (\S+) ", open_set)[1]) > 2 / 13  # over twice chance, as above


# -----------------------------------------------------------------------------
# the command line: one line on stderr, exit status 2, and no earlier output lost

@pytest.fixture(scope="module")
def bad_inputs(checkpoint, tiny_faces, tmp_path_factory):
    """A copy of the test set with one image truncated (`bad`), beside the good checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(tiny_faces / "test", root / "test")
    bad = sorted((root / "test").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200])
    return dict(bad=bad, checkpoint=checkpoint, test=tiny_faces / "test", bad_test=root / "test")


def submit_command(inputs, out, *flags):
    """predict.py submit arguments on the test set with the truncated image, writing over a file `out`."""
    out.write_text("an earlier submission\n")
    return ["submit", "--num-workers", "0", "--out", str(out), "--checkpoint", str(inputs["checkpoint"]),
            "--test-dir", str(inputs["bad_test"]), *flags]


def test_the_script_names_the_unreadable_image_in_one_line(bad_inputs, tmp_path):
    out = tmp_path / "submission.csv"
    command = [sys.executable, str(ROOT / "predict.py"), *submit_command(bad_inputs, out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad_inputs["bad"].name in assert_one_line_error(result)  # no Lightning start-up lines on stderr
    assert result.stdout == "" and out.read_text() == "an earlier submission\n"  # nor its progress bar on stdout


def test_skip_bad_leaves_out_the_unreadable_image_and_says_so(bad_inputs, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    with pytest.warns(UserWarning, match="leaving out unreadable test image"):
        result = run_command(submit_command(bad_inputs, out, "--skip-bad"), capsys)
    assert result.returncode == 0, result.stderr
    assert "leaving out 1 unreadable images" in result.stdout and "img/s" in result.stdout
    ids = [row[0] for row in read_rows(out)[1:]]
    assert ids == sorted(path.name for path in bad_inputs["test"].iterdir() if path.name != bad_inputs["bad"].name)


def test_inference_applies_the_checkpoints_centre_crop():
    model = FaceClassifier(num_classes=2, architecture=dict(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1)), image_size=8,
                           crop=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, 10:30, 10:30] = 255  # the centre half of each side: what the model saw in training
    assert torch.equal(predict.model_transform(model)(image), torch.ones(3, 8, 8))
