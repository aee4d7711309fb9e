"""data.py on tiny image folders: label mapping, subsets, full mode, transforms, test images,
bad input (each a one-line DataError or a counted skip), and mean/std (the `stats` command: tests/test_commands.py)."""

import gc
import pickle
import re
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import torchvision
from torchvision.transforms import v2

import data
import run_training
from cli import one_line
from data import (
    KAGGLE_MEAN,
    KAGGLE_STD,
    BatchAugment,
    DataError,
    EncodedBatch,
    EpochShuffle,
    FaceDataModule,
    TestImages,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    compute_mean_std,
    decode_batch,
    eval_transform,
    load_image,
    rotate_and_flip,
    train_transform,
)

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


def test_centre_crop_keeps_the_middle_before_resizing_in_train_and_eval():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, 10:30, 10:30] = 255  # the centre half of each side is white, the rest black
    plain = dict(mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(eval_transform(**plain, crop=0.5)(image), torch.ones(3, 20, 20))
    assert torch.equal(eval_transform(**plain, image_size=8, crop=0.5)(image), torch.ones(3, 8, 8))
    assert eval_transform(**plain, image_size=8)(image).amin() == 0  # no crop: the border stays
    assert train_transform(image_size=8, crop=0.5)(image).shape == (3, 8, 8)
    jpeg = torchvision.io.encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))  # a batch holds JPEGs
    on_device, _ = decode_batch([jpeg, image], ["a.jpg", "centre.png"], torch.device("cpu"), 8, set(), crop=0.5)
    assert torch.equal(on_device[1], torch.full((3, 8, 8), 255, dtype=torch.uint8))  # augment_on_device crops too


def test_rotation_is_the_largest_angle_of_the_train_augmentation(data_dir):
    module = datamodule(data_dir, rotation=10)
    (augment,) = [step for step in module.train_dataset.transform.transforms if isinstance(step, BatchAugment)]
    assert augment.degrees == 10 and augment.sample(1000)["angle"].abs().max() <= 10
    assert datamodule(data_dir, rotation=10, augment_on_device=True).batch_augment.degrees == 10


def test_train_transform_is_random_and_eval_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    assert not torch.equal(train_transform()(image), train_transform()(image))
    assert torch.equal(eval_transform()(image), eval_transform()(image))


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.mark.parametrize("name, image, expected", [
    ("gray.jpg", Image.new("L", (40, 40), 128), (128, 128, 128)),
    ("bits.png", Image.new("1", (40, 40), 1), (255, 255, 255)),
    ("gray_alpha.png", Image.new("LA", (40, 40), (100, 0)), (100, 100, 100)),
    ("palette.png", Image.new("RGB", (40, 40), (200, 40, 90)).quantize(), (200, 40, 90)),
    ("rgba.png", Image.new("RGBA", (40, 40), (10, 20, 30, 0)), (10, 20, 30)),
    ("cmyk.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), (255, 0, 0)),
    ("cmyk.tif", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), (255, 0, 0)),
    ("ycbcr.tif", Image.new("YCbCr", (40, 40), (128, 128, 128)), (128, 128, 128)),
    ("lab.tif", Image.new("LAB", (40, 40), (255, 128, 128)), (254, 255, 254)),
    ("sixteen.png", Image.fromarray(np.full((40, 40), 40000, np.uint16)), (156, 156, 156)),  # 40000 >> 8
    ("sixteen_big_endian.tif", Image.new("I;16B", (40, 40), 20000), (78, 78, 78)),
])
def test_every_image_mode_loads_as_rgb_with_its_range(tmp_path, name, image, expected):
    """Each class of PIL mode, from a file of a known colour: the RGB mean is that colour (PIL's
    RGB conversion turned the 16-bit images pure white)."""
    path = save(tmp_path / name, image)
    pixels = load_image(path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 40, 40)
    assert pixels.float().mean((1, 2)).tolist() == list(expected)
    assert eval_transform()(pixels).shape == (3, 40, 40)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_images_without_a_defined_range_are_skipped_and_counted(data_dir, mode):
    path = save(data_dir / "train" / "n000001" / "wide.tif", Image.new(mode, (40, 40), 1000))
    assert Image.open(path).mode == mode
    with pytest.raises(ValueError, match=f"mode {mode} .* has no defined range"):
        load_image(path)
    module = datamodule(data_dir, batch_size=13)
    with pytest.warns(UserWarning, match="skipping unreadable image .*wide.tif: mode"):
        batches = list(module.train_dataloader())
    assert sum(len(targets) for _, targets in batches) == 13 and module.train_dataset.skipped == {str(path)}


