"""The Lightning module and run_training.py: schedule, mixup, training, checkpoints, resume, CLI."""

import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import predict
import run_training
import training
from architecture import FaceNN, train_flops
from cli import UserError
from checkpoints import model_from_checkpoint, read_checkpoint
from training import FaceClassifier, epoch_metrics
from tests.conftest import FAST, TINY_SET

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "run_training.py"), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def assert_one_line_error(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_mixup_gives_soft_targets():
    torch.manual_seed(0)
    module = FaceClassifier(num_classes=5, architecture=dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1)))
    images, targets = module.mixup(torch.randn(8, 3, 32, 32), torch.arange(8) % 5)
    assert targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert (targets.max(dim=1).values < 1).all()  # two identities mixed in every row


def test_class_names_must_match_classes():
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        FaceClassifier(num_classes=4, class_names=["a", "b", "c"])


def test_training_lowers_the_loss_and_beats_chance(trained_run):
    series = epoch_metrics(trained_run / "metrics.csv")
    losses = [v for _, v in series["train_loss_epoch"]]
    assert len(losses) == 8
    assert min(losses[-2:]) < losses[0]
    assert max(v for _, v in series["val_acc"]) > 1 / TINY_SET["identities"]
    assert all(v > 0 for _, v in series["train_img_per_s"])
    lrs = dict(series["lr-AdamW"])  # logged at each epoch's start, counted for that epoch
    assert sorted(lrs) == list(range(8))
    assert lrs[0] == pytest.approx(3e-4) and lrs[1] == pytest.approx(3e-3)


def test_throughput_is_logged_per_epoch_with_the_flops_of_a_step(trained_run):
    series = epoch_metrics(trained_run / "metrics.csv")
    net = FaceNN(TINY_SET["identities"], widths=(8, 16, 24, 32), depths=(1, 1, 1, 1))
    size = TINY_SET["image_size"]
    flops_per_image = train_flops(net, torch.randn(2, 3, size, size), torch.zeros(2, dtype=torch.long)) / 2
    images, flop_rates = dict(series["train_img_per_s"]), dict(series["train_flop_per_s"])
    assert sorted(flop_rates) == sorted(images) == list(range(8))
    for epoch, rate in images.items():
        assert flop_rates[epoch] / rate == pytest.approx(flops_per_image, rel=1e-5)
    assert [v for _, v in series["train_images"]] == [TINY_SET["identities"] * TINY_SET["train_per_identity"]] * 8
    with open(trained_run / "metrics.csv", newline="") as f:  # Lightning's rolling figures, at logging steps
        rolling = [float(row["train/device/samples_per_sec"]) for row in csv.DictReader(f) if row["train/device/samples_per_sec"]]
    assert rolling and all(v > 0 for v in rolling)


def test_the_training_step_reads_nothing_back_from_its_device(monkeypatch):
    """On a GPU, each read of a tensor's value in Python waits for the device to finish the step.
    (Without mixup, which draws its mixing weight on the CPU: tests/test_gpu.py runs it on a GPU.)"""
    torch.manual_seed(0)
    module = FaceClassifier(num_classes=4, architecture=dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1)), mixup_alpha=0)
    batch = torch.randn(4, 3, 32, 32), torch.arange(4)
    module.training_step(batch, 0)  # the first step counts the FLOPs of a step, on the meta device

    def read(*_):
        raise AssertionError("the training step read a tensor's value on the host")
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    loss = module.training_step((batch[0] * float("nan"), batch[1]), 1)
    monkeypatch.undo()
    assert not torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0 \(epoch 0\): lower --lr"):
        module.raise_if_diverged()


def test_run_writes_checkpoints_log_and_curves(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"last.ckpt", "best.ckpt", "metrics.csv", "curves.png", "config.yaml"} <= names
    assert not any(name.endswith(".partial") for name in names)
    assert (trained_run / "curves.png").stat().st_size > 10_000


