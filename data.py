"""Files to tensors: the Kaggle face images as a LightningDataModule.

Layout (Kaggle 11-785-f23-hw2p2-classification, and what synthetic_faces.py writes):
    DIR/train/<identity>/*.jpg   labelled; the sorted identity names define the class indices
    DIR/dev/<identity>/*.jpg     labelled by the same indices, matched by folder name
    DIR/test/*.jpg               unlabelled (flat, or one level of subfolders)

Problems with the data are a DataError: one line naming the path and what was expected.
Run `python data.py stats DIR/train` to measure the normalisation mean/std of another data set.
"""

import os
import warnings
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2
from tqdm import tqdm

from cli import ArgumentParser, UserError, at_least

KAGGLE_MEAN = (0.5103, 0.4014, 0.3509)
KAGGLE_STD = (0.2708, 0.2363, 0.2226)
NO_MATCH = "n000000"  # the sibling verification task's label for an unknown face matching no known identity
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# What PIL raises for a file it cannot decode: OSError covers UnidentifiedImageError (not an
# image, zero bytes) and "image file is truncated"; plugins raise SyntaxError and ValueError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError)


class DataError(UserError):
    """A problem with the user's data, told in one line naming the path and what was expected."""


def _compose(augmentation: list, mean, std, image_size: int | None) -> v2.Compose:
    # Resize first, so augmentation runs on the small image.
    resize = [v2.Resize((image_size, image_size))] if image_size else []
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(resize + augmentation + to_tensor)


def train_transform(mean=KAGGLE_MEAN, std=KAGGLE_STD, image_size: int | None = None) -> v2.Compose:
    """The seed's augmentation, then a normalised float32 CHW tensor."""
    augmentation = [v2.RandomRotation(30), v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2, 0.2)]
    return _compose(augmentation, mean, std, image_size)


def eval_transform(mean=KAGGLE_MEAN, std=KAGGLE_STD, image_size: int | None = None) -> v2.Compose:
    """A normalised float32 CHW tensor, the same every time."""
    return _compose([], mean, std, image_size)


def decode_transform(image_size: int | None = None) -> v2.Compose:
    """Decode (and resize) only, to a uint8 CHW tensor: the CPU half when BatchAugment runs the
    augmentation on the GPU. uint8 also moves a quarter of float32's bytes to the device."""
    resize = [v2.Resize((image_size, image_size))] if image_size else []
    return v2.Compose(resize + [v2.ToImage()])


class BatchAugment(torch.nn.Module):
    """The seed's train augmentation for a whole uint8 NCHW batch on its device, each image with
    its own random rotation, horizontal flip and colour jitter, then normalised.

    v2 transforms draw one set of parameters per call, so on a batch every image would get the
    same rotation and jitter; this draws them per image. Rotation samples with nearest
    neighbours and fills with black, as RandomRotation does. Hue is turned in YIQ space, a
    linear stand-in for ColorJitter's HSV hue shift; brightness, contrast and saturation are
    torchvision's formulas.
    """

    def __init__(self, mean=KAGGLE_MEAN, std=KAGGLE_STD, degrees: float = 30, jitter: float = 0.2, hue: float = 0.2):
        super().__init__()
        self.degrees, self.jitter, self.hue = degrees, jitter, hue
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        self.register_buffer("to_yiq", to_yiq)
        self.register_buffer("from_yiq", torch.linalg.inv(to_yiq))

    def _factor(self, n: int, spread: float, device) -> torch.Tensor:
        """One random factor per image, uniform in [1 - spread, 1 + spread]."""
        return torch.empty(n, 1, 1, 1, device=device).uniform_(1 - spread, 1 + spread)

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.to_yiq[0].view(1, 3, 1, 1)).sum(1, keepdim=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        n, device = x.shape[0], x.device
        x = torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, x.flip(-1), x)

        angle = torch.deg2rad(torch.empty(n, device=device).uniform_(-self.degrees, self.degrees))
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

        x = (x * self._factor(n, self.jitter, device)).clamp(0, 1)  # brightness
        mean_gray = self._gray(x).mean((2, 3), keepdim=True)
        x = (mean_gray + (x - mean_gray) * self._factor(n, self.jitter, device)).clamp(0, 1)  # contrast
        gray = self._gray(x)
        x = (gray + (x - gray) * self._factor(n, self.jitter, device)).clamp(0, 1)  # saturation

        turn = torch.empty(n, device=device).uniform_(-self.hue, self.hue) * 2 * torch.pi
        cos, sin, one, zero = turn.cos(), turn.sin(), torch.ones_like(turn), torch.zeros_like(turn)
        rows = [torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1), torch.stack([zero, sin, cos], 1)]
        hue_turn = self.from_yiq @ torch.stack(rows, 1) @ self.to_yiq  # (n, 3, 3), one per image
        x = torch.einsum("nij,njhw->nihw", hue_turn, x).clamp(0, 1)
        return (x - self.mean) / self.std


