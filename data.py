"""Files to tensors: the Kaggle face images as a LightningDataModule.

Layout (Kaggle 11-785-f23-hw2p2-classification, and what synthetic_faces.py writes):
    DIR/train/<identity>/*.jpg   labelled; the sorted identity names define the class indices
    DIR/dev/<identity>/*.jpg     labelled by the same indices, matched by folder name
    DIR/test/*.jpg               unlabelled (flat, or one level of subfolders)

`python data.py stats DIR/train` measures another set's normalisation mean/std; `python data.py split
SRC DIR` lays out a folder of identity folders (SRC/<person>/*.jpg) as above, with DIR/test_labels.csv.
"""

import functools
import io
import math
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2
from tqdm import tqdm

from cli import ArgumentParser, UserError, at_least, atomic_folder, run, write_csv

KAGGLE_MEAN = (0.5103, 0.4014, 0.3509)
KAGGLE_STD = (0.2708, 0.2363, 0.2226)
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# What load_image raises for a file it cannot decode: OSError covers a missing file, PIL's
# UnidentifiedImageError (not an image, zero bytes) and truncated data; PIL's plugins raise
# SyntaxError and ValueError; an image over PIL.Image.MAX_IMAGE_PIXELS raises one of the two last.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grayscale


class DataError(UserError):
    """A problem with the user's data, told in one line naming the path and what was expected."""


def centre_crop(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keeps the centre `fraction` of each side: a face crop that still holds background (LFW's
    150 px cuts) gives the face more of the network's few pixels."""
    height, width = image.shape[-2:]
    return v2.functional.center_crop(image, [round(height * fraction), round(width * fraction)])


def _resize(image_size: int | None, crop: float = 1.0) -> list:
    """The geometry every transform shares: the centre crop (1: none), then the resize."""
    cropped = [functools.partial(centre_crop, fraction=crop)] if crop < 1 else []
    return cropped + ([v2.Resize((image_size, image_size))] if image_size else [])


AUTO_AUGMENT = {"none": None, "trivial": v2.TrivialAugmentWide, "rand": v2.RandAugment}


def train_transform(mean=KAGGLE_MEAN, std=KAGGLE_STD, image_size: int | None = None, auto_augment: str = "none",
                    random_erasing: float = 0.0, crop: float = 1.0, rotation: float = 30) -> v2.Compose:
    """The original's augmentation (BatchAugment on one image) after the crop and resize, so that it
    works on the small image. Off by default, as in the original: `auto_augment` before it, on the
    uint8 image, and `random_erasing`, the chance of blanking a box to the mean (0 once normalised), after it."""
    auto = [AUTO_AUGMENT[auto_augment]()] if AUTO_AUGMENT[auto_augment] else []
    erasing = [v2.RandomErasing(random_erasing)] if random_erasing > 0 else []
    return v2.Compose(_resize(image_size, crop) + [v2.ToImage(), *auto, BatchAugment(mean, std, rotation), *erasing])


def eval_transform(mean=KAGGLE_MEAN, std=KAGGLE_STD, image_size: int | None = None, crop: float = 1.0) -> v2.Compose:
    """A normalised float32 CHW tensor, the same every time (centre crop, then resize)."""
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(_resize(image_size, crop) + to_float)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 as v2.ToDtype(torch.uint8, scale=True) does it (scale just under 256, truncate)."""
    return x.mul(255 + 1.0 - 1e-3).to(torch.uint8)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """v2's luma of uint8 RGB images, floored, as float32 (n, 1, H, W)."""
    r, g, b = images.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """v2's blend of uint8 images, one ratio per image: addcmul rounds as v2's add(alpha=) does."""
    return torch.addcmul(images.mul(ratio), other, 1 - ratio).clamp_(0, 255).to(torch.uint8)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2's brightness of uint8 images, one factor per image (n, 1, 1, 1); so are the next two."""
    return images.mul(factor).clamp_(0, 255).to(torch.uint8)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2's HSV hue shift of uint8 RGB images, one shift per image (n, 1, 1, 1), in the same float32
    operations, with the channel max/min and the HSV-to-RGB selection done in fewer passes."""
    x = images.to(torch.float32).mul_(1.0 / 255)
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    spread = v - torch.minimum(torch.minimum(r, g), b)
    # v2 divides by 1 where a pixel is grey (spread 0, numerators 0); a tiny floor gives the same 0
    s = spread / v.clamp_min(1e-9)
    rc, gc, bc = (v.unsqueeze(1) - x).div_(spread.clamp_min(1e-9).unsqueeze(1)).unbind(1)
    top = torch.maximum(torch.maximum(images[:, 0], images[:, 1]), images[:, 2])  # compared in uint8: cheaper
    red_top, green_top = top == images[:, 0], top == images[:, 1]
    h = (bc - gc).mul_(red_top) + (rc + 2.0).sub_(bc).mul_(green_top & ~red_top)
    h += (gc + 4.0).sub_(rc).mul_(~(red_top | green_top))
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0).add_(factor.view(-1, 1, 1)).remainder_(1.0)

    h6 = h.mul_(6)
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = _to_uint8((1.0 - sxf).mul_(v).clamp_(0.0, 1.0))
    t = _to_uint8(sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0))
    p = _to_uint8(one_minus_s.mul_(v).clamp_(0.0, 1.0))
    v = _to_uint8(v)
    # HSV to RGB: sector i (6 is 0) picks each channel from v, q, t, p, as v2's table does; one of
    # the masks is set per pixel, so a sum of masked uint8 values is the selection
    sector = sector.to(torch.uint8)
    s0, s1, s2, s3, s4, s5 = ((sector == i).view(torch.uint8) for i in range(6))  # 0/1 without a copy
    s0 = s0 + (sector == 6).view(torch.uint8)
    red = v * (s0 + s5) + q * s1 + t * s4 + p * (s2 + s3)
    green = v * (s1 + s2) + q * s3 + t * s0 + p * (s4 + s5)
    blue = v * (s3 + s4) + q * s5 + t * s2 + p * (s0 + s1)
    return torch.stack((red, green, blue), 1)


def rotate_and_flip(images: torch.Tensor, angles: list[float], flip: torch.Tensor) -> torch.Tensor:
    """v2's rotate of uint8 images about their centres (nearest neighbour, filled with 0; one angle in
    degrees, counter-clockwise, per image), then a horizontal flip where `flip` is set: v2's matrix and
    sampling grid for all images at once. A flipped image samples the grid's columns in reverse."""
    n, _, height, width = images.shape
    device = images.device
    turns = [math.radians(-(angle % 360)) for angle in angles]
    theta = torch.tensor([[math.cos(a), -math.sin(a), math.sin(a), math.cos(a)] for a in turns])
    theta = theta.view(n, 2, 2).div_(torch.tensor([0.5 * width, 0.5 * height]))
    theta = theta.to(device, non_blocking=True).view(n, 4, 1, 1)  # non_blocking: no wait for the GPU
    x = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device).view(1, 1, width)
    x = torch.where(flip.to(device, non_blocking=True).view(n, 1, 1), x.flip(-1), x)
    y = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device).view(1, height, 1)
    grid = torch.stack((x * theta[:, 0] + y * theta[:, 2], x * theta[:, 1] + y * theta[:, 3]), -1)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="nearest", align_corners=False)
    return out.round_().to(torch.uint8)


