"""What the commands do with the user's files: no output replaces an input or another output,
every entry of a test folder is a row or named in a warning, names an output cannot hold are
refused before the work, and a submission's labels are read one way for the whole file."""

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from cli import UserError
from data import DataError, TestImages, compute_mean_std, eval_transform


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "best.ckpt"


def hashes(*paths):
    return {path: path.read_bytes() for path in paths}


@pytest.mark.parametrize("case", ["submit onto the checkpoint", "submit onto a test image", "embed onto the checkpoint",
                                  "embed names onto the embeddings", "verify onto the pairs", "verify roc onto out"])
def test_no_output_replaces_an_input_or_another_output(checkpoint, tiny_faces, tmp_path, case):
    ckpt = shutil.copy(checkpoint, tmp_path / "model.ckpt")
    test = shutil.copytree(tiny_faces / "test", tmp_path / "test")
    image = sorted(test.iterdir())[0]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"img1,img2,same\n{image.name},{image.name},1\n")
    before = hashes(ckpt, image, pairs)
    calls = {
        "submit onto the checkpoint": lambda: predict.submit(ckpt, test, ckpt, num_workers=0),
        "submit onto a test image": lambda: predict.submit(ckpt, test, image, num_workers=0),
        "embed onto the checkpoint": lambda: predict.embed(ckpt, test, tmp_path / "model.ckpt", num_workers=0),
        "embed names onto the embeddings": lambda: predict.embed(ckpt, test, tmp_path / "emb.txt", num_workers=0),
        "verify onto the pairs": lambda: predict.verify(ckpt, pairs, test, out=pairs, num_workers=0),
        "verify roc onto out": lambda: predict.verify(ckpt, pairs, test, out=tmp_path / "s.csv", roc=tmp_path / "s.csv",
                                                      num_workers=0),
    }
    with pytest.raises(UserError, match="would write over"):
        calls[case]()
    assert hashes(ckpt, image, pairs) == before
    assert not (tmp_path / "emb.npy").exists() and not (tmp_path / "s.csv").exists()


def test_every_entry_of_a_test_folder_is_a_row_or_named(tiny_faces, tmp_path):
    test = shutil.copytree(tiny_faces / "test", tmp_path / "test")
    images = sorted(path.name for path in test.iterdir())
    Image.new("RGB", (48, 48)).save(test / "animated.gif", save_all=True,
                                    append_images=[Image.new("RGB", (48, 48), "red")])
    (test / "notes.txt").write_text("not an image")
    os.symlink(test / "gone.jpg", test / "broken.jpg")
    (test / ".ipynb_checkpoints").mkdir()
    shutil.copy(test / images[0], test / ".ipynb_checkpoints" / "copy.jpg")
    shutil.copy(test / images[0], test / ".hidden.jpg")
    (test / "sub" / "deeper").mkdir(parents=True)
    with pytest.warns(UserWarning, match="leaving out 4 entries that are not images") as caught:
        found = TestImages(test, eval_transform())
    assert sorted(path.name for path in found.paths) == images  # the hidden ones are no rows
    assert sorted(path.name for path in found.ignored) == ["animated.gif", "broken.jpg", "deeper", "notes.txt"]
    assert "animated.gif" in str(caught[0].message)


def test_names_an_output_cannot_hold_are_refused_before_the_work(checkpoint, tiny_faces, tmp_path, monkeypatch):
    test = shutil.copytree(tiny_faces / "test", tmp_path / "test")
    first = sorted(test.iterdir())[0]
    shutil.copy(first, os.fsencode(test) + b"/raw\xff.jpg")  # a name of bytes that are not UTF-8
    ran = []
    monkeypatch.setattr(predict, "run_model", lambda *args, **kwargs: ran.append(1))
    with pytest.raises(DataError, match="not a valid UTF-8 name"):
        predict.submit(checkpoint, test, tmp_path / "submission.csv", num_workers=0)
    os.remove(os.fsencode(test) + b"/raw\xff.jpg")
    shutil.copy(first, test / "two\nlines.jpg")
    with pytest.raises(DataError, match="has a line break"):
        predict.embed(checkpoint, test, tmp_path / "emb.npy", num_workers=0)
    assert not ran and not (tmp_path / "submission.csv").exists() and not (tmp_path / "emb.npy").exists()


def test_labels_are_class_indices_unless_said_to_be_names(checkpoint, tmp_path):
    numbered = tmp_path / "numbered.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["class_names"] = ["1", "2", "3", "4"]  # identity folders that look like class indices
    torch.save(state, numbered)
    truth = tmp_path / "truth.csv"
    truth.write_text("id,label\na.jpg,2\nb.jpg,3\nc.jpg,4\n")
    perfect = tmp_path / "perfect.csv"
    perfect.write_text("id,label\na.jpg,1\nb.jpg,2\nc.jpg,3\n")  # indices, every one also a name
    assert predict.score_submission(perfect, truth, numbered)["accuracy"] == 1.0
    assert predict.score_submission(truth, truth, numbered, label_names=True)["accuracy"] == 1.0
    with pytest.raises(DataError, match="label '4' is not a class index"):
        predict.score_submission(truth, truth, numbered)


def test_stats_of_a_set_holding_a_one_pixel_image_stay_finite(tiny_faces, tmp_path):
    train = shutil.copytree(tiny_faces / "train", tmp_path / "train")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(next(train.iterdir()) / "dot.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean, std = compute_mean_std(train)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and min(std) > 0
    assert any("1 images of one pixel" in str(warning.message) for warning in caught)