def load_rgb(path) -> Image.Image:
    """Decode a whole image as RGB (grayscale, RGBA, palette and CMYK files all convert).

    The full decode happens here, so a corrupt or truncated file fails in this call with one of
    DECODE_ERRORS; truncated files are never padded with grey (LOAD_TRUNCATED_IMAGES stays off).
    """
    with Image.open(path) as image:
        return image.convert("RGB")


def identity_folders(split_dir: Path) -> list[str]:
    """Sorted identity folder names of a split; hidden folders (.ipynb_checkpoints) are not identities."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: directory not found (expected {split_dir}/<identity>/*.jpg)")
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and entry.name[0] != ".")
    if not names:
        raise DataError(f"{split_dir}: no identity folders (expected {split_dir}/<identity>/*.jpg)")
    return names


class FaceFolder(ImageFolder):
    """One labelled split whose class indices come from `classes` (the train identities), not from
    its own folders: labels are looked up by folder name, so a dev split lacking some identities
    keeps the train indices, and folders not in `classes` are left out.

    Unreadable images (corrupt, truncated, empty, not an image) are found lazily rather than by a
    decode pass at start-up, which would cost minutes on the 140k real files: __getitem__ warns
    once per file, adds it to `skipped` and returns the next readable sample instead, so an epoch
    never stops on a bad file. With worker processes each worker keeps its own `skipped`.
    """

    def __init__(self, root, classes: list[str], transform):
        self.classes = classes  # read by find_classes, which ImageFolder calls while scanning root
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)
        if not self.samples:
            raise DataError(f"{root}: no images (expected {root}/<identity>/*.jpg)")
        self.skipped: set[str] = set()

    def find_classes(self, directory):
        return self.classes, {name: index for index, name in enumerate(self.classes)}

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except DECODE_ERRORS as error:
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {error}")
                continue
            return self.transform(image), target
        raise DataError(f"{self.root}: none of its {len(self.samples)} images can be read (expected JPEG/PNG)")


class TestImages(Dataset):
    """Every image under a test directory (flat, or one level of subfolders), sorted by file name,
    as (image tensor, file name) pairs: the file name is the submission's `id`.

    Every other entry is left out with one warning that names them and counts them in `ignored`:
    files of other types (.gif, .txt), broken links, folders deeper down. Hidden files and folders
    (.ipynb_checkpoints) are not test images, as they are not identities in train. An unreadable
    image is a DataError naming it, because the submission needs a row for every image. With
    skip_bad=True every image is decoded up front and the unreadable ones are left out and listed
    in `skipped`.
    """

    __test__ = False  # a dataset, not a pytest test class

    def __init__(self, root, transform, skip_bad: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: directory not found (expected test images {root}/*.jpg)")
        entries = visible(root)
        entries += [entry for folder in entries if folder.is_dir() for entry in visible(folder)]
        images = [path for path in entries if path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS)]
        self.ignored = sorted({*entries} - {*images} - {entry for entry in entries if entry.parent == root and entry.is_dir()})
        if self.ignored:
            warnings.warn(f"{root}: leaving out {len(self.ignored)} entries that are not images ("
                          f"{', '.join(map(str, self.ignored[:3]))}{', ...' if len(self.ignored) > 3 else ''}; "
                          f"expected {', '.join(IMG_EXTENSIONS)} files)")
        paths = sorted(images, key=lambda path: path.name)
        if not paths:
            raise DataError(f"{root}: no images (expected {root}/*.jpg or {root}/<folder>/*.jpg)")
        for first, second in zip(paths, paths[1:]):
            if first.name == second.name:
                raise DataError(f"{second}: same name as {first} (expected unique file names: they are the ids)")
        self.skipped: list[Path] = []
        if skip_bad:
            for path in tqdm(paths, desc=f"checking {root}", unit="img"):
                try:
                    load_rgb(path)
                except DECODE_ERRORS as error:
                    warnings.warn(f"leaving out unreadable test image {path}: {error}")
                    self.skipped.append(path)
        self.paths = [path for path in paths if path not in self.skipped]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = load_rgb(path)
        except DECODE_ERRORS as error:
            raise DataError(f"{path}: unreadable image ({error}); expected every test image to be readable") from error
        return self.transform(image), path.name


def visible(folder: Path) -> list[Path]:
    """The entries of a folder, hidden ones (a leading dot) left out."""
    return [folder / entry.name for entry in os.scandir(folder) if not entry.name.startswith(".")]


def collate_same_size(batch):
    """default_collate, but images of mixed sizes are a DataError rather than torch.stack's error."""
    sizes = sorted({tuple(image.shape[-2:]) for image, _ in batch})
    if len(sizes) > 1:
        raise DataError(f"images of different sizes in one batch {sizes}: resize them to one size, or train with "
                        "run_training.py --image-size N (its checkpoints then resize at inference too)")
    return default_collate(batch)


