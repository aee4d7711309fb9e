"""data.py on tiny image folders: label mapping, subsets, full mode, transforms, test images,
bad input (each a one-line DataError or a counted skip), mean/std and the `stats` command."""

import ast
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from cli import one_line
from data import (
    KAGGLE_MEAN,
    KAGGLE_STD,
    BatchAugment,
    DataError,
    FaceDataModule,
    TestImages,
    compute_mean_std,
    eval_transform,
    load_rgb,
    main,
    train_transform,
)

REPO = Path(__file__).resolve().parent.parent
IDENTITIES = ["n000001", "n000002", "n000003", "n000004"]


def write_image(path: Path, colour=(200, 40, 90), size=(40, 40), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, fmt)
    return path


def make_split(split_dir: Path, counts: dict[str, int], size=(40, 40)):
    """counts[identity] images per identity folder, each identity its own colour."""
    for identity, count in counts.items():
        (split_dir / identity).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            colour = (40 * int(identity[-1]), 10 * index, 120)
            write_image(split_dir / identity / f"{identity}_{index:03d}.jpg", colour, size)


@pytest.fixture
def data_dir(tmp_path):
    """4 train identities x 3 images; dev lacks n000001 and n000003; 3 flat test images."""
    make_split(tmp_path / "train", {name: 3 for name in IDENTITIES})
    make_split(tmp_path / "dev", {"n000002": 2, "n000004": 2})
    for name in ["002.jpg", "000.jpg", "001.jpg"]:
        write_image(tmp_path / "test" / name)
    return tmp_path


def datamodule(data_dir, batch_size=4, **kwargs) -> FaceDataModule:
    module = FaceDataModule(data_dir, batch_size=batch_size, num_workers=0, **kwargs)
    module.setup("fit")
    return module


def labels(dataset) -> list[tuple[str, int]]:
    """(identity folder, label) of every sample."""
    return [(Path(path).parent.name, target) for path, target in dataset.samples]


# --- label mapping, subset, full mode ------------------------------------------------------


def test_dev_labels_are_train_indices_even_when_dev_lacks_identities(data_dir):
    module = datamodule(data_dir)
    assert module.class_names == IDENTITIES and module.num_classes == 4
    assert labels(module.val_dataset) == [("n000002", 1)] * 2 + [("n000004", 3)] * 2
    assert {label for _, label in labels(module.train_dataset)} == {0, 1, 2, 3}
    image, label = module.val_dataset[2]
    assert label == IDENTITIES.index("n000004") and image.shape == (3, 40, 40)


def test_dev_identity_absent_from_train_is_an_error(data_dir):
    make_split(data_dir / "dev", {"n000009": 1})
    with pytest.raises(DataError, match="n000009: identity not in"):
        datamodule(data_dir)


def test_subset_keeps_first_identities_with_all_their_images(data_dir):
    module = datamodule(data_dir, subset_classes=2)
    assert module.class_names == IDENTITIES[:2] and module.num_classes == 2
    assert labels(module.train_dataset) == [("n000001", 0)] * 3 + [("n000002", 1)] * 3
    assert labels(module.val_dataset) == [("n000002", 1)] * 2
    with pytest.raises(DataError, match="expected subset_classes from 1 to 4, not 5"):
        datamodule(data_dir, subset_classes=5)


def test_full_mode_trains_on_train_and_dev_without_validation(data_dir):
    module = datamodule(data_dir, full=True)
    _, dev = module.train_dataset.datasets
    assert len(module.train_dataset) == 12 + 4
    assert labels(dev) == [("n000002", 1)] * 2 + [("n000004", 3)] * 2
    assert module.train_dataset[13][1] == 1
    assert module.val_dataset is None and module.val_dataloader() == []


class Probe(L.LightningModule):
    """A linear classifier that records which steps Lightning ran."""

    def __init__(self, num_classes):
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.steps = {"train": 0, "val": 0}

    def training_step(self, batch, _):
        self.steps["train"] += 1
        images, targets = batch
        return torch.nn.functional.cross_entropy(self.head(images.mean((2, 3))), targets)

    def validation_step(self, batch, _):
        self.steps["val"] += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("full, val_steps", [(False, 1), (True, 0)])
