"""Two CPU processes under DDP (gloo) train the tiny set through run_training.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from predict import evaluate
from tests.conftest import FAST, TINY_SET
from training import epoch_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_trains_once_over_the_data(tiny_faces, tmp_path):
    out = tmp_path / "ddp"
    args = ["--data-dir", tiny_faces, "--out", out, "--epochs", "2", *FAST, "--devices", "2", "--strategy", "ddp"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_training.py"), *map(str, args)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 per device, 16 global" in result.stdout + result.stderr

    # one set of files, written by rank 0 alone
    assert sorted(p.name for p in out.iterdir()) == ["best.ckpt", "config.yaml", "curves.png", "last.ckpt", "metrics.csv"]
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1

    # every sample once per epoch: the distributed sampler shards the 32 train images over 2 ranks
    series = epoch_metrics(out / "metrics.csv")
    train_size = TINY_SET["identities"] * TINY_SET["train_per_identity"]
    assert [v for _, v in series["train_images"]] == [train_size, train_size]
    assert last["global_step"] == 2 * train_size // 16  # 2 epochs of 16-image global batches

    # validation is synced across ranks: each validates half of the dev images, and the accuracy
    # logged is that of all of them under the last epoch's weights
    whole = evaluate(out / "last.ckpt", Path(tiny_faces) / "dev", num_workers=0, device="cpu")
    assert whole["images"] == TINY_SET["identities"] * TINY_SET["dev_per_identity"]
    assert series["val_acc"][-1] == (1, pytest.approx(whole["top1"], abs=1e-6))