class FaceDataModule(L.LightningDataModule):
    """The train/dev/test splits of DIR as DataLoaders; see the module docstring for the layout.

    full: train on train + dev (dev when it exists; the seed's final run) with no validation.
    subset_classes=N: keep only the first N identities (sorted), with all their images, in both
    train and dev, for prototyping. num_workers=None: min(8, CPUs); pin_memory=None: with CUDA.
    augment_on_device: workers only decode; BatchAugment augments each train batch after it
    reaches the device, so a few CPU workers can keep a GPU fed.
    """

    def __init__(
        self,
        data_dir="data",
        batch_size: int = 256,
        num_workers: int | None = None,
        image_size: int | None = None,
        subset_classes: int | None = None,
        full: bool = False,
        mean=KAGGLE_MEAN,
        std=KAGGLE_STD,
        pin_memory: bool | None = None,
        augment_on_device: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        data_dir = str(data_dir)  # saved as text: a Path would stop torch.load(weights_only=True) resuming
        self.save_hyperparameters()
        self.num_workers = DEFAULT_WORKERS if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.class_names: list[str] = []
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self.batch_augment = BatchAugment(mean, std) if augment_on_device else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.class_names:
            return  # already scanned: the scripts call setup before Trainer.fit calls it again
        hp = self.hparams
        root = Path(hp.data_dir)
        if not root.is_dir():
            raise DataError(f"{root}: data directory not found (expected {root}/train and {root}/dev)")
        train_dir, dev_dir, test_dir = root / "train", root / "dev", root / "test"
        identities = identity_folders(train_dir)
        use_dev = not hp.full or dev_dir.is_dir()
        if use_dev:
            unknown = sorted(set(identity_folders(dev_dir)) - set(identities))
            if unknown:
                raise DataError(f"{dev_dir / unknown[0]}: identity not in {train_dir} (expected train identities)")
        if hp.subset_classes is not None and not 1 <= hp.subset_classes <= len(identities):
            expected = f"subset_classes from 1 to {len(identities)}, not {hp.subset_classes}"
            raise DataError(f"{train_dir}: has {len(identities)} identities (expected {expected})")
        class_names = identities[: hp.subset_classes]
        if len(class_names) < 2:
            raise DataError(f"{train_dir}: one identity, {class_names[0]} (expected at least 2 to tell apart)")

        if hp.augment_on_device:
            augment = decode_transform(hp.image_size)
        else:
            augment = train_transform(hp.mean, hp.std, hp.image_size)
        plain = eval_transform(hp.mean, hp.std, hp.image_size)
        train = FaceFolder(train_dir, class_names, augment)
        empty = sorted(set(class_names) - {class_names[target] for target in train.targets})
        if empty:
            raise DataError(f"{train_dir / empty[0]}: no images (expected some for every identity; {len(empty)} empty)")
        if hp.full:
            dev = [FaceFolder(dev_dir, class_names, augment)] if use_dev else []
            self.train_dataset = ConcatDataset([train, *dev])
            self.val_dataset = None
        else:
            self.train_dataset = train
            self.val_dataset = FaceFolder(dev_dir, class_names, plain)
        self.test_dataset = TestImages(test_dir, plain) if test_dir.is_dir() else None
        self.class_names = class_names

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.batch_augment is None or not self.trainer.training:
            return batch
        images, labels = batch
        return self.batch_augment.to(images.device)(images), labels

    def _loader(self, dataset, sampler=None, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.hparams.seed),  # the workers' seeds: not the global RNG's
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_same_size,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        # A last batch of one image would stop training: BatchNorm cannot train on one value per
        # channel, which is all the last stage holds at 32-63 px. So when a device's share is one
        # past a multiple of the batch size, each epoch leaves out one image (shuffled: a different
        # one each epoch); otherwise every image is used.
        world = self.trainer.world_size if self.trainer is not None else 1
        per_device = -(-len(self.train_dataset) // world)  # DistributedSampler pads to equal shares
        epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else (lambda: 0)
        return self._loader(EpochSeeded(self.train_dataset, self.hparams.seed), EpochShuffle(len(self.train_dataset), epoch),
                            drop_last=per_device % self.hparams.batch_size == 1)

    def val_dataloader(self):
        # Lightning skips validation for an empty list of loaders (full mode has no dev set).
        return [] if self.val_dataset is None else self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise DataError(f"{Path(self.hparams.data_dir) / 'test'}: directory not found (expected test images)")
        return self._loader(self.test_dataset)


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of the dataset's images that depends on the epoch alone, not on how the run got
    there, so a run resumed from a checkpoint sees each epoch's images in the order an uninterrupted
    run does. It hands out keys for EpochSeeded: epoch * size + index."""

    def __init__(self, size: int, epoch):
        self.size, self.epoch = size, epoch  # epoch: a function, read when each epoch starts

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch = self.epoch()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch))
        return iter((epoch * self.size + order).tolist())


class EpochSeeded(Dataset):
    """The dataset, each image augmented from a random state of its own, seeded by (seed, epoch,
    index): the same augmentation in an uninterrupted and a resumed run, in the main process or in
    any worker, and the global random state left alone for mixup and the network."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + key) % 2**63)
            return self.dataset[key % len(self.dataset)]


def compute_mean_std(train_dir, image_size: int | None = None, max_images: int | None = None, num_workers: int = 0):
    """Per-channel pixel mean over the images, and std as the seed defined it: the mean over images
    of each image's per-channel pixel std (torch's default, unbiased). Returns (mean, std) tuples.

    max_images takes that many images evenly spaced through the sorted files, so all identities
    are sampled rather than the first few.
    """
    train_dir = Path(train_dir)
    unnormalised = eval_transform(mean=(0, 0, 0), std=(1, 1, 1), image_size=image_size)
    images = FaceFolder(train_dir, identity_folders(train_dir), unnormalised)
    count = len(images) if max_images is None else min(max_images, len(images))
    indices = torch.linspace(0, len(images) - 1, count).long().tolist()
    # One image at a time (batch_size=None): without image_size their sizes may differ.
    loader = DataLoader(Subset(images, indices), batch_size=None, num_workers=num_workers)
    pixel_sum, std_sum, pixel_count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    spread = 0  # images of more than one pixel: a single pixel has no std
    for image, _ in tqdm(loader, desc=f"mean/std of {train_dir}", unit="img"):
        pixels = image.flatten(1).double()
        pixel_sum += pixels.sum(1)
        pixel_count += pixels.shape[1]
        if pixels.shape[1] > 1:
            std_sum += pixels.std(1)
            spread += 1
    if spread < count:
        warnings.warn(f"{train_dir}: {count - spread} images of one pixel left out of the std (a pixel has no spread)")
    if not spread:
        raise DataError(f"{train_dir}: every image is a single pixel, so there is no std (expected real images)")
    return tuple((pixel_sum / pixel_count).tolist()), tuple((std_sum / spread).tolist())


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="mean/std of a train split, for --mean/--std")
    stats.add_argument("train_dir", type=Path, help="a split laid out as <identity>/*.jpg")
    stats.add_argument("--image-size", type=at_least(1), help="resize to N x N first, as training would")
    stats.add_argument("--max-images", type=at_least(1), help="use N images spread over the split")
    stats.add_argument("--num-workers", type=at_least(0), default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    mean, std = compute_mean_std(args.train_dir, args.image_size, args.max_images, args.num_workers)
    print("mean", tuple(round(value, 4) for value in mean))
    print("std", tuple(round(value, 4) for value in std))
    return 0


if __name__ == "__main__":
    from cli import run

    run(main)
