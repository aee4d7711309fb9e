"""The run a GPU takes, end to end on the CPU. On CUDA `--augment-on-device auto` resolves to on:
the workers only read JPEG bytes, and each train batch is decoded, resized and augmented where the
model is. Every test here trains that way through run_training.main, on the CPU (the same code,
another device), and uses the checkpoints through predict.main, as a user on a GPU would. The
branches only CUDA runs are listed in docs/gpu.md with the test that runs their CPU twin."""

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
import run_training
from training import FaceClassifier, epoch_metrics, warmup_cosine_lr
from tests.conftest import FAST, TINY_SET

ON_DEVICE = ["--augment-on-device", "on"]  # what auto resolves to on CUDA (test_data's resolution test)
EPOCHS = ["--epochs", "4", "--lr", "3e-3"]  # 4 steps an epoch at FAST's batch 8 on the tiny set
TRAIN_IMAGES = TINY_SET["identities"] * TINY_SET["train_per_identity"]


def train(data_dir, out, *flags):
    return run_training.main(["--data-dir", str(data_dir), "--out", str(out), *FAST, *ON_DEVICE, *EPOCHS, *flags])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def losses(out: Path) -> list[float]:
    return [value for _, value in epoch_metrics(out / "metrics.csv")["train_loss_epoch"]]


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def submit_and_score(checkpoint: Path, faces: Path, out: Path) -> float:
    """predict.py submit on the test split, scored by predict.py evaluate's scorer: the accuracy."""
    submission = out / "submission.csv"
    assert predict.main(["submit", "--checkpoint", str(checkpoint), "--test-dir", str(faces / "test"),
                         "--out", str(submission), "--num-workers", "0"]) == 0
    rows = read_rows(submission)
    assert rows[0] == ["id", "label"] and [row[0] for row in rows[1:]] == sorted(p.name for p in (faces / "test").iterdir())
    return predict.score_submission(submission, faces / "test_labels.csv", checkpoint)["accuracy"]


@pytest.fixture(scope="module")
def device_run(tiny_faces, tmp_path_factory):
    """Sixteen epochs of the tiny network, decoded and augmented on the device: its --out."""
    out = tmp_path_factory.mktemp("device_run")
    assert train(tiny_faces, out, "--epochs", "16", "--lr", "1e-2", "--batch-size", "4") == 0
    return out


def test_a_run_on_the_device_path_learns_and_its_checkpoint_submits(device_run, tiny_faces, capsys):
    assert np.mean(losses(device_run)[-3:]) < 0.85 * losses(device_run)[0]
    assert load(device_run / "best.ckpt")["datamodule_hyper_parameters"]["augment_on_device"] is True
    assert submit_and_score(device_run / "best.ckpt", tiny_faces, device_run) > 0.25  # 4 identities: above chance


def test_the_run_says_where_it_decodes(tiny_faces, tmp_path, caplog):
    assert train(tiny_faces, tmp_path / "run", "--epochs", "2") == 0
    assert "0 data workers per device, decoding and augmenting on the device" in caplog.text


def test_predict_commands_on_a_checkpoint_trained_on_the_device(device_run, tiny_faces, tmp_path):
    checkpoint, common = str(device_run / "best.ckpt"), ["--num-workers", "0"]
    assert predict.main(["evaluate", "--checkpoint", checkpoint, "--data-dir", str(tiny_faces / "dev"), *common]) == 0
    assert predict.main(["embed", "--checkpoint", checkpoint, "--images", str(tiny_faces / "test"),
                         "--out", str(tmp_path / "emb.npy"), *common]) == 0
    embeddings = np.load(tmp_path / "emb.npy")
    assert embeddings.shape == (8, 32) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    truth = dict(read_rows(tiny_faces / "test_labels.csv")[1:])
    names = sorted(truth)
    pairs = [(a, b, int(truth[a] == truth[b])) for i, a in enumerate(names) for b in names[i + 1:]]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("img1", "img2", "same"), *pairs])
    assert predict.main(["verify", "--checkpoint", checkpoint, "--pairs", str(tmp_path / "pairs.csv"),
                         "--images", str(tiny_faces / "test"), "--out", str(tmp_path / "scores.csv"), *common]) == 0
    scores = read_rows(tmp_path / "scores.csv")
    assert len(scores) == 1 + len(pairs) == 1 + 28
    assert predict.main(["identify", "--checkpoint", checkpoint, "--known", str(tiny_faces / "dev"), "--unknown",
                         str(tiny_faces / "test"), "--out", str(tmp_path / "identified.csv"), "--threshold", "-1", *common]) == 0
    identified = dict(read_rows(tmp_path / "identified.csv")[1:])
    assert sorted(identified) == names and set(identified.values()) <= set(truth.values())


