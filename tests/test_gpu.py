"""On a CUDA GPU (marked `cuda`; skipped without one; `make gpu-check` runs them): 16-mixed training
with its gradient scaler, GPU checkpoints on the CPU, predict.py on both devices, augmentation on
the device, and a training step that never waits on the host."""

import csv
import math

import lightning as L
import numpy as np
import pytest
import torch

import predict
import run_training
from callbacks import ThroughputMonitor
from checkpoints import load_model
from data import BatchAugment, FaceDataModule, TestImages, decode_batch, load_image, read_encoded
from tests.conftest import TINY_SET
from tests.test_gpu_path import write_kinds
from training import FaceClassifier, epoch_metrics

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY_NET = ["--widths", "8,16,24,32", "--depths", "1,1,1,1"]
FP16 = dict(rtol=1e-2, atol=2e-2)  # logits of fp16 autocast against fp32


@pytest.fixture(scope="module")
def gpu_run(tiny_faces, tmp_path_factory):
    """Eight epochs of the tiny network on the GPU in 16-mixed (run_training.py's default there)."""
    out = tmp_path_factory.mktemp("gpu_run")
    code = run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), "--epochs", "8", "--lr", "3e-3",
                              "--batch-size", "4", "--warmup-epochs", "1", "--mixup-alpha", "0", "--wandb", "off",
                              "--num-workers", "2", "--accelerator", "cuda", "--devices", "1", *TINY_NET])
    assert code == 0
    return out