def test_lightning_fits_with_and_without_validation(data_dir, full, val_steps):
    module = FaceDataModule(data_dir, batch_size=16, num_workers=0, full=full)
    probe = Probe(num_classes=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=module)
    assert probe.steps == {"train": 1, "val": val_steps}


def test_full_mode_without_dev_trains_on_train_alone(data_dir):
    shutil.rmtree(data_dir / "dev")
    assert len(datamodule(data_dir, full=True).train_dataset) == 12
    with pytest.raises(DataError, match="dev: directory not found"):
        datamodule(data_dir)


# --- transforms and loading ------------------------------------------------------------


def test_eval_transform_normalises_to_float32_chw():
    image = Image.new("RGB", (40, 30), (255, 0, 51))
    tensor = eval_transform()(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 30, 40)
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(KAGGLE_MEAN)) / torch.tensor(KAGGLE_STD)
    torch.testing.assert_close(tensor[:, 0, 0], expected)
    assert eval_transform(image_size=32)(image).shape == (3, 32, 32)
    assert train_transform(image_size=24)(image).shape == (3, 24, 24)


def test_train_transform_is_random_and_eval_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    assert not torch.equal(train_transform()(image), train_transform()(image))
    assert torch.equal(eval_transform()(image), eval_transform()(image))


@pytest.mark.parametrize("mode, colour, fmt, suffix", [
    ("L", 128, None, ".jpg"),
    ("RGBA", (10, 20, 30, 0), None, ".png"),
    ("P", 7, None, ".png"),
    ("CMYK", (0, 255, 255, 0), "JPEG", ".jpg"),
])
def test_any_image_mode_loads_as_rgb(tmp_path, mode, colour, fmt, suffix):
    path = write_image(tmp_path / f"image{suffix}", colour, mode=mode, fmt=fmt)
    assert Image.open(path).mode == mode
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert eval_transform()(image).shape == (3, 40, 40)


def test_non_image_files_are_ignored(data_dir):
    (data_dir / "train" / "n000001" / "notes.txt").write_text("not a face")
    (data_dir / "train" / "n000001" / ".DS_Store").write_bytes(b"\0\1")
    (data_dir / "train" / ".ipynb_checkpoints").mkdir()
    (data_dir / "test" / "labels.csv").write_text("id,label\n")
    module = datamodule(data_dir)
    assert len(module.train_dataset) == 12 and module.num_classes == 4
    assert len(module.test_dataset) == 3


def write_bad_images(folder: Path) -> list[Path]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated = folder / "truncated.jpg"
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])  # the header and part of the pixel data
    zero = folder / "zero.jpg"
    zero.write_bytes(b"")
    text = folder / "text.jpg"
    text.write_text("this is not a jpeg")
    return [truncated, zero, text]


def test_truncated_image_fails_to_load_rather_than_loading_grey(tmp_path):
    truncated, _, _ = write_bad_images(tmp_path)
    with pytest.raises(OSError, match="image file is truncated"):
        load_rgb(truncated)


def test_unreadable_train_images_are_skipped_counted_and_epoch_completes(data_dir):
    bad = write_bad_images(data_dir / "train" / "n000002")
    module = datamodule(data_dir, batch_size=5)
    assert len(module.train_dataset) == 15
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned:
        batches = list(module.train_dataloader())
    assert sum(len(targets) for _, targets in batches) == 15
    assert module.train_dataset.skipped == {str(path) for path in bad}
    assert len(warned) == 3


def test_unreadable_train_images_do_not_stop_an_epoch_in_worker_processes(data_dir):
    write_bad_images(data_dir / "train" / "n000002")
    module = FaceDataModule(data_dir, batch_size=5, num_workers=2)
    module.setup("fit")
    assert sum(len(targets) for _, targets in module.train_dataloader()) == 15