def test_checkpoint_alone_rebuilds_an_identical_model(trained_run, tiny_faces):
    checkpoint = torch.load(trained_run / "best.ckpt", map_location="cpu", weights_only=False)
    module = FaceClassifier.load_from_checkpoint(trained_run / "best.ckpt", map_location="cpu").eval()
    assert module.class_names == sorted(p.name for p in (tiny_faces / "train").iterdir())
    assert module.hparams.image_size is None and len(module.hparams.mean) == 3
    assert module.hparams.architecture["widths"] == (8, 16, 24, 32)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_full_mode_trains_on_train_and_dev(tiny_faces, tmp_path):
    out = tmp_path / "full"
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), "--epochs", "1", "--full", *FAST]) == 0
    checkpoint = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    images = TINY_SET["identities"] * (TINY_SET["train_per_identity"] + TINY_SET["dev_per_identity"])
    assert checkpoint["global_step"] == -(-images // 8)  # one step per batch of the union
    assert not (out / "best.ckpt").exists()
    assert "val_acc" not in epoch_metrics(out / "metrics.csv")


def test_recompute_gelu_is_for_the_run_it_is_given_to(tiny_faces, tmp_path):
    from data import FaceDataModule
    from residual_blocks import ConvNeXtBlock

    def recomputing(argv, resume_from=None) -> list[bool]:
        args = run_training.parse_args(["--data-dir", str(tiny_faces), *FAST, *argv])
        data = FaceDataModule(tiny_faces, batch_size=8, num_workers=0)
        data.setup("fit")
        resumed = model_from_checkpoint(resume_from, read_checkpoint(resume_from)) if resume_from else None
        model = run_training.build_model(args, data, resumed)
        return [block.recompute_gelu for block in model.modules() if isinstance(block, ConvNeXtBlock)]

    out = tmp_path / "recompute"
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), "--epochs", "1", "--recompute-gelu", *FAST]) == 0
    assert recomputing([], out / "last.ckpt") == [False] * 4  # not part of the checkpoint
    assert recomputing(["--recompute-gelu"], out / "last.ckpt") == [True] * 4  # turned on when resuming
    assert recomputing(["--recompute-gelu"]) == [True] * 4
    with pytest.raises(UserError, match="the convnext backbone has no FaceNN ConvNeXt blocks"):
        recomputing(["--recompute-gelu", "--backbone", "convnext"])


def test_the_blocks_norm_options_reach_the_network_and_its_checkpoint(tiny_faces, tmp_path):
    """--norm, --norm-position and --layer-scale: the original's block options, from the command line
    to the checkpoint, which predict rebuilds and a resume keeps."""
    from torchvision.models.convnext import LayerNorm2d

    from residual_blocks import ConvNeXtBlock

    out, options = tmp_path / "layer", ["--norm", "layer", "--norm-position", "before_dwconv", "--layer-scale", "0.5"]
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), "--epochs", "2", *FAST, *options]) == 0
    model = model_from_checkpoint(out / "last.ckpt", read_checkpoint(out / "last.ckpt"))
    blocks = [module for module in model.modules() if isinstance(module, ConvNeXtBlock)]
    assert len(blocks) == 4 and all(isinstance(block.norm, LayerNorm2d) for block in blocks)
    assert all(block.norm_position == "before_dwconv" and block.layer_scale is not None for block in blocks)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for block in blocks for module in block.modules())
    assert predict.main(["submit", "--checkpoint", str(out / "last.ckpt"), "--test-dir", str(tiny_faces / "test"),
                         "--out", str(tmp_path / "submission.csv"), "--num-workers", "0"]) == 0


def test_a_compiled_run_writes_a_plain_checkpoint(tiny_faces, tmp_path, monkeypatch):
    """--compile compiles the network in place: the checkpoint loads into an uncompiled model.
    Dynamo and AOTAutograd run as in a real compile; inductor's code generation, a minute of C++
    compiling on a fresh CPU machine, is left out (backend "aot_eager")."""
    from predict import load_model

    compiled, compile_module = [], torch.nn.Module.compile

    def compile_on_aot_eager(module):
        compiled.append(type(module).__name__)
        compile_module(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_on_aot_eager)
    out = tmp_path / "compiled"
    flags = [*FAST, "--batch-size", "4", "--full", "--epochs", "1", "--compile"]
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), *flags]) == 0
    assert compiled == ["FaceNN"]
    model = load_model(out / "last.ckpt", "cpu")
    assert not any("_orig_mod" in key for key in model.state_dict())
    assert torch.isfinite(model(torch.randn(2, 3, 48, 48))).all()


def test_sigkill_mid_run_then_resume_finishes_the_planned_epochs(tiny_faces, tmp_path):
    out = tmp_path / "killed"
    args = ["--data-dir", tiny_faces, "--out", out, "--epochs", "4", *FAST, "--batch-size", "4"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run_training.py"), *map(str, args)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while not (out / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    epoch_at_kill = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert epoch_at_kill < 3  # epochs count from 0: killed before the last one
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 3
    assert FaceClassifier.load_from_checkpoint(out / "best.ckpt", map_location="cpu").hparams.max_epochs == 4
    with open(out / "metrics.csv", newline="") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val_acc")}
    assert len(epochs) == 4


def test_the_script_reports_a_user_error_in_one_line():
    """The real entry point (tests/test_commands.py holds the table of errors, in process)."""
    assert "python run_training.py --demo" in assert_one_line_error(run_cli("--data-dir", "/nonexistent/faces"))


def test_wandb_missing_is_one_line_that_says_what_to_do(tiny_faces, tmp_path, monkeypatch, capsys):
    """The GPU machine has no wandb: the default --wandb offline there is one line, before any work."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else find_spec(name, *rest))
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: run_training.main(["--data-dir", str(tiny_faces), "--out", str(tmp_path / "run")]))
    assert stop.value.code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err == ("error: --wandb offline needs the wandb package (pip install wandb, as "
                                       "requirements.txt pins it), or pass --wandb off\n")


PAGE_FAULTS_OF_A_STEP = """
import resource, sys, torch, torch.nn.functional as F
import cli
from architecture import FaceNN
if sys.argv[1] == "keep":
    assert cli.keep_freed_memory()
torch.manual_seed(0)
model = FaceNN(num_classes=10, depths=(1, 1, 1, 1)).to(memory_format=torch.channels_last)
images, labels = torch.randn(8, 3, 224, 224), torch.randint(10, (8,))
for step in range(6):  # count the last three: the first ones grow the heap
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(model(images), labels).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_kept_cpu_memory_spares_the_page_faults_of_each_step():
    """At batch 8, 224 px, the first inverted bottleneck's activations are 48 MB: over glibc's mmap
    limit, so by default they come from the kernel as fresh pages at every step."""
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_STEP, mode], cwd=ROOT, check=True,
                                 capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
        for mode in ("default", "keep")
    }
    assert faults["default"] > 30_000  # 4 KB each: hundreds of MB zero-filled per step
    assert faults["keep"] < faults["default"] / 5, faults


