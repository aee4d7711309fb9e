"""Every command end to end, in this process: `main(argv)` run through cli.run as the scripts run
it, on the tiny synthetic set, checking what it wrote; then one table of the user's mistakes, each
one line on stderr, exit status 2, and no input changed. A subprocess per case would pay torch's
start-up each time; tests/test_faults.py runs the real scripts where a process is the point
(signals, a full disk, a diverged loss)."""

import csv
import hashlib
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cli
import data
import predict
import run_training
import synthetic_faces
from checkpoints import load_model
from tests.conftest import FAST
from tests.test_faults import BAD_KINDS, make_set, write_bad, write_image

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def run_command(main, argv, capsys) -> subprocess.CompletedProcess:
    """`main(argv)` through cli.run, as `python SCRIPT ARGV` runs it: exit status, stdout, stderr."""
    argv = list(map(str, argv))
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: main(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, stop.value.code or 0, captured.out, captured.err)


def succeeded(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def one_error_line(result) -> str:
    """The `error: ...` line of a failed command: exit status 2, no traceback, and that line the
    only one and the last (a progress bar may come before it)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr[-3000:]
    return lines[-1]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# -----------------------------------------------------------------------------
# run_training.py

def test_run_training_writes_checkpoints_log_curves_and_config(trained_run, tiny_faces):
    """trained_run is `run_training.main` on the tiny set, 8 epochs (conftest.py)."""
    assert sorted(path.name for path in trained_run.iterdir()) == [
        "best.ckpt", "config.yaml", "curves.png", "last.ckpt", "metrics.csv"]
    last = torch.load(trained_run / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 7
    model = load_model(trained_run / "best.ckpt", "cpu")
    assert model.class_names == sorted(path.name for path in (tiny_faces / "train").iterdir())
    settings = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert (settings["recipe"]["epochs"], settings["recipe"]["lr"], settings["data"]["batch_size"]) == (8, 0.003, 4)
    assert Image.open(trained_run / "curves.png").size[0] > 0


def test_a_run_and_its_resume_do_not_warn_of_the_folder_they_own(tiny_faces, tmp_path, recwarn):
    """--out is the run's (earlier runs refused or cleared, config.yaml written first): Lightning's
    "Checkpoint directory ... exists and is not empty" would be a false alarm at every start."""
    argv = ["--data-dir", str(tiny_faces), "--out", str(tmp_path / "run"), *FAST]
    assert run_training.main([*argv, "--epochs", "1"]) == 0
    assert run_training.main([*argv, "--epochs", "2", "--resume"]) == 0
    assert not [str(w.message) for w in recwarn if "is not empty" in str(w.message)]


def metric_epochs(run) -> set:
    """The epochs metrics.csv holds a dev accuracy for."""
    with open(run / "metrics.csv", newline="") as f:
        return {row["epoch"] for row in csv.DictReader(f) if row.get("val_acc")}


def test_resume_trains_a_finished_run_longer(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    argv = ["--resume", "--out", run, "--epochs", "9", "--wandb", "off", "--num-workers", "0", "--accelerator", "cpu"]
    succeeded(run_command(run_training.main, argv, capsys))
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 8
    assert load_model(run / "last.ckpt", "cpu").hparams.max_epochs == 9
    assert metric_epochs(run) == {str(epoch) for epoch in range(9)}


def test_config_trains_the_run_again_with_the_flags_given_over_it(trained_run, tmp_path, capsys):
    out = tmp_path / "again"
    argv = ["--config", trained_run / "config.yaml", "--out", out, "--epochs", "2"]
    succeeded(run_command(run_training.main, argv, capsys))
    before, after = (yaml.safe_load((run / "config.yaml").read_text()) for run in (trained_run, out))
    assert after["recipe"].pop("epochs") == 2 and before["recipe"].pop("epochs") == 8
    assert after["run"].pop("out") == str(out) and before["run"].pop("out") == str(trained_run)
    assert after == before
    assert metric_epochs(out) == {"0", "1"}


def test_demo_makes_its_data_trains_and_scores_the_submission(tmp_path, monkeypatch, capsys):
    """--demo on a smaller synthetic set than its own (which takes 20 s to draw)."""
    monkeypatch.setattr(run_training, "DEMO_DATA", dict(
        identities=4, train_per_identity=8, dev_per_identity=2, test_per_identity=3, image_size=48,
        verification_identities=3, pairs=12, unknown_per_identity=2))
    faces, out = tmp_path / "demo_data", tmp_path / "demo"
    argv = ["--demo", "--data-dir", faces, "--out", out, *FAST, "--epochs", "2"]
    stdout = succeeded(run_command(run_training.main, argv, capsys))
    assert len(list((faces / "train").rglob("*.jpg"))) == 32 and len(list((faces / "test").iterdir())) == 12
    submit, score = [shlex.split(line)[2:] for line in stdout.split("score it")[-1].splitlines()[1:]]
    succeeded(run_command(predict.main, submit, capsys))  # the commands it prints, as the user types them
    stdout = succeeded(run_command(predict.main, score, capsys))
    score = predict.score_submission(out / "submission.csv", faces / "test_labels.csv", out / "best.ckpt")
    assert score["rows"] == 12 and f"accuracy {score['accuracy']:.4f} ({score['correct']}/12)" in stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["data_dir"] == str(faces)


# -----------------------------------------------------------------------------
# predict.py

@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "best.ckpt"


def test_submit_writes_a_class_index_per_test_image(checkpoint, tiny_faces, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    argv = ["submit", "--checkpoint", checkpoint, "--test-dir", tiny_faces / "test", "--out", out, "--num-workers", "0"]
    stdout = succeeded(run_command(predict.main, argv, capsys))
    header, *rows = read_rows(out)
    assert header == ["id", "label"]
    assert [row[0] for row in rows] == sorted(path.name for path in (tiny_faces / "test").iterdir())
    assert {int(row[1]) for row in rows} <= set(range(4))
    assert f"wrote 8 rows to {out}" in stdout


def test_evaluate_a_labelled_split_and_a_submission(checkpoint, tiny_faces, tmp_path, capsys):
    argv = ["evaluate", "--checkpoint", checkpoint, "--data-dir", tiny_faces / "dev", "--num-workers", "0"]
    stdout = succeeded(run_command(predict.main, argv, capsys))
    model, paths = load_model(checkpoint, "cpu"), sorted((tiny_faces / "dev").rglob("*.jpg"))
    labels = torch.tensor([model.class_names.index(path.parent.name) for path in paths])
    with torch.no_grad():
        images = torch.stack([predict.model_transform(model)(data.load_image(path)) for path in paths])
        top1 = (model(images).argmax(1) == labels).float().mean().item()
    assert f"top-1 {top1:.4f}" in stdout and "on 12 images" in stdout
    submission, labels = tmp_path / "submission.csv", tmp_path / "labels.csv"
    submission.write_text("id,label\na.jpg,0\nb.jpg,1\nc.jpg,1\n")
    labels.write_text("id,label\n" + "".join(f"{name}.jpg,{model.class_names[k]}\n" for k, name in enumerate("abc")))
    stdout = succeeded(run_command(predict.main, ["evaluate", "--submission", submission, "--labels", labels,
                                                  "--checkpoint", checkpoint], capsys))
    assert f"{submission}: accuracy 0.6667 (2/3)" in stdout


def by_hand(model, paths) -> torch.Tensor:
    """The unit-length embeddings of images, computed here."""
    transform = predict.model_transform(model)
    with torch.no_grad():
        embeddings = model.embed(torch.stack([transform(data.load_image(path)) for path in paths]))
    return torch.nn.functional.normalize(embeddings, dim=1)


def test_embed_writes_each_images_embedding_and_the_file_names(checkpoint, tiny_faces, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    stdout = succeeded(run_command(predict.main, ["embed", "--checkpoint", checkpoint, "--images", tiny_faces / "test",
                                                  "--out", out, "--num-workers", "0"], capsys))
    paths = sorted((tiny_faces / "test").iterdir())
    assert out.with_suffix(".txt").read_text().split() == [path.name for path in paths]
    np.testing.assert_allclose(np.load(out), by_hand(load_model(checkpoint, "cpu"), paths).numpy(), atol=1e-5)
    assert f"wrote 8 x 32 embeddings to {out}" in stdout


def test_verify_scores_pairs_by_cosine_similarity(checkpoint, tiny_faces, tmp_path, capsys):
    truth = dict(read_rows(tiny_faces / "test_labels.csv")[1:])
    names = sorted(truth)
    pairs = [(a, b, int(truth[a] == truth[b])) for a, b in zip(names, names[1:] + names[:1])]
    (tmp_path / "pairs.csv").write_text("img1,img2,same\n" + "".join(f"{a},{b},{same}\n" for a, b, same in pairs))
    out, roc = tmp_path / "scores.csv", tmp_path / "roc.png"
    argv = ["verify", "--checkpoint", checkpoint, "--pairs", tmp_path / "pairs.csv", "--images", tiny_faces / "test",
            "--out", out, "--roc", roc, "--num-workers", "0"]
    stdout = succeeded(run_command(predict.main, argv, capsys))
    embeddings = by_hand(load_model(checkpoint, "cpu"), [tiny_faces / "test" / name for name in names])
    embedding = dict(zip(names, embeddings))
    header, *rows = read_rows(out)
    assert header == ["img1", "img2", "score", "same"] and [(a, b, int(same)) for a, b, _, same in rows] == pairs
    cosines = [float(embedding[a] @ embedding[b]) for a, b, _ in pairs]
    np.testing.assert_allclose([float(row[2]) for row in rows], cosines, atol=1e-5)
    assert "8 pairs: ROC AUC " in stdout and Image.open(roc).size[0] > 0


def test_identify_then_evaluate_open_set(checkpoint, tiny_faces, tmp_path, capsys):
    """At a threshold under any cosine similarity every face is matched; over any, none is."""
    out = tmp_path / "identities.csv"
    argv = ["identify", "--checkpoint", checkpoint, "--known", tiny_faces / "train", "--unknown", tiny_faces / "test",
            "--out", out, "--num-workers", "0", "--threshold"]
    stdout = succeeded(run_command(predict.main, [*argv, "1.01"], capsys))
    assert {row[1] for row in read_rows(out)[1:]} == {predict.NO_MATCH} and f"0 matched to 4 known identities" in stdout
    stdout = succeeded(run_command(predict.main, [*argv, "-1.01"], capsys))
    rows = read_rows(out)[1:]
    assert "8 matched to 4 known identities, 0" in stdout
    truth = dict(read_rows(tiny_faces / "test_labels.csv")[1:])
    right = sum(label == truth[name] for name, label in rows)
    stdout = succeeded(run_command(predict.main, ["evaluate", "--open-set", "--submission", out,
                                                  "--labels", tiny_faces / "test_labels.csv"], capsys))
    assert f"open-set accuracy {right / 8:.4f} ({right}/8)" in stdout


# -----------------------------------------------------------------------------
# data.py and synthetic_faces.py

def test_stats_prints_the_mean_and_std_of_the_images(tiny_faces, capsys):
    stdout = succeeded(run_command(data.main, ["stats", tiny_faces / "train", "--num-workers", "0"], capsys))
    images = [np.asarray(Image.open(path).convert("RGB"), np.float64).reshape(-1, 3) / 255
              for path in sorted((tiny_faces / "train").rglob("*.jpg"))]
    mean, std = np.concatenate(images).mean(0), np.mean([image.std(0, ddof=1) for image in images], 0)
    assert stdout.splitlines() == [f"{name} {tuple(round(float(v), 4) for v in values)}"
                                   for name, values in (("mean", mean), ("std", std))]


def test_split_lays_out_every_image_once(tiny_faces, tmp_path, capsys):
    src, out = tiny_faces / "train", tmp_path / "split"
    stdout = succeeded(run_command(data.main, ["split", src, out, "--dev", "0.25", "--test", "0.25"], capsys))
    counts = {split: len(list((out / split).rglob("*.jpg"))) for split in ("train", "dev", "test")}
    assert counts == {"train": 16, "dev": 8, "test": 8}
    assert sorted(path.name for path in (out / "dev").iterdir()) == sorted(path.name for path in src.iterdir())
    ids = sorted(row[0] for row in read_rows(out / "test_labels.csv")[1:])
    assert ids == sorted(path.name for path in (out / "test").iterdir())
    assert f"{out}: 4 identities; 16 train, 8 dev, 8 test images (copied from {src})" in stdout


def test_synthetic_faces_writes_a_set_and_reuses_it_when_asked_again(tmp_path, capsys):
    argv = ["--out", tmp_path / "set", "--identities", "2", "--train-per-identity", "3", "--dev-per-identity", "1",
            "--test-per-identity", "2", "--image-size", "32", "--workers", "1"]
    stdout = succeeded(run_command(synthetic_faces.main, argv, capsys))
    files = {path: path.read_bytes() for path in (tmp_path / "set").rglob("*") if path.is_file()}
    assert len(list((tmp_path / "set" / "train").rglob("*.jpg"))) == 6
    assert len(read_rows(tmp_path / "set" / "test_labels.csv")) == 1 + 4
    assert "6 train" in stdout
    succeeded(run_command(synthetic_faces.main, argv, capsys))
    assert {path: path.read_bytes() for path in (tmp_path / "set").rglob("*") if path.is_file()} == files


# -----------------------------------------------------------------------------
# the user's mistakes: one line, exit status 2, no input changed

def rename_images_to_txt(split):
    for path in split.rglob("*.jpg"):
        path.rename(path.with_suffix(".txt"))


BROKEN_SETS = {  # name: (how a two-identity set (make_set) is broken, what the error line says, flags)
    "no_train": (lambda root: shutil.rmtree(root / "train"), "{bad}/no_train/train: directory not found", ""),
    "train_no_identities": (lambda root: [shutil.rmtree(root / "train"), (root / "train").mkdir()],
                            "{bad}/train_no_identities/train: no identity folders", ""),
    "dev_no_identities": (lambda root: [shutil.rmtree(root / "dev"), (root / "dev").mkdir()],
                          "{bad}/dev_no_identities/dev: no identity folders", ""),
    "train_no_images": (lambda root: rename_images_to_txt(root / "train"), "{bad}/train_no_images/train: no images",
                        ""),
    "dev_no_images": (lambda root: rename_images_to_txt(root / "dev"), "{bad}/dev_no_images/dev: no images", ""),
    "empty_train_identity": (lambda root: (root / "train" / "c").mkdir(),
                             "{bad}/empty_train_identity/train/c: no images", ""),
    "dev_stranger": (lambda root: shutil.copytree(root / "dev" / "b", root / "dev" / "stranger"),
                     "{bad}/dev_stranger/dev/stranger: identity not in", ""),
    "train_unreadable": (lambda root: [write_bad(path, "zero bytes") for path in list((root / "train").rglob("*.jpg"))],
                         "none of its 8 images can be read", ""),
    "one_identity": (lambda root: [shutil.rmtree(root / split / "b") for split in ("train", "dev")],
                     "one identity, a (expected at least 2", ""),
    "mixed_sizes": (lambda root: write_image(root / "train" / "a" / "wide.jpg", 40),
                    "images of different sizes in one batch", "--batch-size 16"),  # one batch holds all 9 train images
}
BAD_CONFIGS = {  # name: (a config.yaml, what its error line says)
    "colour": ("recipe: {colour: blue}\n", "unknown setting recipe.colour"),
    "data_lr": ("data: {lr: 0.1}\n", "unknown setting data.lr"),
    "resume": ("run: {resume: last}\n", "unknown setting run.resume"),
    "epochs": ("recipe: {epochs: abc}\n", "argument --epochs: invalid int value: 'abc'"),
    "lr": ("recipe: {lr: -1}\n", "argument --lr: must be >= 1e-12, got -1"),
    "full": ("data: {full: maybe}\n", "argument --full: ignored explicit argument 'maybe'"),
    "list": ("- a list\n", "expected groups of settings"),
    "unparsable": ("recipe: {epochs: [1\n", "cannot read it"),
}


def write_bad_checkpoints(folder, good):
    """Files named .ckpt that are not a checkpoint predict.py can load or run_training.py resume."""
    folder.mkdir()
    (folder / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "zero.ckpt").write_bytes(b"")
    (folder / "directory.ckpt").mkdir()
    torch.save({"a": 1}, folder / "plain.ckpt")
    torch.save(torch.nn.Linear(3, 2).state_dict(), folder / "other_model.ckpt")
    for name, change in [("no_facenn", lambda hp: hp["architecture"].update(widths=(8, 16, 24))),  # 3 widths, 4 depths
                         ("unknown_setting", lambda hp: hp.update(colour="blue")),
                         ("other_widths", lambda hp: hp["architecture"].update(widths=(16, 16, 24, 32)))]:
        edited = torch.load(good, map_location="cpu", weights_only=False)
        change(edited["hyper_parameters"])
        torch.save(edited, folder / f"{name}.ckpt")


@pytest.fixture(scope="module")
def inputs(tiny_faces, trained_run, tmp_path_factory):
    """The inputs of the table's commands, read-only: {data} the tiny set, {run} a copy of its
    trained run, {bad} broken data sets, checkpoints, test folders, config files and earlier outputs."""
    bad = tmp_path_factory.mktemp("bad")
    run = shutil.copytree(trained_run, bad / "run")
    for name, (breakage, _, _) in BROKEN_SETS.items():
        breakage(make_set(bad / name))
    for split in ("train", "dev"):  # the tiny set, one identity renamed: classes the checkpoint lacks
        shutil.copytree(tiny_faces / split, bad / "other" / split)
        (bad / "other" / split / "n000004").rename(bad / "other" / split / "someone_else")
    for kind in [*BAD_KINDS, "mixed sizes"]:
        test = shutil.copytree(tiny_faces / "test", bad / "test" / kind.replace(" ", "_"))
        write_image(test / "zz-wide.jpg", 40) if kind == "mixed sizes" else write_bad(test / "bad.jpg", kind)
    (bad / "empty").mkdir()
    for name, (text, _) in BAD_CONFIGS.items():
        (bad / f"{name}.yaml").write_text(text)
    write_bad_checkpoints(bad / "ckpt", run / "best.ckpt")
    earlier = bad / "earlier"  # what the predict commands would write, from an earlier run
    earlier.mkdir()
    for name in ("submission.csv", "emb.npy", "scores.csv", "identities.csv"):
        (earlier / name).write_text(f"earlier {name}\n")
    names = sorted(path.name for path in (tiny_faces / "test").iterdir())
    (bad / "pairs.csv").write_text(f"img1,img2,same\n{names[0]},{names[1]},1\n{names[0]},{names[2]},0\n")
    (bad / "stranger_labels.csv").write_text("id,label\n0.jpg,n000001\n1.jpg,someone_else\n")
    (bad / "stranger_submission.csv").write_text("id,label\n0.jpg,0\n1.jpg,1\n")
    return dict(data=tiny_faces, run=run, bad=bad)


RUN = " ".join([*FAST, "--epochs", "1"])
FIT = "CKPT: its weights or settings do not fit FaceClassifier"
CHECKPOINT_FAULTS = {  # checkpoint: (what predict.py and --init-from say, what --resume says), CKPT its path
    "missing.ckpt": ("CKPT: checkpoint not found", "no checkpoint to resume at CKPT"),
    "directory.ckpt": ("CKPT: checkpoint not found", "no checkpoint to resume at CKPT"),
    "truncated.ckpt": ("CKPT: cannot read checkpoint", "CKPT: cannot read checkpoint"),
    "zero.ckpt": ("CKPT: cannot read checkpoint", "CKPT: cannot read checkpoint"),
    "plain.ckpt": ("CKPT: not a FaceClassifier checkpoint", "CKPT: not a FaceClassifier checkpoint"),
    "other_model.ckpt": ("CKPT: not a FaceClassifier checkpoint", "CKPT: not a FaceClassifier checkpoint"),
    "no_facenn.ckpt": (FIT, FIT),
    "unknown_setting.ckpt": (FIT, FIT),
    "other_widths.ckpt": (FIT, FIT),
}
PREDICT = {  # each predict.py command, writing over an earlier output where it writes one
    "submit": "submit --test-dir {data}/test --out {bad}/earlier/submission.csv",
    "evaluate": "evaluate --data-dir {data}/dev",
    "embed": "embed --images {data}/test --out {bad}/earlier/emb.npy",
    "verify": "verify --pairs {bad}/pairs.csv --images {data}/test --out {bad}/earlier/scores.csv",
    "identify": "identify --known {data}/train --unknown {data}/test --threshold 0.5 "
                "--out {bad}/earlier/identities.csv",
}
SPLIT = "split {out}/missing {out}/split"
SYNTH = "--out {out}/set --workers 1"

# (command, arguments, what its one error line says); {data}, {run} and {bad} are `inputs`, {out}
# an empty folder. A run_training.py command line without --data-dir gets one that does not exist,
# without --out one in {out}.
ERRORS = [
    # run_training.py: flags
    (run_training, "--epochs 0", "argument --epochs: must be >= 1, got 0"),
    (run_training, "--epochs -1", "argument --epochs: must be >= 1, got -1"),
    (run_training, "--epochs abc", "argument --epochs: invalid int value: 'abc'"),
    (run_training, "--epochs 2.5", "argument --epochs: invalid int value: '2.5'"),
    (run_training, "--batch-size 0", "--batch-size: must be >= 1, got 0"),
    (run_training, "--image-size 31", "--image-size: must be >= 32, got 31"),
    (run_training, "--std 0 0 0", "--std: must be >= 1e-06, got 0"),
    (run_training, "--std 0.2 0 0.2", "--std: must be >= 1e-06, got 0"),
    (run_training, "--std nan 1 1", "--std: must be a finite number, got nan"),
    (run_training, "--std 0.2 0.2", "--std: expected 3 arguments"),
    (run_training, "--lr 0", "argument --lr: must be >= 1e-12, got 0"),
    (run_training, "--lr nan", "argument --lr: must be a finite number, got nan"),
    (run_training, "--lr inf", "argument --lr: must be a finite number, got inf"),
    (run_training, "--weight-decay -0.1", "--weight-decay: must be >= 0.0"),
    (run_training, "--subset-classes 0", "--subset-classes: must be >= 1"),
    (run_training, "--num-workers -1", "--num-workers: must be >= 0"),
    (run_training, "--head-layers 3", "--head-layers: invalid choice"),
    (run_training, "--widths 8,x", "--widths: invalid int_list value"),
    (run_training, "--widths 0,8,16,32", "--widths: expected positive integers"),
    (run_training, "--widths 8,16,24", "--widths (8, 16, 24) and --depths (2, 2, 6, 2)"),
    (run_training, "--depths 1,1,1,1,1", "--widths (80, 160, 320, 640) and --depths (1, 1, 1, 1, 1)"),
    (run_training, "--no-such-flag", "unrecognized arguments: --no-such-flag"),
    (run_training, "--resume a b", "unrecognized arguments: b"),
    (run_training, "--epochs 5 --warmup-epochs 5", "--warmup-epochs 5 must be less than --epochs 5"),
    (run_training, "--ema 1", "--ema: must be < 1"),
    (run_training, "--drop-path 1", "--drop-path: must be < 1"),
    (run_training, "--drop-path x", "--drop-path: invalid float value: 'x'"),
    (run_training, "--loss arcface --mixup-alpha 0.2", "the margin needs one true class"),
    (run_training, "--loss arcface --cutmix-alpha 1", "CutMix mixes two classes"),
    (run_training, "--margin 0.3", "--margin is for --loss arcface or cosface"),
    (run_training, "--random-erasing 0.5 --augment-on-device on", "not with --augment-on-device on"),
    (run_training, "--auto-augment trivial --augment-on-device on", "not with --augment-on-device on"),
    (run_training, "--data-dir {out}/nowhere", "python run_training.py --demo"),
    (run_training, "--data-dir {data} --out {out}/run --subset-classes 9",
     "has 4 identities (expected subset_classes from 1 to 4"),
    (run_training, "--data-dir {data} --out {out}/run --mean nan 0.5 0.5", "--mean: must be a finite number"),
    (run_training, "--data-dir {data} --out {out}/run --wandb off --precision bogus", "Precision 'bogus' is invalid"),
    (run_training, "--data-dir {data} --out {out}/run --wandb off --strategy bogus", "invalid strategy name"),
    (run_training, "--data-dir {data} --out {out}/run --wandb off --devices 0", "devices='0'"),
    pytest.param(run_training, "--data-dir {data} --out {out}/run --wandb off --accelerator gpu",
                 "No supported gpu backend found", marks=NO_GPU),
    # run_training.py: its --out, --config, --resume and --init-from
    (run_training, "--data-dir {data} --out {run} " + RUN, "already holds a run"),
    (run_training, f"--data-dir {{bad}}/no_train --out {{run}} --overwrite {RUN}",
     "{bad}/no_train/train: directory not found"),
    (run_training, "--out {run} --resume --widths 8,8,8,8", "--widths (8, 8, 8, 8) contradicts"),
    (run_training, "--out {run} --resume --lr 0.1", "--lr 0.1 contradicts"),
    (run_training, "--out {run} --resume --norm layer", "--norm layer contradicts"),
    (run_training, "--backbone convnext --layer-scale 0.5", "--layer-scale is a FaceNN block option, not for --backbone"),
    (run_training, f"--data-dir {{data}} --out {{out}}/run {RUN} --batch-size 1 --image-size 32",
     "--batch-size 1 with 32 px images"),
    (run_training, f"--data-dir {{data}} --out {{run}} --overwrite --init-from {{run}}/best.ckpt {RUN}", "lies in --out"),
    (run_training, "--data-dir {bad}/other --out {run} --resume", "last.ckpt was trained on other identities"),
    (run_training, "--data-dir {bad}/other --out {out}/run --loss arcface --init-from {run}/best.ckpt "
     + RUN.replace("8,16,24,32", "8,16,24,48"),
     "best.ckpt: its network differs from this one: it has --widths 8,16,24,32, this run 8,16,24,48"),
    (run_training, "--config {bad}/missing.yaml --out {out}/run",
     "--config {bad}/missing.yaml: cannot read it (No such file or directory)"),
    *[(run_training, f"--config {{bad}}/{name}.yaml --out {{out}}/run", f"--config {{bad}}/{name}.yaml: {message}")
      for name, (_, message) in BAD_CONFIGS.items()],
    *[(run_training, f"--data-dir {{data}} --out {{out}}/run --epochs 2 --resume {{bad}}/ckpt/{name} {RUN}",
       messages[1].replace("CKPT", f"{{bad}}/ckpt/{name}")) for name, messages in CHECKPOINT_FAULTS.items()],
    *[(run_training, f"--data-dir {{data}} --out {{out}}/run --init-from {{bad}}/ckpt/{name} {RUN}",
       CHECKPOINT_FAULTS[name][0].replace("CKPT", f"{{bad}}/ckpt/{name}"))
      for name in ("missing.ckpt", "truncated.ckpt", "other_widths.ckpt")],
    # run_training.py: data it cannot train on
    *[(run_training, f"--data-dir {{bad}}/{name} --out {{out}}/run {RUN} {flags}", message)
      for name, (_, message, flags) in BROKEN_SETS.items()],
    # predict.py
    (predict, "", "the following arguments are required: command"),
    (predict, "bogus", "invalid choice: 'bogus'"),
    (predict, "submit --checkpoint x.ckpt --bogus", "unrecognized arguments: --bogus"),
    (predict, "submit --checkpoint x.ckpt --batch-size 0", "--batch-size: must be >= 1, got 0"),
    (predict, "submit --checkpoint x.ckpt --num-workers -1", "--num-workers: must be >= 0"),
    (predict, "submit --checkpoint x.ckpt --device tpu", "--device: invalid choice"),
    (predict, "submit", "required: --checkpoint"),
    (predict, "submit --checkpoint x.ckpt --out {out}", "is a directory"),
    (predict, "evaluate --data-dir {data}/dev", "evaluate --data-dir needs --checkpoint"),
    (predict, "evaluate --submission x.csv", "evaluate --submission needs --labels"),
    (predict, "embed --checkpoint x.ckpt --images {data}/test", "required: --out"),
    (predict, "verify --checkpoint x.ckpt --images {data}", "one of the arguments --pairs --lfw-pairs is required"),
    (predict, "verify --checkpoint x.ckpt --images {data} --pairs a.csv --lfw-pairs b.txt",
     "argument --lfw-pairs: not allowed with argument --pairs"),
    pytest.param(predict, "submit --checkpoint {run}/best.ckpt --test-dir {data}/test --out {out}/s.csv --device cuda",
                 "no CUDA device here", marks=NO_GPU),
    *[(predict, f"{PREDICT[command]} --num-workers 0 --checkpoint {{bad}}/ckpt/{name}",
       messages[0].replace("CKPT", f"{{bad}}/ckpt/{name}"))
      for command in PREDICT for name, messages in CHECKPOINT_FAULTS.items()],
    *[(predict, f"{PREDICT['submit'].replace('{data}/test', '{bad}/test/' + kind.replace(' ', '_'))} "
       "--num-workers 0 --checkpoint {run}/best.ckpt",
       "images of different sizes in one batch" if kind == "mixed sizes" else
       f"{{bad}}/test/{kind.replace(' ', '_')}/bad.jpg: unreadable image") for kind in [*BAD_KINDS, "mixed sizes"]],
    (predict, PREDICT["submit"].replace("{data}/test", "{bad}/empty") + " --checkpoint {run}/best.ckpt",
     "{bad}/empty: no images"),
    (predict, "evaluate --checkpoint {run}/best.ckpt --data-dir {bad}/other/dev --num-workers 0",
     "someone_else: identity unknown to"),
    (predict, "evaluate --submission {bad}/stranger_submission.csv --labels {bad}/stranger_labels.csv "
     "--checkpoint {run}/best.ckpt", "identity someone_else unknown to"),
    # data.py
    (data, "", "required: command"),
    (data, "stats {data}/train --bogus", "unrecognized arguments: --bogus"),
    (data, "stats {data}/train --max-images 0", "--max-images: must be >= 1, got 0"),
    (data, "stats {data}/train --image-size 0", "--image-size: must be >= 1, got 0"),
    (data, "stats {data}/train --num-workers -2", "--num-workers: must be >= 0"),
    (data, "stats {out}/missing", "{out}/missing: directory not found (expected {out}/missing/<identity>/*.jpg)"),
    (data, "stats {data}/test --num-workers 0", "{data}/test: no identity folders"),
    (data, "stats {bad}/train_unreadable/train --num-workers 0", "none of its 8 images can be read"),
    (data, "split {data}/train {bad}/earlier", "{bad}/earlier: not empty (expected a new or empty folder: split writes "
     "over nothing)"),
    (data, "split {data}/train {out}/split --dev -0.1", "--dev: must be >= 0"),
    (data, SPLIT + " --min-images 2", "an identity of 2 images would get no train image"),
    (data, SPLIT + " --dev 0.45 --test 0.45 --min-images 3", "use --min-images 9 or more"),
    (data, SPLIT + " --dev 0.45 --test 0.45 --min-images 3 --cap 4", "use --min-images and --cap 5 or more"),
    (data, SPLIT + " --dev 0.5 --test 0.5", "--dev 0.5 and --test 0.5 leave nothing for train"),
    # synthetic_faces.py
    (synthetic_faces, "", "required: --out"),
    (synthetic_faces, SYNTH + " --bogus", "unrecognized arguments: --bogus"),
    (synthetic_faces, SYNTH + " --identities many", "--identities: invalid int value"),
    (synthetic_faces, SYNTH + " --identities 1", "identities must be at least 2"),
    (synthetic_faces, SYNTH + " --image-size 16", "image_size must be at least 32"),
    (synthetic_faces, SYNTH + " --dev-per-identity -1", "dev_per_identity must not be negative"),
    (synthetic_faces, SYNTH + " --mislabel-rate 1", "mislabel_rate must be in [0, 1)"),
    (synthetic_faces, SYNTH + " --pairs 5", "pairs need verification_identities"),
    (synthetic_faces, "--out {out}/set --workers 0", "workers must be at least 1"),
    (synthetic_faces, "--out {data}/test_labels.csv", "is a file, not a directory"),
    (synthetic_faces, "--out {data}", "holds a synthetic face set made with other arguments"),
    (synthetic_faces, "--out {bad}/earlier --workers 1", "is not empty and holds no synthetic face set"),
]
ERRORS = [  # each named "script arguments"
    pytest.param(*case.values, marks=case.marks, id=f"{case.values[0].__name__} {case.values[1]}".strip())
    for case in (case if hasattr(case, "values") else pytest.param(*case) for case in ERRORS)
]


def snapshot(*roots) -> dict:
    """sha256 of every file under `roots`, and its folders (None): an empty folder left behind shows too."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for root in roots for path in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command, flags, expected", ERRORS)
def test_a_users_mistake_is_one_line_and_changes_no_input(inputs, tmp_path, capsys, command, flags, expected):
    out = tmp_path / "out"
    out.mkdir()
    argv = [arg.format(**inputs, out=out) for arg in flags.split()]
    for flag, path in (("--data-dir", out / "no_data"), ("--out", out / "run")):  # never the repo's data/ or checkpoint/
        if command is run_training and flag not in argv:
            argv += [flag, path]
    before = snapshot(*inputs.values())
    line = one_error_line(run_command(command.main, argv, capsys))
    assert expected.format(**inputs, out=out) in line, line
    assert snapshot(*inputs.values()) == before  # not a byte changed, no file or folder added
    assert not list(out.rglob("*.ckpt"))
    assert not any(out.iterdir()) or "in one batch" in line  # only a run stopped at its first batch wrote anything