def test_a_16_mixed_run_lowers_its_loss_with_the_gradient_scaler_stepping(gpu_run):
    series = epoch_metrics(gpu_run / "metrics.csv")
    losses = [v for _, v in series["train_loss_epoch"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert min(losses[-2:]) < losses[0]
    assert all(v > 0 for _, v in series["train_flop_per_s"])
    # what tools/gpu_check.py reports: the data workers, and the peak memory so far, which never falls
    assert [v for _, v in series["data_workers"]] == [2] * 8
    peaks = [v for _, v in series["peak_gpu_memory"]]
    assert len(peaks) == 8 and 0 < peaks[0] and peaks == sorted(peaks)
    last = torch.load(gpu_run / "last.ckpt", map_location="cpu", weights_only=False)
    scaler = last["MixedPrecision"]  # Lightning keeps the GradScaler's state under its precision plugin
    # it starts at scale 2**16 with no growth counted: each step since the last overflow counts one
    assert math.isfinite(scaler["scale"]) and (scaler["scale"], scaler["_growth_tracker"]) != (2.0**16, 0)
    assert scaler["_growth_tracker"] <= last["global_step"]


def test_a_checkpoint_written_on_the_gpu_predicts_the_same_on_the_cpu(gpu_run, tiny_faces):
    images = torch.stack([image for image, _ in TestImages(tiny_faces / "test", predict.model_transform(
        load_model(gpu_run / "best.ckpt", "cpu")))])
    on_cpu, on_gpu = load_model(gpu_run / "best.ckpt", "cpu"), load_model(gpu_run / "best.ckpt", "cuda")
    with torch.inference_mode():
        expected = on_cpu(images)
        with torch.autocast("cuda", torch.float16):
            got = on_gpu(images.cuda()).float().cpu()
    torch.testing.assert_close(got, expected, **FP16)


def margins(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def test_predict_submit_and_embed_on_cuda_agree_with_the_cpu(gpu_run, tiny_faces, tmp_path):
    checkpoint, test_dir = gpu_run / "best.ckpt", tiny_faces / "test"
    for device in ("cpu", "cuda"):
        common = ["--checkpoint", str(checkpoint), "--device", device, "--num-workers", "0"]
        assert predict.main(["submit", *common, "--test-dir", str(test_dir), "--out", str(tmp_path / f"{device}.csv")]) == 0
        assert predict.main(["embed", *common, "--images", str(test_dir), "--out", str(tmp_path / f"{device}.npy")]) == 0
    rows = {device: list(csv.reader(open(tmp_path / f"{device}.csv"))) for device in ("cpu", "cuda")}
    assert [row[0] for row in rows["cpu"]] == [row[0] for row in rows["cuda"]]
    model = load_model(checkpoint, "cpu")
    logits, _, _ = predict.run_model(model, TestImages(test_dir, predict.model_transform(model)), num_workers=0)
    clear = (margins(logits) > 0.1).tolist()  # fp16 may swap the top two of a near tie
    assert [a for a, ok in zip(rows["cpu"][1:], clear) if ok] == [b for b, ok in zip(rows["cuda"][1:], clear) if ok]
    np.testing.assert_allclose(np.load(tmp_path / "cuda.npy"), np.load(tmp_path / "cpu.npy"), atol=1e-2)


def test_every_pass_of_a_command_runs_on_the_gpu(gpu_run, tiny_faces, tmp_path, monkeypatch):
    """Trainer.predict ends by moving the model to the CPU: identify's second pass, and what submit
    reports, must still be the GPU's."""
    devices, step = [], FaceClassifier.predict_step
    monkeypatch.setattr(FaceClassifier, "predict_step",
                        lambda self, batch, index: devices.append(self.device.type) or step(self, batch, index))
    checkpoint, loading = gpu_run / "best.ckpt", dict(num_workers=0, device="cuda")
    assert predict.submit(checkpoint, tiny_faces / "test", tmp_path / "s.csv", **loading)["device"].startswith("cuda")
    predict.identify(checkpoint, tiny_faces / "train", tiny_faces / "test", tmp_path / "i.csv", threshold=0.5, **loading)
    assert devices and set(devices) == {"cuda"}


def test_augmenting_on_the_gpu_equals_the_cpu_for_the_same_parameters():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    augment = BatchAugment()
    params = augment.sample(len(images))
    on_cpu = augment(images, params)
    on_gpu = augment.to("cuda")(images.cuda(), params).cpu()
    differ = (on_gpu - on_cpu).abs() > 1e-3
    # nearest-neighbour rotation may pick the other pixel where a sample lands on a pixel border
    assert differ.float().mean() < 1e-3
    plain = (images.float() / 255 - augment.mean.cpu()) / augment.std.cpu()
    assert ((on_cpu - plain).abs().flatten(1).mean(1) > 0.05).all()  # every image was augmented


def test_every_image_kind_decodes_on_the_gpu_as_on_the_cpu(tmp_path):
    """nvjpeg may refuse a JPEG that libjpeg decodes (or decode it otherwise): a GPU run must train on
    every image the CPU run trains on, and skip only what the CPU skips."""
    kinds = write_kinds(tmp_path)
    paths = list(kinds.values())
    skipped = set()
    with pytest.warns(UserWarning, match="skipping unreadable image .*kind_corrupt.jpg"):
        decoded, kept = decode_batch([read_encoded(path) for path in paths], list(map(str, paths)), torch.device("cuda"),
                                     None, skipped)
    assert [paths[i] for i in kept] == [path for kind, path in kinds.items() if kind != "corrupt"]
    assert skipped == {str(kinds["corrupt"])} and decoded.device.type == "cuda"
    for image, i in zip(decoded.cpu(), kept):
        difference = (image.int() - load_image(paths[i]).int()).abs().float()
        # nvjpeg's IDCT and chroma upsampling are not libjpeg's: a level or two apart, never another image
        assert difference.mean() < 2 and difference.quantile(0.99) <= 12, (paths[i].name, difference.mean())


def test_augmenting_on_the_gpu_never_waits_on_the_host():
    augment, images = BatchAugment().cuda(), torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device="cuda")
    augment(images)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class FailOnHostSync(L.Callback):
    """From step `after` on, any operation that makes the host wait for the GPU raises, between the
    start and the end of each training batch: the step, backward, GradScaler and optimizer."""

    def __init__(self, after: int):
        self.after, self.checked = after, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.after:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode("default")
            self.checked += 1


def test_a_16_mixed_training_step_never_waits_on_the_host(tiny_faces):
    torch.manual_seed(0)
    data = FaceDataModule(tiny_faces, batch_size=8, num_workers=2, augment_on_device=True)
    data.setup("fit")
    model = FaceClassifier(num_classes=data.num_classes, class_names=data.class_names,  # with mixup, as by default
                           architecture=dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1)), max_epochs=3)
    check = FailOnHostSync(after=3)  # the first steps count FLOPs and let cuDNN pick its kernels
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="16-mixed", max_epochs=3, benchmark=True,
                        callbacks=[check, ThroughputMonitor()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, log_every_n_steps=1000)
    try:
        trainer.fit(model, datamodule=data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    train_size = TINY_SET["identities"] * TINY_SET["train_per_identity"]
    assert check.checked == 3 * train_size // 8 - 3