@pytest.mark.parametrize("backbone", ["facenn", "convnext"])
def test_both_backbones_embed_to_unit_rows(backbone):
    model = FaceClassifier(3, architecture=dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1)), backbone=backbone).eval()
    with torch.no_grad():
        embeddings = model.embed(torch.randn(2, 3, 64, 64))
    assert embeddings.shape == (2, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_margin_heads_put_the_margin_on_the_true_class_only():
    head = training.MarginHead(2, 3, "arcface", margin=0.5, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]))  # normalised: only directions count
    angle = torch.tensor([0.3, 3.0])  # the second: theta + m past pi, where cos would turn back up
    features = torch.stack([angle.cos(), angle.sin()], dim=1) * 5
    cosines = torch.stack([angle.cos(), angle.sin(), -angle.cos()], dim=1)
    torch.testing.assert_close(head(features), 10 * cosines)  # no labels: plain cosine logits
    labels = torch.tensor([0, 0])
    expected = 10 * cosines.clone()
    expected[0, 0] = 10 * math.cos(0.3 + 0.5)
    expected[1, 0] = 10 * (math.cos(3.0) - 0.5 * math.sin(math.pi - 0.5))  # falls on linearly instead
    torch.testing.assert_close(head(features, labels), expected)
    head.loss = "cosface"
    expected[:, 0] = 10 * (angle.cos() - 0.5)
    torch.testing.assert_close(head(features, labels), expected)


def test_a_margin_loss_replaces_the_head_and_refuses_mixup():
    small = dict(architecture=dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1)), mixup_alpha=0.0)
    model = FaceClassifier(5, loss="cosface", **small)
    assert model.hparams.margin == 0.35 and model.margin_head.weight.shape == (5, 32)
    assert not any(name.startswith("model.head.classifier") for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="mixup"):
        FaceClassifier(5, loss="arcface", **{**small, "mixup_alpha": 1.0})


def test_arcface_fine_tunes_a_cross_entropy_checkpoint(trained_run, tiny_faces, tmp_path):
    ce = predict.load_model(trained_run / "best.ckpt", "cpu")
    fresh = FaceClassifier(TINY_SET["identities"], class_names=ce.class_names, loss="arcface", mixup_alpha=0.0,
                           architecture=dict(ce.hparams.architecture))
    head = fresh.margin_head.weight.detach().clone()
    fresh.init_from(ce)
    torch.testing.assert_close(fresh.model.stem.state_dict(), ce.model.stem.state_dict())
    torch.testing.assert_close(fresh.margin_head.weight, head)  # the ce head has nothing to give it
    out = tmp_path / "arcface"
    flags = ["--data-dir", tiny_faces, "--out", out, "--epochs", "2", *FAST, "--warmup-epochs", "1", "--loss", "arcface", "--scale", "16",
             "--init-from", trained_run / "best.ckpt"]
    assert run_training.main(list(map(str, flags))) == 0
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert {k: hparams[k] for k in ("loss", "margin", "scale")} == dict(loss="arcface", margin=0.5, scale=16)
    assert hparams["label_smoothing"] == hparams["mixup_alpha"] == 0  # a margin loss's defaults: the paper's
    series = epoch_metrics(out / "metrics.csv")
    assert dict(series["lr-AdamW"]) == {0: pytest.approx(3e-4), 1: pytest.approx(1e-3)}  # a new schedule from epoch 0
    result = predict.evaluate(out / "last.ckpt", tiny_faces / "dev", num_workers=0)
    assert result["top1"] == pytest.approx(dict(series["val_acc"])[1], abs=1e-6)  # the margin head's plain cosines
    found = predict.identify(out / "last.ckpt", tiny_faces / "train", tiny_faces / "test", tmp_path / "ids.csv",
                             threshold=-1.0, num_workers=0)
    assert found["rows"] == 8 and found["said_unknown"] == 0