def test_an_interrupted_run_on_the_device_path_resumes_to_the_uninterrupted_model(tiny_faces, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(tiny_faces, whole) == 0
    step = FaceClassifier.training_step

    def interrupted(model, batch, batch_idx):
        if model.global_step == 9:  # in epoch 2: epochs 0 and 1 are in last.ckpt
            raise KeyboardInterrupt
        return step(model, batch, batch_idx)

    monkeypatch.setattr(FaceClassifier, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_faces, parts)
    assert load(parts / "last.ckpt")["epoch"] == 1
    monkeypatch.setattr(FaceClassifier, "training_step", step)
    assert train(tiny_faces, parts, "--resume") == 0
    for name in ("last.ckpt", "best.ckpt"):
        resumed, uninterrupted = load(parts / name)["state_dict"], load(whole / name)["state_dict"]
        for key, tensor in uninterrupted.items():
            assert torch.equal(resumed[key], tensor), (name, key)

    # --resume --epochs N: the run goes on over the longer schedule, still on the device
    assert train(tiny_faces, whole, "--resume", "--epochs", "6") == 0
    last = load(whole / "last.ckpt")
    assert last["epoch"] == 5 and last["datamodule_hyper_parameters"]["augment_on_device"] is True
    (lr_name,) = [name for name in epoch_metrics(whole / "metrics.csv") if name.startswith("lr")]
    logged = dict(epoch_metrics(whole / "metrics.csv")[lr_name])
    expected = [warmup_cosine_lr(epoch, warmup_epochs=1, max_epochs=6, peak_lr=3e-3) for epoch in (4, 5)]
    assert [logged[4], logged[5]] == pytest.approx(expected)
    assert len(losses(whole)) == 6


def test_full_trains_on_train_and_dev_decoded_on_the_device(tiny_faces, tmp_path):
    out = tmp_path / "full"
    assert train(tiny_faces, out, "--full") == 0
    dev_images = TINY_SET["identities"] * TINY_SET["dev_per_identity"]
    images = dict(epoch_metrics(out / "metrics.csv")["train_images"])
    assert images[0] == TRAIN_IMAGES + dev_images  # every image of both splits, every epoch
    assert (out / "last.ckpt").is_file() and not (out / "best.ckpt").exists()
    assert submit_and_score(out / "last.ckpt", tiny_faces, out) >= 0  # a run without dev submits from last.ckpt


def test_the_regularisers_run_on_the_device_path(tiny_faces, tmp_path):
    out = tmp_path / "modern"
    assert train(tiny_faces, out, "--ema", "0.5", "--cutmix-alpha", "1", "--drop-path", "0.1") == 0
    hparams = load(out / "last.ckpt")["hyper_parameters"]
    assert (hparams["ema_decay"], hparams["cutmix_alpha"], hparams["architecture"]["drop_path"]) == (0.5, 1.0, 0.1)
    assert all(np.isfinite(losses(out)))
    submit_and_score(out / "best.ckpt", tiny_faces, out)


def test_subset_classes_on_the_device_path(tiny_faces, tmp_path):
    out = tmp_path / "subset"
    assert train(tiny_faces, out, "--subset-classes", "3") == 0
    checkpoint = load(out / "best.ckpt")
    assert checkpoint["class_names"] == sorted(p.name for p in (tiny_faces / "train").iterdir())[:3]
    assert dict(epoch_metrics(out / "metrics.csv")["train_images"])[0] == 3 * TINY_SET["train_per_identity"]
    assert predict.main(["submit", "--checkpoint", str(out / "best.ckpt"), "--test-dir", str(tiny_faces / "test"),
                         "--out", str(out / "submission.csv"), "--num-workers", "0"]) == 0
    assert {row[1] for row in read_rows(out / "submission.csv")[1:]} <= {"0", "1", "2"}


def test_arcface_fine_tuning_from_a_device_run(device_run, tiny_faces, tmp_path):
    out = tmp_path / "arcface"
    assert train(tiny_faces, out, "--loss", "arcface", "--init-from", str(device_run / "best.ckpt")) == 0
    checkpoint = load(out / "best.ckpt")
    assert checkpoint["hyper_parameters"]["loss"] == "arcface" and "margin_head.weight" in checkpoint["state_dict"]
    assert all(np.isfinite(losses(out)))
    assert predict.main(["embed", "--checkpoint", str(out / "best.ckpt"), "--images", str(tiny_faces / "test"),
                         "--out", str(tmp_path / "emb.npy"), "--num-workers", "0"]) == 0


# --- the image kinds of a real data set ------------------------------------------------------


def write_kinds(folder: Path) -> dict[str, Path]:
    """A PNG, a grayscale, a CMYK and a progressive JPEG, and a corrupt (truncated) JPEG, 48 px."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    kinds = {"png": folder / "kind_png.png", "gray": folder / "kind_gray.jpg", "cmyk": folder / "kind_cmyk.jpg",
             "progressive": folder / "kind_progressive.jpg", "corrupt": folder / "kind_corrupt.jpg"}
    photo.save(kinds["png"])
    photo.convert("L").save(kinds["gray"])
    photo.convert("CMYK").save(kinds["cmyk"])
    photo.save(kinds["progressive"], progressive=True)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(kinds["corrupt"])
    kinds["corrupt"].write_bytes(kinds["corrupt"].read_bytes()[:1500])  # its header is whole, its pixels not
    return kinds


def test_every_image_kind_decodes_on_the_device_path_as_load_image_does(tmp_path):
    for kind, path in write_kinds(tmp_path).items():
        encoded = data.read_encoded(path)
        if kind == "corrupt":
            with pytest.warns(UserWarning, match=f"skipping unreadable image {path}: JPEG data is damaged"):
                with pytest.raises(data.DataError, match="none of the 1 images"):
                    data.decode_batch([encoded], [str(path)], torch.device("cpu"), None, set())
            continue
        decoded, kept = data.decode_batch([encoded], [str(path)], torch.device("cpu"), None, set())
        assert kept == [0] and torch.equal(decoded[0], data.load_image(path)), kind


def test_a_train_set_of_every_image_kind_trains_on_all_but_the_corrupt_one(tiny_faces, tmp_path, monkeypatch):
    faces = shutil.copytree(tiny_faces, tmp_path / "faces")
    kinds = write_kinds(faces / "train" / "n000001")
    decoded_paths = []
    decode = data.decode_batch

    def recording(images, paths, *args):
        batch, kept = decode(images, paths, *args)
        decoded_paths.extend(paths[i] for i in kept)
        return batch, kept

    monkeypatch.setattr(data, "decode_batch", recording)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(faces, tmp_path / "run", "--image-size", "32", "--epochs", "2") == 0
    skipped = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert skipped == [f"skipping unreadable image {kinds['corrupt']}: JPEG data is damaged: "
                       + skipped[0].rpartition("damaged: ")[2]]  # once, naming it, however many epochs
    seen = set(decoded_paths)
    assert {str(path) for kind, path in kinds.items() if kind != "corrupt"} <= seen
    assert str(kinds["corrupt"]) not in seen
    assert len(seen) == TRAIN_IMAGES + len(kinds) - 1  # every other train image too