def test_images_over_the_pixel_limit_are_counted_skips_and_named_test_errors(data_dir, monkeypatch):
    """PIL's decompression-bomb guard at a tiny limit: over it (where PIL only warns) and over twice
    it (where PIL raises) an image fails to load with one of DECODE_ERRORS, never a traceback."""
    warned = write_image(data_dir / "train" / "n000002" / "warned.png", size=(40, 40))  # 1,600 px
    raised = write_image(data_dir / "train" / "n000002" / "raised.jpg", size=(50, 50))  # 2,500 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombWarning, match="exceeds limit of 1000 pixels"):
        load_image(warned)
    with pytest.raises(Image.DecompressionBombError):
        load_image(raised)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the fixture's 40 x 40 px images are within it
    module = datamodule(data_dir, batch_size=14)
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned_about:
        assert sum(len(targets) for _, targets in module.train_dataloader()) == 14
    assert module.train_dataset.skipped == {str(raised)}
    assert sum("skipping unreadable image" in str(w.message) for w in warned_about) == 1
    big_test = write_image(data_dir / "test" / "003.png", size=(50, 50))
    with pytest.raises(DataError, match=re.escape(f"{big_test}: unreadable image")):
        TestImages(data_dir / "test", eval_transform())[3]
    with pytest.warns(UserWarning, match="leaving out unreadable test image"):
        assert len(TestImages(data_dir / "test", eval_transform(), skip_bad=True)) == 3


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
    with pytest.raises(OSError, match="truncated"):
        load_image(truncated)


def test_unreadable_train_images_are_skipped_counted_and_epoch_completes(data_dir):
    bad = write_bad_images(data_dir / "train" / "n000002")
    module = datamodule(data_dir, batch_size=5)
    assert len(module.train_dataset) == 15
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned:
        batches = list(module.train_dataloader())
    assert sum(len(targets) for _, targets in batches) == 15
    assert module.train_dataset.skipped == {str(path) for path in bad}
    assert sum("skipping unreadable image" in str(w.message) for w in warned) == 3


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
    # the traceback holds the loader's iterator: its workers go now, not when the garbage collector
    # happens to run in a later test, where their pipes' teardown could close a new fork's descriptor
    del raised
    gc.collect()
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


# --- the augmentation: BatchAugment against v2's transforms, image by image ------------------------


@pytest.fixture(scope="module")
def faces():
    """16 synthetic face JPEGs (48 px), decoded: real images, not noise."""
    from synthetic_faces import generate

    root = Path(__import__("tempfile").mkdtemp()) / "faces"
    generate(root, identities=4, train_per_identity=4, dev_per_identity=0, test_per_identity=0, image_size=48, workers=1)
    return torch.stack([load_image(path) for path in sorted((root / "train").rglob("*.jpg"))])


def v2_by_image(image: torch.Tensor, angle: float, flip: bool, order: list[int], factors: list[float]) -> torch.Tensor:
    """The original's train transform, v2's own classes on a uint8 tensor, with given parameters."""
    image = v2.RandomRotation(30).transform(image, dict(angle=angle))
    image = v2.RandomHorizontalFlip(1.0).transform(image, {}) if flip else image
    names = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    image = v2.ColorJitter(0.2, 0.2, 0.2, 0.2).transform(image, dict(fn_idx=order, **dict(zip(names, factors))))
    return v2.Normalize(KAGGLE_MEAN, KAGGLE_STD)(v2.ToDtype(torch.float32, scale=True)(image))