class BatchAugment(torch.nn.Module):
    """The original's train augmentation of a uint8 NCHW batch (or one CHW image) on its device, then
    normalised to float32. v2 transforms draw one set of parameters per call, the same for a whole
    batch; this draws them per image from v2's distributions and applies v2's formulas
    (RandomRotation(degrees), RandomHorizontalFlip, ColorJitter's four adjustments in a random order):
    on the CPU, v2's results image by image, bit for bit. Drawn on the CPU, they keep a GPU from waiting."""

    def __init__(self, mean=KAGGLE_MEAN, std=KAGGLE_STD, degrees: float = 30, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.2):
        super().__init__()
        self.degrees = degrees
        self.spreads = (brightness, contrast, saturation, hue)  # 0 leaves the adjustment out, as in v2
        self.ranges = [(1 - spread, 1 + spread) for spread in self.spreads[:3]] + [(-hue, hue)]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def sample(self, n: int) -> dict:
        """Per image: angle ~ U(-degrees, degrees), flip with p 0.5, a uniformly random order of the
        four colour adjustments and each factor uniform in its range, as v2 draws them."""
        factors = torch.stack([torch.empty(n).uniform_(low, high) for low, high in self.ranges], 1)
        return dict(angle=torch.empty(n).uniform_(-self.degrees, self.degrees), flip=torch.rand(n) < 0.5,
                    order=torch.rand(n, 4).argsort(1), factors=factors)

    def forward(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if images.ndim == 3:  # one image, in train_transform
            return self(images.unsqueeze(0), params).squeeze(0)
        params = self.sample(len(images)) if params is None else params
        x = rotate_and_flip(images, params["angle"].tolist(), params["flip"])
        factors = params["factors"].view(-1, 4, 1, 1, 1)
        adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        orders = params["order"].tolist()
        for step in range(4):
            for op, adjust in enumerate(adjustments):
                chosen = [i for i, order in enumerate(orders) if order[step] == op]
                if self.spreads[op] and chosen:
                    x = _on_some(x, chosen, adjust, factors[:, op])
        return (x.float().mul_(1 / 255) - self.mean) / self.std


def _on_some(images: torch.Tensor, chosen: list[int], adjust, factors: torch.Tensor) -> torch.Tensor:
    """images with adjust(the chosen ones, their factors) applied to the chosen ones. The indices
    come from the CPU, so a GPU batch never waits."""
    if len(chosen) == len(images):
        return adjust(images, factors.to(images.device, non_blocking=True))
    index = torch.tensor(chosen)
    on_device = index.to(images.device, non_blocking=True)
    chosen_factors = factors[index].to(images.device, non_blocking=True)
    return images.index_copy(0, on_device, adjust(images.index_select(0, on_device), chosen_factors))


def read_header(data: bytes) -> Image.Image:
    """PIL's lazy open of encoded bytes: format, size and mode, nothing decoded yet. An image over
    PIL.Image.MAX_IMAGE_PIXELS raises here, where PIL would only warn up to twice that limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:  # its message names the BytesIO object, not the file
            raise UnidentifiedImageError("not an image file PIL can identify") from None


def decode_image(data: bytes, keep_jpeg: bool = False) -> torch.Tensor:
    """Encoded image bytes to a uint8 RGB CHW tensor, every pixel with its full range. JPEGs decode
    through torchvision.io (libjpeg-turbo, as PIL, but faster), other formats through PIL; 16-bit
    grayscale keeps its top 8 bits (PIL's RGB conversion clips it to white), 32-bit integer and float
    pixels, with no defined range, raise a ValueError. Truncated data raises OSError, never pads with
    grey. keep_jpeg: an RGB or grayscale JPEG stays encoded, a 1-D uint8 tensor of its bytes (its header
    read, so that a file that is no image, or over the size limit, fails here); a CMYK one, whose colours
    nvjpeg need not convert as libjpeg does, is decoded."""
    header = read_header(data)
    if header.format == "JPEG":
        jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if keep_jpeg and header.mode != "CMYK":
            return jpeg
        try:
            return decode_jpeg(jpeg, mode=ImageReadMode.RGB)
        except RuntimeError as error:  # torchvision's message starts with its source file's path
            raise OSError(f"JPEG data is damaged: {str(error).rpartition(', ')[2]}") from error
    with header as image:
        image.load()  # the whole decode: a truncated file fails here
        if image.mode in SIXTEEN_BIT_MODES:
            gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return torch.from_numpy(gray).expand(3, *gray.shape).contiguous()
        if image.mode in ("I", "F"):
            kind = "integer" if image.mode == "I" else "float"
            raise ValueError(f"mode {image.mode} (32-bit {kind} pixels) has no defined range; save it as 8 or 16 bits")
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def load_image(path, keep_jpeg: bool = False) -> torch.Tensor:
    """The one image loader of every command: a file to a uint8 RGB CHW tensor (see decode_image).
    Failures raise one of DECODE_ERRORS, naming what is wrong but not the path."""
    return decode_image(Path(path).read_bytes(), keep_jpeg)


read_encoded = functools.partial(load_image, keep_jpeg=True)  # for decoding on the device


def decode_error(path: Path) -> Exception | None:
    try:
        load_image(path)
    except DECODE_ERRORS as error:
        return error
    return None


def skip_once(skipped: set[str], path: str, error: Exception) -> None:
    if path not in skipped:
        skipped.add(path)
        warnings.warn(f"skipping unreadable image {path}: {error}")


def identity_folders(split_dir: Path) -> list[str]:
    """Sorted identity folder names of a split; hidden folders (.ipynb_checkpoints) are not identities."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: directory not found (expected {split_dir}/<identity>/*.jpg)")
    names = sorted(path.name for path in visible(split_dir) if path.is_dir())
    if not names:
        raise DataError(f"{split_dir}: no identity folders (expected {split_dir}/<identity>/*.jpg)")
    return names


class FaceFolder(ImageFolder):
    """One labelled split whose class indices come from `classes` (the train identities), looked up
    by folder name: a dev split lacking some identities keeps the train indices, and folders not in
    `classes` are left out. An unreadable image is found when it is read, not by a decode pass at
    start-up (minutes on the 140k real files): it is warned about once, added to `skipped` (per
    worker process) and replaced by the next readable sample, so an epoch never stops on a bad file."""

    def __init__(self, root, classes: list[str], transform, loader=load_image, with_paths: bool = False):
        self.classes = classes  # read by find_classes, which ImageFolder calls while scanning root
        self.with_paths = with_paths  # (image, target, path): to name a file that fails later
        super().__init__(root, transform=transform, loader=loader, allow_empty=True)
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
                skip_once(self.skipped, path, error)
                continue
            image = image if self.transform is None else self.transform(image)
            return (image, target, path) if self.with_paths else (image, target)
        raise DataError(f"{self.root}: none of its {len(self.samples)} images can be read (expected JPEG/PNG)")


class TestImages(Dataset):
    """Every image under a test directory (flat, or one level of subfolders), sorted by file name,
    as (image tensor, file name) pairs: the file name is the submission's `id`. Other entries (other
    file types, broken links, deeper folders) are left out with one warning and listed in `ignored`;
    hidden ones are no test images. An unreadable image is a DataError naming it, as the submission
    needs a row for each; skip_bad=True decodes every image up front and lists the unreadable ones in
    `skipped` instead. `paths` (find_images): those images in that order instead of the folder's."""

    __test__ = False  # a dataset, not a pytest test class

    def __init__(self, root, transform, skip_bad: bool = False, paths: list[Path] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: directory not found (expected test images {root}/*.jpg)")
        self.ignored: list[Path] = []
        if paths is None:
            images, self.ignored = image_files(root)
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
        for path in tqdm(paths, desc=f"checking {root}", unit="img") if skip_bad else []:
            if error := decode_error(path):
                warnings.warn(f"leaving out unreadable test image {path}: {error}")
                self.skipped.append(path)
        self.paths = [path for path in paths if path not in self.skipped]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = load_image(path)
        except DECODE_ERRORS as error:
            raise DataError(f"{path}: unreadable image ({error}); expected every test image to be readable") from error
        return self.transform(image), path.name


def image_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(images, other entries) of a folder and of its subfolders one level down, hidden ones left
    out: the layouts TestImages reads (its subfolders themselves are neither)."""
    entries = visible(root)
    entries += [entry for folder in entries if folder.is_dir() for entry in visible(folder)]
    images = [path for path in entries if path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS)]
    others = sorted({*entries} - {*images} - {entry for entry in entries if entry.parent == root and entry.is_dir()})
    return images, others


def find_images(root, names, source) -> list[Path]:
    """The file each of `names` (in order) means under `root`: a path relative to it, identity
    folders included (LFW's Name/Name_0001.jpg), or a bare file name that root or exactly one of its
    subfolders holds (the flat and one-level layouts of TestImages). Only stats files, so that every
    name is checked before any image is read: a missing one is a DataError naming the first and the
    count, an ambiguous bare name one naming its folders; `source` is the file that names them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: directory not found (expected the images that {source} names)")
    paths = {name: root / name for name in names}
    if bare := [name for name, path in paths.items() if Path(name).name == name and not path.is_file()]:
        by_name: dict[str, list[Path]] = {}
        for path in sorted(image_files(root)[0]):
            by_name.setdefault(path.name, []).append(path)
        for name in bare:
            found = by_name.get(name, [])
            if len(found) > 1:
                folders = f"{found[0].parent.name}, {found[1].parent.name}{', ...' if len(found) > 2 else ''}"
                raise DataError(f"{source}: {name} is in {len(found)} folders of {root} ({folders}): "
                                f"name it as <folder>/{name}")
            paths[name] = found[0] if found else paths[name]
    if missing := [name for name, path in paths.items() if not path.is_file()]:
        raise DataError(f"{source}: {missing[0]} is not an image in {root} ({len(missing)} of the {len(paths)} names "
                        "missing; expected paths relative to it, <identity>/<file>.jpg, or file names it holds)")
    return list(paths.values())


def visible(folder: Path) -> list[Path]:
    return [folder / entry.name for entry in os.scandir(folder) if not entry.name.startswith(".")]


def collate_same_size(batch):
    """default_collate, but images of mixed sizes are a DataError rather than torch.stack's error."""
    sizes = sorted({tuple(image.shape[-2:]) for image, _ in batch})
    if len(sizes) > 1:
        raise DataError(f"images of different sizes in one batch {sizes}: resize them to one size, or train with "
                        "run_training.py --image-size N (its checkpoints then resize at inference too)")
    return default_collate(batch)


class EncodedBatch(NamedTuple):
    """A train batch for decoding on the device: JPEG bytes (1-D uint8) or images the workers decoded,
    their targets, and their paths (to name a file that fails). A type of its own, so that the data
    module decodes these and passes every other batch (dev, the model summary's example) as it is."""

    images: list[torch.Tensor]
    targets: torch.Tensor
    paths: list[str]


def collate_encoded(batch) -> EncodedBatch:
    images, targets, paths = zip(*batch)
    return EncodedBatch(list(images), torch.tensor(targets), list(paths))


def decode_batch(images: list[torch.Tensor], paths: list[str], device: torch.device, image_size: int | None,
                 skipped: set[str], crop: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """Decodes a batch of JPEG bytes on `device` (batched nvjpeg on CUDA), crops and resizes it as
    the CPU transforms do, and stacks it into one uint8 batch. When the batched decode fails, each
    JPEG is decoded alone, on the CPU where the device refuses it; those that fail are left out, as
    FaceFolder leaves them (skip_once). Returns the batch and the indices kept."""
    jpegs = [i for i, image in enumerate(images) if image.ndim == 1]
    decoded = {i: image.to(device, non_blocking=True) for i, image in enumerate(images) if image.ndim == 3}
    try:
        if jpegs:  # a batch of PNGs (decoded by the workers) has none: decode_jpeg refuses an empty list
            decoded |= dict(zip(jpegs, decode_jpeg([images[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)))
    except RuntimeError:
        for i in jpegs:
            try:
                decoded[i] = decode_jpeg(images[i], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                try:
                    decoded[i] = decode_image(images[i].numpy().tobytes()).to(device, non_blocking=True)
                except DECODE_ERRORS as error:
                    skip_once(skipped, paths[i], error)
    kept = sorted(decoded)
    if not kept:
        raise DataError(f"{paths[0]}: none of the {len(paths)} images of a batch can be read (expected JPEG/PNG)")
    batch = [decoded[i] for i in kept]
    for step in _resize(image_size, crop):
        batch = [step(image) for image in batch]
    return collate_same_size([(image, 0) for image in batch])[0], kept


def train_identities(train_dir: Path, dev_dir: Path | None, subset_classes: int | None) -> list[str]:
    """The identities to tell apart: train's, or its first subset_classes; each of dev's must be one of train's."""
    identities = identity_folders(train_dir)
    if dev_dir is not None and (unknown := sorted(set(identity_folders(dev_dir)) - set(identities))):
        raise DataError(f"{dev_dir / unknown[0]}: identity not in {train_dir} (expected train identities)")
    if subset_classes is not None and not 1 <= subset_classes <= len(identities):
        expected = f"subset_classes from 1 to {len(identities)}, not {subset_classes}"
        raise DataError(f"{train_dir}: has {len(identities)} identities (expected {expected})")
    if len(identities[:subset_classes]) < 2:
        raise DataError(f"{train_dir}: one identity, {identities[0]} (expected at least 2 to tell apart)")
    return identities[:subset_classes]


class FaceDataModule(L.LightningDataModule):
    """The train/dev/test splits of DIR as DataLoaders; see the module docstring for the layout.

    full: train on train + dev (dev when it exists; the seed's final run) with no validation.
    subset_classes=N: the first N identities (sorted), with all their images, for prototyping.
    num_workers=None: min(8, CPUs); memory is pinned with CUDA. augment_on_device: the workers only
    read the train JPEGs' bytes; each batch is decoded, resized and augmented (BatchAugment) where the
    model is, so a few CPU workers keep a GPU fed; files that fail there are listed in `skipped`.
    auto_augment, random_erasing: see train_transform (the CPU's, so not with augment_on_device).
    """

    def __init__(self, data_dir="data", batch_size: int = 256, num_workers: int | None = None,
                 image_size: int | None = None, subset_classes: int | None = None, full: bool = False,
                 mean=KAGGLE_MEAN, std=KAGGLE_STD, augment_on_device: bool = False, seed: int = 0,
                 auto_augment: str = "none", random_erasing: float = 0.0, crop: float = 1.0, rotation: float = 30):
        super().__init__()
        data_dir = str(data_dir)  # saved as text: a Path would stop torch.load(weights_only=True) resuming
        # the input's size and normalisation are the model's, saved with it (predict.py reads them there)
        self.save_hyperparameters(ignore=["image_size", "crop", "mean", "std"])
        self.image_size, self.crop, self.mean, self.std = image_size, crop, tuple(mean), tuple(std)
        self.num_workers = DEFAULT_WORKERS if num_workers is None else num_workers
        self.class_names: list[str] = []
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self.batch_augment = BatchAugment(mean, std, rotation) if augment_on_device else None
        self.skipped: set[str] = set()  # train files that failed to decode on the device

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
        use_dev = not hp.full or dev_dir.is_dir()
        class_names = train_identities(train_dir, dev_dir if use_dev else None, hp.subset_classes)
        if hp.augment_on_device:
            train_args = dict(transform=None, loader=read_encoded, with_paths=True)
        else:
            train_args = dict(transform=train_transform(self.mean, self.std, self.image_size, hp.auto_augment,
                                                        hp.random_erasing, self.crop, hp.rotation))
        plain = eval_transform(self.mean, self.std, self.image_size, self.crop)
        train = FaceFolder(train_dir, class_names, **train_args)
        if empty := sorted(set(class_names) - {class_names[target] for target in train.targets}):
            raise DataError(f"{train_dir / empty[0]}: no images (expected some for every identity; {len(empty)} empty)")
        if hp.full:
            dev = [FaceFolder(dev_dir, class_names, **train_args)] if use_dev else []
            self.train_dataset = ConcatDataset([train, *dev])
        else:
            self.train_dataset, self.val_dataset = train, FaceFolder(dev_dir, class_names, plain)
        self.test_dataset = TestImages(test_dir, plain) if test_dir.is_dir() else None
        self.class_names = class_names

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """An EncodedBatch is decoded, resized and augmented where the model is; any other goes as it is."""
        if not isinstance(batch, EncodedBatch):
            return batch
        device = self.trainer.strategy.root_device
        images, kept = decode_batch(batch.images, batch.paths, device, self.image_size, self.skipped, self.crop)
        return self.batch_augment.to(device)(images), batch.targets[kept]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the network's input: the resize, or the first train image, cropped."""
        if self.image_size:
            return 3, self.image_size, self.image_size
        if self.hparams.augment_on_device:  # the workers' bytes or image, decoded and cropped as a train batch is
            image, _, path = self.train_dataset[0]
            return tuple(decode_batch([image], [path], torch.device("cpu"), None, set(), self.crop)[0].shape[1:])
        return tuple(self.train_dataset[0][0].shape)  # transformed, cropped included

    def _loader(self, dataset, sampler=None, drop_last: bool = False, collate_fn=collate_same_size) -> DataLoader:
        workers_seed = torch.Generator().manual_seed(self.hparams.seed)  # not the global random state
        return DataLoader(dataset, self.hparams.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_fn, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                          generator=workers_seed, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        # BatchNorm cannot train on a last batch of one image (one value per channel in the last stage
        # at 32-63 px): when a device's share is one past a multiple of the batch size, each epoch leaves
        # out one (shuffled) image
        world = self.trainer.world_size if self.trainer is not None else 1
        per_device = -(-len(self.train_dataset) // world)  # DistributedSampler pads to equal shares
        collate = collate_encoded if self.hparams.augment_on_device else collate_same_size
        shuffle = EpochShuffle(len(self.train_dataset), self.hparams.seed)
        return self._loader(EpochSeeded(self.train_dataset, self.hparams.seed), shuffle,
                            drop_last=per_device % self.hparams.batch_size == 1, collate_fn=collate)

    def val_dataloader(self):
        # Lightning skips validation for an empty list of loaders (full mode has no dev set).
        return [] if self.val_dataset is None else self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise DataError(f"{Path(self.hparams.data_dir) / 'test'}: directory not found (expected test images)")
        return self._loader(self.test_dataset)


def seed_of(seed: int, key: int) -> int:
    """The random seed of one epoch (or one image of one) of a run seeded with `seed`."""
    return (seed * 1_000_003 + key) % 2**63


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of the dataset's images that depends on the run's seed and the epoch alone, so a
    resumed run sees each epoch's images in the order an uninterrupted one does. Lightning calls
    set_epoch before each epoch (under DDP through its DistributedSampler wrapper). It hands out keys
    for EpochSeeded: epoch * size + index."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed_of(self.seed, self.epoch)))
        return iter((self.epoch * self.size + order).tolist())


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
            torch.manual_seed(seed_of(self.seed, key))
            return self.dataset[key % len(self.dataset)]


def compute_mean_std(train_dir, image_size: int | None = None, max_images: int | None = None, num_workers: int = 0):
    """Per-channel pixel mean over the images, and std as the seed defined it: the mean over images
    of each image's per-channel pixel std (unbiased), as (mean, std) tuples. max_images: that many
    images evenly spaced through the sorted files, so that every identity is sampled."""
    train_dir = Path(train_dir)
    unnormalised = eval_transform(mean=(0, 0, 0), std=(1, 1, 1), image_size=image_size)
    images = FaceFolder(train_dir, identity_folders(train_dir), unnormalised)
    count = len(images) if max_images is None else min(max_images, len(images))
    indices = torch.linspace(0, len(images) - 1, count).long().tolist()
    # One image at a time (batch_size=None): without image_size their sizes may differ.
    loader = DataLoader(Subset(images, indices), batch_size=None, num_workers=num_workers)
    pixel_sum, pixel_count, stds = torch.zeros(3, dtype=torch.float64), 0, []
    for image, _ in tqdm(loader, desc=f"mean/std of {train_dir}", unit="img"):
        pixels = image.flatten(1).double()
        pixel_sum += pixels.sum(1)
        pixel_count += pixels.shape[1]
        if pixels.shape[1] > 1:  # a single pixel has no std
            stds.append(pixels.std(1))
    if len(stds) < count:
        warnings.warn(f"{train_dir}: {count - len(stds)} images of one pixel left out of the std "
                      "(a pixel has no spread)")
    if not stds:
        raise DataError(f"{train_dir}: every image is a single pixel, so there is no std (expected real images)")
    return tuple((pixel_sum / pixel_count).tolist()), tuple((sum(stds) / len(stds)).tolist())


SPLITS = ("train", "dev", "test")


def split_sizes(n: int, dev: float, test: float) -> tuple[int, int, int]:
    """(train, dev, test) image counts of an identity with n images: dev and test each take
    round(n * fraction), at least 1 when the fraction is above 0, and train the rest. Rounding each
    fraction on its own gives the README's LFW split (2,080 train images); flooring, ceiling or
    rounding dev + test together do not."""
    n_dev = max(1, round(n * dev)) if dev > 0 else 0
    n_test = max(1, round(n * test)) if test > 0 else 0
    return n - n_dev - n_test, n_dev, n_test


def check_split_settings(min_images: int, cap: int | None, dev: float, test: float) -> None:
    """Refuse settings that would leave some kept identity without a train image, before any file
    is read. Identities keep min(images, cap) >= min(min_images, cap) images; past 3 / (1 - dev -
    test) images train always gets some (dev and test each take at most n * fraction + 1)."""
    if not (0 <= dev < 1 and 0 <= test < 1 and dev + test < 1):
        raise UserError(f"--dev {dev} and --test {test} leave nothing for train (expected fractions summing under 1)")
    low = min(min_images, cap) if cap else min_images
    high = cap if cap else max(low, math.ceil(3 / (1 - dev - test)))
    if bad := [n for n in range(low, high + 1) if split_sizes(n, dev, test)[0] < 1]:
        flags = "--min-images and --cap" if cap and bad[-1] >= cap else "--min-images"
        raise UserError(f"an identity of {bad[0]} images would get no train image with --dev {dev} --test {test} "
                        f"(each takes round(n * fraction), at least 1): use {flags} {bad[-1] + 1} or more, "
                        "or smaller fractions")


def plan_split(src, min_images: int = 3, cap: int | None = None, dev: float = 0.2, test: float = 0.2,
               seed: int = 0) -> tuple[dict, list, int]:
    """Which images of src/<identity>/ go to which split, writing nothing: ({split: {identity:
    [paths]}}, the unreadable files as (path, error), the number of identities left out for having
    fewer than min_images readable images). Each image file is decoded in full (a truncated one is
    found here, not in training), unless its identity has too few files to be kept. An identity's
    readable images, sorted by name, are shuffled by a generator seeded with (seed, identity), so
    neither the file system's order nor the other identities change its split; the first `cap` are
    cut by split_sizes."""
    src = Path(src)
    splits, unreadable, dropped = {split: {} for split in SPLITS}, [], 0
    for identity in tqdm(identity_folders(src), desc=f"reading {src}", unit="identity", disable=None):
        files = sorted(path for path in visible(src / identity)
                       if path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS))
        errors = {path: decode_error(path) for path in files} if len(files) >= min_images else {}
        unreadable += [(path, error) for path, error in errors.items() if error]
        readable = [path for path, error in errors.items() if not error]
        if len(readable) < min_images:
            dropped += 1
            continue
        random.Random(f"{seed} {identity}").shuffle(readable)  # a str seed is hashed by SHA-512: stable everywhere
        readable = readable[:cap]
        start = 0
        for split, size in zip(SPLITS, split_sizes(len(readable), dev, test)):
            if size:
                splits[split][identity] = readable[start:start + size]
            start += size
    return splits, unreadable, dropped


def flat_test_names(splits: dict) -> dict[Path, str]:
    """The flat test/ file name of each test image: its own name, or <identity>_<name> for every
    one of them when two identities hold images of the same name (a submission's ids are the file
    names, so they must be unique)."""
    names = [path.name for split in splits.values() for paths in split.values() for path in paths]
    shared = len(set(names)) < len(names)  # decided on all images, so it does not change with the seed
    test = {path: f"{identity}_{path.name}" if shared else path.name
            for identity, paths in splits["test"].items() for path in paths}
    by_name = sorted(test, key=test.get)
    for first, second in zip(by_name, by_name[1:]):
        if test[first] == test[second]:
            raise DataError(f"{second}: test name {test[second]} is also {first}'s "
                            "(expected unique file names: rename one)")
    return test


def split_identities(src, out, min_images: int = 3, cap: int | None = None, dev: float = 0.2, test: float = 0.2,
                     seed: int = 0, link: bool = False) -> dict:
    """Writes plan_split's split of src into out (see write_split), which must be new or empty.
    Returns the counts."""
    src, out = Path(src), Path(out)
    check_split_settings(min_images, cap, dev, test)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: not empty (expected a new or empty folder: split writes over nothing)")
    if out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"{out}: inside {src}, where it would be read as an identity (expected a folder outside it)")
    splits, unreadable, dropped = plan_split(src, min_images, cap, dev, test, seed)
    if unreadable:
        named = "; ".join(f"{path} ({error})" for path, error in unreadable[:3])
        warnings.warn(f"{src}: {len(unreadable)} unreadable files left out of every split: {named}"
                      f"{'; ...' if len(unreadable) > 3 else ''}")
    if not splits["train"]:
        raise DataError(f"{src}: no identity has {min_images} readable images (expected some, or a lower --min-images)")
    write_split(splits, flat_test_names(splits), out, link)
    counts = {split: sum(map(len, splits[split].values())) for split in SPLITS}
    return dict(identities=len(splits["train"]), **counts, dropped=dropped, unreadable=len(unreadable))


def write_split(splits: dict, test_names: dict[Path, str], out: Path, link: bool) -> None:
    """out/train/<identity>/, out/dev/<identity>/, a flat out/test/ and out/test_labels.csv (id,label,
    as synthetic_faces.py writes it), copies or with link=True symlinks, written into a hidden sibling
    and renamed into place (atomic_folder): an interrupted split leaves nothing behind."""
    place = (lambda source, target: target.symlink_to(source.resolve())) if link else shutil.copyfile
    with atomic_folder(out) as partial:
        for identity in tqdm(splits["train"], desc=f"writing {out}", unit="identity", disable=None):
            for split in SPLITS:
                for path in splits[split].get(identity, []):
                    target = partial / split / (test_names[path] if split == "test" else f"{identity}/{path.name}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    place(path, target)
        if test_names:
            rows = sorted((name, path.parent.name) for path, name in test_names.items())
            write_csv(partial / "test_labels.csv", [("id", "label"), *rows])


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="mean/std of a train split, for --mean/--std")
    stats.add_argument("train_dir", type=Path, help="a split laid out as <identity>/*.jpg")
    stats.add_argument("--image-size", type=at_least(1), help="resize to N x N first, as training would")
    stats.add_argument("--max-images", type=at_least(1), help="use N images spread over the split")
    stats.add_argument("--num-workers", type=at_least(0), default=DEFAULT_WORKERS)
    split = commands.add_parser(
        "split", help="lay out a folder of identity folders as train/dev/test",
        description="Splits SRC/<identity>/*.jpg (LFW's images/, say) into OUT/train/<identity>/, "
        "OUT/dev/<identity>/, a flat OUT/test/ and OUT/test_labels.csv (id,label; beside test/, not in it, "
        "for predict.py evaluate --labels). Every image goes to one split and every kept identity to each "
        "of them; unreadable files are named and left out. OUT must be new or empty.")
    split.add_argument("src", metavar="SRC", type=Path, help="a folder of identity folders, SRC/<identity>/*.jpg")
    split.add_argument("out", metavar="OUT", type=Path, help="the new (or empty) folder to write")
    split.add_argument("--min-images", type=at_least(1), default=3, metavar="K",
                       help="keep identities with at least K readable images (default 3: one per split)")
    split.add_argument("--cap", type=at_least(1), metavar="N",
                       help="at most N images per identity: the first N of its seeded shuffle")
    split.add_argument("--dev", type=at_least(0, float), default=0.2, metavar="F",
                       help="each identity's share for dev, round(n * F) and at least 1 "
                       "(0: no dev/; train with --full)")
    split.add_argument("--test", type=at_least(0, float), default=0.2, metavar="F",
                       help="the same for test/, whose file names are the submission's ids: when two identities "
                       "hold files of the same name, every test file is named <identity>_<name>")
    split.add_argument("--seed", type=int, default=0,
                       help="each identity's images, sorted by name, are shuffled with (seed, identity): "
                       "the same seed gives the same split")
    split.add_argument("--link", action="store_true",
                       help="symlink the images instead of copying them: no extra disk, but OUT then needs SRC "
                       "where it is (symlinks, not hard links: they cross file systems and show their source)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "split":
        counts = split_identities(args.src, args.out, args.min_images, args.cap, args.dev, args.test, args.seed,
                                  args.link)
        print(f"{args.out}: {counts['identities']} identities; {counts['train']} train, {counts['dev']} dev, "
              f"{counts['test']} test images ({'linked' if args.link else 'copied'} from {args.src}); skipped "
              f"{counts['dropped']} identities with under {args.min_images} readable images, "
              f"{counts['unreadable']} unreadable files")
        return 0
    mean, std = compute_mean_std(args.train_dir, args.image_size, args.max_images, args.num_workers)
    print("mean", tuple(round(value, 4) for value in mean))
    print("std", tuple(round(value, 4) for value in std))
    return 0


if __name__ == "__main__":
    run(main)
