"""The synthetic face set: layout, determinism, reuse, label noise, and that identity lives in the
face geometry rather than in the pixels a linear model can read."""

import csv
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic_faces as sf
from cli import UserError

SMALL = dict(identities=4, train_per_identity=5, dev_per_identity=2, test_per_identity=3, image_size=32,
             verification_identities=3, pairs=8, unknown_per_identity=2, workers=1)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def file_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("faces") / "set"
    return out, sf.generate(out, **SMALL)


def test_layout_and_counts(small):
    out, counts = small
    assert counts == dict(train=20, dev=8, test=12, known=9, unknown_dev=8, unknown_test=8, pairs=8, mislabelled=0)
    names = [sf.identity_name(i) for i in range(4)]
    assert names == ["n000001", "n000002", "n000003", "n000004"]
    for split, per in [("train", 5), ("dev", 2)]:
        assert sorted(p.name for p in (out / split).iterdir()) == names
        assert all(len(list((out / split / name).glob("*.jpg"))) == per for name in names)
    test = sorted(p.name for p in (out / "test").iterdir())
    assert len(test) == 12 and all(re.fullmatch(r"\d{6}\.jpg", name) for name in test)
    labels = read_csv(out / "test_labels.csv")
    assert [row["id"] for row in labels] == test
    assert sorted(row["label"] for row in labels) == sorted(names * 3)
    assert read_csv(out / "mislabelled.csv") == []
    for path in [*(out / "train").glob("*/*.jpg"), *(out / "test").glob("*.jpg")][:6]:
        image = Image.open(path)
        assert image.size == (32, 32) and image.mode == "RGB"


def who_is_in(out):
    """Image path under verification/ -> identity number, from the plan the files were written from."""
    jobs, _ = sf.plan(out, seed=0, mislabel_rate=0.0, **{k: v for k, v in SMALL.items() if k != "workers"})
    return {str(Path(job[0]).relative_to(out / "verification")): job[3]
            for job in jobs if job[0].count("verification/")}


def test_verification_has_the_kaggle_layout_with_unseen_and_absent_identities(small):
    out, _ = small
    root, who = out / "verification", who_is_in(out)
    known = sorted(p.name for p in (root / "known").iterdir())
    assert known == [sf.identity_name(i) for i in range(4, 7)]  # numbered after the 4 train identities
    assert all(len(list((root / "known" / name).glob("*.jpg"))) == 3 for name in known)  # test_per_identity
    for split in ("dev", "test"):
        rows = read_csv(root / f"verification_{split}.csv")
        assert [row["id"] for row in rows] == sorted(p.name for p in (root / f"unknown_{split}").iterdir())
        # 3 known identities and 1 absent one (about 1 in 9), 2 images each
        truth = [sf.identity_name(who[f"unknown_{split}/{row['id']}"]) for row in rows]
        assert sorted(truth) == sorted(sf.identity_name(i) for i in range(4, 8) for _ in range(2))
        assert [row["label"] for row in rows] == [name if name in known else "n000000" for name in truth]
    assert sf.absent_identities(960) == 120 and sf.absent_identities(3) == 1 and sf.absent_identities(0) == 0


def test_verification_pairs_are_balanced_and_of_known_images(small):
    out, _ = small
    pairs = read_csv(out / "verification/verification_pairs.csv")
    assert len(pairs) == 8 and sum(int(row["same"]) for row in pairs) == 4
    who = {Path(path).name: identity for path, identity in who_is_in(out).items() if path.startswith("known/")}
    assert {name for row in pairs for name in (row["img1"], row["img2"])} <= set(who)
    assert all((who[row["img1"]] == who[row["img2"]]) == (row["same"] == "1") for row in pairs)
    assert all(row["img1"] != row["img2"] for row in pairs)


def test_same_seed_gives_same_bytes_whatever_the_workers(small, tmp_path):
    out, _ = small
    sf.generate(tmp_path / "again", **{**SMALL, "workers": 2})
    assert file_bytes(tmp_path / "again") == file_bytes(out)
    sf.generate(tmp_path / "other", **{**SMALL, "seed": 1})
    other = file_bytes(tmp_path / "other")
    assert other.keys() - {".synthetic_faces.json"} and other != file_bytes(out)
    assert (tmp_path / "other/test/000000.jpg").read_bytes() != (out / "test/000000.jpg").read_bytes()


def test_reuses_an_identical_set_and_refuses_anything_else(small, tmp_path, monkeypatch):
    out, counts = small
    monkeypatch.setattr(sf, "plan", lambda *args, **kwargs: pytest.fail("drew the set again"))
    assert sf.generate(out, **SMALL) == counts
    monkeypatch.undo()
    with pytest.raises(UserError, match="other arguments"):
        sf.generate(out, **{**SMALL, "seed": 7})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        sf.generate(mine, **SMALL)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert sf.generate(tmp_path / "empty", **SMALL) == counts  # an empty directory is fine
    assert not list(tmp_path.glob(".*partial*"))