def test_each_batch_operation_equals_v2_image_by_image(faces):
    torch.manual_seed(0)
    n = len(faces)
    angles, flips = torch.empty(n).uniform_(-30, 30), torch.arange(n) % 2 == 0
    rotated = rotate_and_flip(faces, angles.tolist(), flips)
    for image, out, angle, flip in zip(faces, rotated, angles.tolist(), flips):
        expected = v2.functional.rotate(image, angle, v2.InterpolationMode.NEAREST, fill=0)
        assert torch.equal(out, v2.functional.horizontal_flip(expected) if flip else expected)
    assert (rotated == 0).float().mean() > (faces == 0).float().mean() + 0.05  # corners filled with black
    for ours, theirs, (low, high) in [(adjust_brightness, v2.functional.adjust_brightness, (0.8, 1.2)),
                                      (adjust_contrast, v2.functional.adjust_contrast, (0.8, 1.2)),
                                      (adjust_saturation, v2.functional.adjust_saturation, (0.8, 1.2)),
                                      (adjust_hue, v2.functional.adjust_hue, (-0.5, 0.5))]:
        factors = torch.empty(n).uniform_(low, high)
        out = ours(faces, factors.view(n, 1, 1, 1))
        for image, result, factor in zip(faces, out, factors.tolist()):
            assert torch.equal(result, theirs(image, factor)), ours.__name__
        assert not torch.equal(out, faces)


def test_batch_augment_equals_v2_transforms_image_by_image(faces):
    torch.manual_seed(0)
    augment = BatchAugment()
    params = augment.sample(len(faces))
    out = augment(faces, params)
    assert out.dtype == torch.float32 and out.shape == faces.shape
    for i, image in enumerate(faces):
        expected = v2_by_image(image, params["angle"][i].item(), bool(params["flip"][i]), params["order"][i].tolist(),
                               params["factors"][i].tolist())
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)
    assert len({tuple(row.flatten()[:64].tolist()) for row in out}) == len(faces)  # each its own parameters


def test_batch_augment_draws_v2s_parameter_distributions():
    torch.manual_seed(0)
    n = 24_000
    params = BatchAugment().sample(n)
    assert v2.RandomRotation(30).degrees == [-30.0, 30.0]
    angles = params["angle"]
    assert -30 <= angles.min() < -29.9 and 29.9 < angles.max() <= 30
    assert abs(angles.mean()) < 0.5 and abs(angles.std() - 60 / 12**0.5) < 0.3  # uniform
    assert abs(params["flip"].float().mean() - 0.5) < 0.02
    orders = {tuple(order) for order in params["order"].tolist()}
    assert len(orders) == 24  # every order of the four adjustments, about equally often
    counts = torch.unique(params["order"], dim=0, return_counts=True)[1].float()
    assert (counts / n - 1 / 24).abs().max() < 0.006
    jitter = v2.ColorJitter(0.2, 0.2, 0.2, 0.2)
    for column, (low, high) in enumerate([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]):
        factors = params["factors"][:, column]
        assert low <= factors.min() < low + 0.001 and high - 0.001 < factors.max() <= high
        assert abs(factors.mean() - (low + high) / 2) < 0.003 and abs(factors.std() - (high - low) / 12**0.5) < 0.003


def test_train_transform_is_batch_augment_on_one_image(faces):
    torch.manual_seed(3)
    expected = BatchAugment()(faces[:1])[0]
    torch.manual_seed(3)
    assert torch.equal(train_transform()(faces[0]), expected)


def test_batch_augment_without_jitter_or_rotation_only_flips_and_normalises():
    torch.manual_seed(0)
    images = (torch.rand(16, 3, 20, 20) * 255).to(torch.uint8)
    out = BatchAugment(degrees=0, brightness=0, contrast=0, saturation=0, hue=0)(images)
    mean, std = torch.tensor(KAGGLE_MEAN).view(1, 3, 1, 1), torch.tensor(KAGGLE_STD).view(1, 3, 1, 1)
    plain = (images.float() / 255 - mean) / std
    same = (out - plain).flatten(1).abs().amax(1) < 1e-4
    flipped = (out - plain.flip(-1)).flatten(1).abs().amax(1) < 1e-4
    assert (same | flipped).all()
    assert 2 <= flipped.sum() <= 14  # about half flipped


