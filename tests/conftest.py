"""Shared fixtures: a tiny synthetic face set and a tiny network trained on it, made once per
test session."""

import os
from pathlib import Path

# Tiny networks gain nothing from intra-op threads, and the tests run subprocesses and data
# workers beside each other: one thread each keeps 2 cores from thrashing (set before torch
# starts; subprocesses and notebook kernels inherit it).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import run_training  # noqa: E402
from synthetic_faces import generate  # noqa: E402

torch.set_num_threads(1)

# LFW's real photographs (shared/realfaces/README.md), beside the repository and read-only: tests that
# need them skip, saying so, where they are absent; nothing of them is in the repository.
REAL_LFW = Path(__file__).resolve().parents[2] / "shared" / "realfaces" / "lfw"

TINY_SET = dict(identities=4, train_per_identity=8, dev_per_identity=3, test_per_identity=2, image_size=48, seed=0)
# run_training.py flags for a fast CPU run of a tiny network (the warm-up is the default, round(epochs / 6))
FAST = [
    "--wandb", "off", "--num-workers", "0", "--batch-size", "8", "--accelerator", "cpu",
    "--mixup-alpha", "0", "--widths", "8,16,24,32", "--depths", "1,1,1,1",
]


@pytest.fixture(scope="session")
def tiny_faces(tmp_path_factory):
    """4 identities x (8 train, 3 dev, 2 test) faces at 48 px, with test_labels.csv."""
    root = tmp_path_factory.mktemp("faces") / "data"
    generate(root, **TINY_SET, workers=1)
    return root


@pytest.fixture(scope="session")
def trained_run(tiny_faces, tmp_path_factory):
    """Eight epochs of the tiny network on the tiny set, through the real command: its --out dir
    (last.ckpt, best.ckpt, metrics.csv, curves.png)."""
    out = tmp_path_factory.mktemp("run")
    code = run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), "--epochs", "8", "--lr", "3e-3", *FAST, "--batch-size", "4"])
    assert code == 0
    return out