def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(sf, "write_image", fail)
    with pytest.raises(KeyboardInterrupt):
        sf.generate(tmp_path / "set", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_mislabel_rate_moves_that_fraction_of_train_images(tmp_path):
    out = tmp_path / "noisy"
    counts = sf.generate(out, identities=5, train_per_identity=20, dev_per_identity=0, test_per_identity=0,
                         image_size=32, mislabel_rate=0.2, workers=1)
    rows = read_csv(out / "mislabelled.csv")
    assert counts["mislabelled"] == len(rows) == 20
    assert len(list((out / "train").glob("*/*.jpg"))) == 100
    for row in rows:
        path = out / row["path"]
        assert path.is_file() and path.parent.name != row["label"]


def test_identities_differ_more_than_draws_of_one_identity():
    def mean_face(identity, draws):  # the centre of the mean image, where the face is
        traits = sf.identity_traits(0, identity)
        images = [sf.render(traits, np.random.default_rng([0, 1, identity, k]), 32) for k in draws]
        return np.mean([np.asarray(image, np.float32)[8:-8, 8:-8] for image in images], 0)

    for a, b in [(0, 1), (2, 3), (4, 5)]:
        first, second, other = mean_face(a, range(40)), mean_face(a, range(40, 80)), mean_face(b, range(40))
        assert np.abs(first - other).mean() > 1.3 * np.abs(first - second).mean()


def test_the_drawing_is_the_one_of_this_format_version():
    """docs/demo.md's figures come from these exact pixels: a change to the drawing must bump
    FORMAT_VERSION (and this hash), so that an old set on disk is not taken for a new one."""
    digest = hashlib.sha256()
    for identity in range(100):
        rng = np.random.default_rng([0, 1, identity, 0])
        digest.update(np.asarray(sf.render(sf.identity_traits(0, identity), rng, 32)).tobytes())
    assert (sf.FORMAT_VERSION, digest.hexdigest()) == (
        2, "e8324c6fb3d204c828d9b8a8cdfd7dabd9e995181bb1694e2b9d5026f137484e")


def linear_probe_accuracy(data_dir, image_size=32, weight_decay=1e-3, steps=300):
    """Dev accuracy of multinomial logistic regression on standardised raw pixels, fit by L-BFGS.
    A good data set keeps this far below what a CNN reaches."""

    def load(split):
        paths = sorted(Path(data_dir, split).glob("*/*.jpg"))
        pixels = [np.asarray(Image.open(p).convert("RGB").resize((image_size, image_size), Image.BILINEAR))
                  for p in paths]
        return torch.tensor(np.stack(pixels), dtype=torch.float32).flatten(1), [p.parent.name for p in paths]

    x_train, train_names = load("train")
    x_dev, dev_names = load("dev")
    classes = {name: i for i, name in enumerate(sorted(set(train_names)))}
    y_train, y_dev = (torch.tensor([classes[n] for n in names]) for names in (train_names, dev_names))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_dev = (x_train - mean) / std, (x_dev - mean) / std
    # the optimal weights lie in the span of the training images: fitting in an orthonormal basis
    # of that span is exact, and much cheaper when pixels outnumber images
    eigenvalues, vectors = torch.linalg.eigh(x_train @ x_train.T)
    keep = eigenvalues > 1e-6 * eigenvalues.max()
    basis = x_train.T @ (vectors[:, keep] / eigenvalues[keep].sqrt())
    x_train, x_dev = x_train @ basis, x_dev @ basis
    model = torch.nn.Linear(x_train.shape[1], len(classes))
    optimiser = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(model(x_train), y_train) + weight_decay * model.weight.square().sum()
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        return (model(x_dev).argmax(1) == y_dev).float().mean().item()


def test_a_linear_model_on_pixels_stays_far_from_the_identities(tmp_path):
    out = tmp_path / "probe"
    sf.generate(out, identities=20, train_per_identity=15, dev_per_identity=10, test_per_identity=0,
                image_size=32, workers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: more threads only stall on a busy machine
    try:
        accuracy = linear_probe_accuracy(out, image_size=32)
    finally:
        torch.set_num_threads(threads)
    assert 1 / 20 < accuracy <= 0.4  # above chance, far below what a CNN reaches


def test_many_processes_generating_at_once_write_one_set(tmp_path):
    """Every rank of a multi-process launch may call generate: one set lands, none fails."""
    code = (
        "import sys; from synthetic_faces import generate; "
        "print(generate(sys.argv[1], identities=3, train_per_identity=2, dev_per_identity=1, "
        "test_per_identity=2, image_size=32, workers=1))"
    )
    repo = Path(__file__).resolve().parents[1]
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "set")], cwd=repo, stdout=subprocess.PIPE,
                         text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert len(set(outputs)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no partial folders left