# --- decoding on the device (here the CPU: the same code path) --------------------------------


class FakeTrainer:
    training, world_size, current_epoch = True, 1, 0
    strategy = type("Strategy", (), {"root_device": torch.device("cpu")})()


def test_augment_on_device_reads_bytes_decodes_after_the_workers_and_skips_damaged_jpegs(data_dir):
    truncated, zero, _ = write_bad_images(data_dir / "train" / "n000003")  # the truncated JPEG's header is fine
    png = write_image(data_dir / "train" / "n000003" / "lossless.png", colour=(1, 2, 3))
    module = datamodule(data_dir, batch_size=16, augment_on_device=True, image_size=32)
    with pytest.warns(UserWarning, match="skipping unreadable image .*(zero|text).jpg"):  # found by the worker
        images, targets, paths = next(iter(module.train_dataloader()))
    assert len(images) == 16 and {image.ndim for image in images} == {1, 3}  # JPEG bytes, the PNG decoded
    assert images[paths.index(str(png))].shape == (3, 40, 40)
    module.trainer = FakeTrainer()
    with pytest.warns(UserWarning, match=re.escape(f"skipping unreadable image {truncated}: JPEG data is damaged")):
        augmented, kept_targets = module.on_before_batch_transfer(EncodedBatch(images, targets, paths), 0)
    kept = 16 - paths.count(str(truncated))  # a file the workers skipped is replaced by the next, maybe this one
    assert augmented.dtype == torch.float32 and augmented.shape == (kept, 3, 32, 32) and len(kept_targets) == kept
    assert module.skipped == {str(truncated)}
    example = torch.zeros(1, 3, 32, 32)  # any other batch (the model summary's example input) goes as it is
    assert module.on_before_batch_transfer(example, 0) is example
    val_images, _ = next(iter(module.val_dataloader()))
    assert val_images.dtype == torch.float32  # evaluation still decodes and normalises on the CPU


def test_decoded_on_device_equals_decoded_by_the_workers(data_dir):
    module = datamodule(data_dir, batch_size=12, augment_on_device=True)
    module.trainer = FakeTrainer()
    images, _, paths = next(iter(module.train_dataloader()))
    decoded, _ = decode_batch(images, paths, torch.device("cpu"), None, set())
    assert torch.equal(decoded, torch.stack([load_image(path) for path in paths]))


def test_lightning_fits_with_augmentation_on_the_device(data_dir):
    module = FaceDataModule(data_dir, batch_size=16, num_workers=0, augment_on_device=True)
    probe = Probe(num_classes=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=module)
    assert probe.steps == {"train": 1, "val": 1}


def test_each_epoch_takes_the_order_of_its_own_epoch(data_dir, monkeypatch):
    """Lightning tells the sampler the epoch (set_epoch): the order follows the run's seed and the
    epoch, so epochs differ and a resumed run's epoch equals an uninterrupted run's."""
    orders = []
    decode = data.decode_batch

    def recording(images, paths, *args):
        orders.append(list(paths))
        return decode(images, paths, *args)

    monkeypatch.setattr(data, "decode_batch", recording)
    module = FaceDataModule(data_dir, batch_size=12, num_workers=0, augment_on_device=True, seed=3)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(Probe(num_classes=4), datamodule=module)
    samples = module.train_dataset.samples
    expected = []
    for epoch in range(3):
        shuffle = EpochShuffle(len(samples), seed=3)
        shuffle.set_epoch(epoch)
        expected.append([samples[key % len(samples)][0] for key in shuffle])
    assert orders == expected and len({tuple(order) for order in orders}) == 3


@pytest.mark.parametrize("choice, accelerator, on", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("auto", "gpu", True), ("on", "cpu", True), ("off", "cuda", False),
])
def test_augment_on_device_defaults_to_the_gpu(choice, accelerator, on):
    assert run_training.parse_args([]).augment_on_device == "auto"
    assert run_training.parse_args(["--augment-on-device", choice, "--accelerator", accelerator]).hardware()[2] is on