def test_mixed_image_sizes_resize_with_image_size(data_dir):
    write_image(data_dir / "train" / "n000003" / "wide.jpg", size=(50, 30))
    images, targets = next(iter(datamodule(data_dir, batch_size=13, image_size=32).train_dataloader()))
    assert images.shape == (13, 3, 32, 32) and targets.shape == (13,)


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_image_sizes_without_image_size_fail_at_first_batch_in_one_line(data_dir, workers):
    write_image(data_dir / "train" / "n000003" / "wide.jpg", size=(50, 30))
    module = FaceDataModule(data_dir, batch_size=13, num_workers=workers)
    module.setup("fit")
    with pytest.raises(DataError) as raised:
        next(iter(module.train_dataloader()))
    message = one_line(raised.value)  # what cli.run prints
    assert message.startswith("images of different sizes in one batch")
    assert "--image-size" in message and "\n" not in message


def test_dataloader_with_workers_yields_a_batch_and_module_pickles(data_dir):
    module = FaceDataModule(data_dir, batch_size=4, num_workers=2)
    module.setup("fit")
    module = pickle.loads(pickle.dumps(module))
    images, targets = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 40, 40) and images.dtype == torch.float32
    assert targets.dtype == torch.int64


def test_hyperparameters_survive_a_weights_only_checkpoint_load(data_dir, tmp_path):
    """Lightning saves them in every checkpoint, and resuming loads with weights_only=True."""
    torch.save(dict(FaceDataModule(data_dir).hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["data_dir"] == str(data_dir)


# --- bad layouts: one DataError line naming the path ----------------------------------------


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nowhere'}: data directory not found")):
        datamodule(tmp_path / "nowhere")


def test_missing_train_split(data_dir):
    (data_dir / "train").rename(data_dir / "training")
    with pytest.raises(DataError, match=re.escape(f"{data_dir / 'train'}: directory not found")):
        datamodule(data_dir)


def test_split_without_identity_folders(data_dir):
    shutil.rmtree(data_dir / "dev")
    write_image(data_dir / "dev" / "flat.jpg")
    with pytest.raises(DataError, match=re.escape(f"{data_dir / 'dev'}: no identity folders")):
        datamodule(data_dir)


def test_split_without_images(data_dir):
    for path in (data_dir / "dev").rglob("*.jpg"):
        path.with_suffix(".txt").write_text("x")
        path.unlink()
    with pytest.raises(DataError, match=re.escape(f"{data_dir / 'dev'}: no images")):
        datamodule(data_dir)


def test_empty_train_identity_folder_is_an_error_but_empty_dev_folder_is_fine(data_dir):
    (data_dir / "dev" / "n000001").mkdir()
    assert len(datamodule(data_dir).val_dataset) == 4
    (data_dir / "train" / "n000005").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{data_dir / 'train' / 'n000005'}: no images")):
        datamodule(data_dir)


# --- test images ---------------------------------------------------------------------


def test_test_images_are_sorted_by_file_name_flat(data_dir):
    module = datamodule(data_dir)
    images, names = next(iter(module.test_dataloader()))
    assert list(names) == ["000.jpg", "001.jpg", "002.jpg"] and images.shape == (3, 3, 40, 40)
    shutil.rmtree(data_dir / "test")
    with pytest.raises(DataError, match="test: directory not found"):
        datamodule(data_dir).test_dataloader()


def test_test_images_one_level_of_subfolders(tmp_path):
    write_image(tmp_path / "b" / "001.jpg")
    write_image(tmp_path / "a" / "002.jpg")
    write_image(tmp_path / "000.png")
    images = TestImages(tmp_path, eval_transform())
    assert [images[i][1] for i in range(len(images))] == ["000.png", "001.jpg", "002.jpg"]


def test_test_images_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        TestImages(tmp_path, eval_transform())
    write_image(tmp_path / "a" / "001.jpg")
    write_image(tmp_path / "b" / "001.jpg")
    with pytest.raises(DataError, match="same name as"):
        TestImages(tmp_path, eval_transform())


def test_unreadable_test_image_is_an_error_unless_skipped(tmp_path):
    write_image(tmp_path / "000.jpg")
    bad = write_bad_images(tmp_path)
    images = TestImages(tmp_path, eval_transform())
    assert len(images) == 4
    with pytest.raises(DataError, match=re.escape(f"{bad[2]}: unreadable image")):
        images[1]
    with pytest.warns(UserWarning, match="leaving out unreadable test image"):
        images = TestImages(tmp_path, eval_transform(), skip_bad=True)
    assert len(images) == 1 and sorted(images.skipped) == sorted(bad)
    assert images[0][1] == "000.jpg"


# --- mean/std and the stats command ----------------------------------------------------------


@pytest.fixture
def noisy_train(tmp_path):
    """Random PNGs (lossless, so numpy sees the same pixels) of three sizes, in two identities."""
    rng = np.random.default_rng(0)
    arrays = []
    for index, shape in enumerate([(20, 30, 3), (20, 30, 3), (40, 10, 3), (16, 16, 3)]):
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        path = tmp_path / "train" / f"n{index % 2}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        arrays.append(array / 255.0)
    return tmp_path / "train", arrays


def test_compute_mean_std_matches_numpy(noisy_train):
    train_dir, arrays = noisy_train
    pixels = np.concatenate([array.reshape(-1, 3) for array in arrays])
    mean, std = compute_mean_std(train_dir)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, np.mean([array.reshape(-1, 3).std(0, ddof=1) for array in arrays], 0), rtol=1e-6)
    mean_of_two, _ = compute_mean_std(train_dir, max_images=2)  # spread out: the first and last files
    first_and_last = np.concatenate([arrays[0].reshape(-1, 3), arrays[3].reshape(-1, 3)])
    np.testing.assert_allclose(mean_of_two, first_and_last.mean(0), rtol=1e-6)


def test_stats_command_prints_mean_and_std(noisy_train, capsys):
    train_dir, _ = noisy_train
    assert main(["stats", str(train_dir), "--image-size", "8", "--num-workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["mean", "std"]
    assert all(len(ast.literal_eval(line.split(" ", 1)[1])) == 3 for line in lines)


def test_stats_command_error_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "data.py", "stats", str(tmp_path / "missing")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    missing = tmp_path / "missing"
    assert result.stderr.splitlines() == [f"error: {missing}: directory not found (expected {missing}/<identity>/*.jpg)"]


def test_batch_augment_draws_its_parameters_per_image():
    torch.manual_seed(0)
    image = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)
    out = BatchAugment()(image.repeat(8, 1, 1, 1))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    distinct = {tuple(row.flatten()[:64].tolist()) for row in out}
    assert len(distinct) == 8  # eight different rotations/jitters of the same image


def test_batch_augment_without_jitter_or_rotation_only_flips_and_normalises():
    torch.manual_seed(0)
    images = (torch.rand(16, 3, 20, 20) * 255).to(torch.uint8)
    out = BatchAugment(degrees=0, jitter=0, hue=0)(images)
    mean, std = torch.tensor(KAGGLE_MEAN).view(1, 3, 1, 1), torch.tensor(KAGGLE_STD).view(1, 3, 1, 1)
    plain = (images.float() / 255 - mean) / std
    same = (out - plain).flatten(1).abs().amax(1) < 1e-4
    flipped = (out - plain.flip(-1)).flatten(1).abs().amax(1) < 1e-4
    assert (same | flipped).all()
    assert 2 <= flipped.sum() <= 14  # about half flipped


def test_augment_on_device_loads_uint8_and_augments_after_transfer(data_dir):
    module = datamodule(data_dir, augment_on_device=True)
    images, labels = next(iter(module.train_dataloader()))
    assert images.dtype == torch.uint8
    module.trainer = type("Trainer", (), {"training": True})()
    augmented, same_labels = module.on_after_batch_transfer((images, labels), 0)
    assert augmented.dtype == torch.float32 and augmented.shape == images.shape
    assert torch.equal(same_labels, labels)
    val_images, _ = next(iter(module.val_dataloader()))
    assert val_images.dtype == torch.float32  # evaluation still normalises on the CPU
