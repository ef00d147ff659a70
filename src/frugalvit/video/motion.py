"""Global motion between frames, and dense-prediction maps moved by it (motion-compensated holding).

Why: a held output (keyframe-and-hold, or an eventful model's held frame)
is stale by however far the scene moved since it was computed. When the
camera pans, most of that staleness is a translation, and moving the held
map by the measured translation removes it for almost nothing (three FFTs
of the grey frame: at most ~6 M multiply-accumulates at 224 px, 0.08% of
the saliency ViT-S's 7.6 GMACs). On `bikes.mp4` (the
camera pans 11-19 px per frame at 224 px) this lifts keyframe-and-hold K=4
from Pearson r 0.70 to 0.87; see docs/eventful.md, "Motion-compensated
holding".

Both functions work on batches, follow their inputs' device and dtype and
never synchronise with the host (the shift stays a tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grey(frames: Tensor) -> Tensor:
    """(B, C, H, W) or (B, H, W) -> (B, H, W) float32 with its per-frame mean removed."""
    if frames.dim() not in (3, 4):
        raise ValueError(f"frames must be (B, C, H, W) or (B, H, W), got shape {tuple(frames.shape)}")
    frames = frames.float()
    if frames.dim() == 4:
        frames = frames.mean(dim=1)
    return frames - frames.mean(dim=(-2, -1), keepdim=True)


def global_shift(reference: Tensor, current: Tensor) -> Tensor:
    """The whole-pixel translation from `reference` to `current`, by phase correlation.

    Args:
        reference, current: frames (B, C, H, W) or (B, H, W), same shape (any
            normalisation: only their structure matters).

    Returns:
        (B, 2) int64 (dy, dx) on the frames' device such that
        current[y, x] ~ reference[y - dy, x - dx]: the content moved dy pixels
        down and dx right. Shifts range over [-H/2, H/2) x [-W/2, W/2): a larger
        one aliases, and across a scene cut the result is meaningless (the
        correlation has no clear peak), as is any single shift for motion
        that is not a translation (zoom, rotation, objects moving on their own).

    A Hann window suppresses the frame borders' discontinuity, and the
    normalised cross-power spectrum makes the peak depend on structure, not
    brightness.
    """
    if reference.shape != current.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and current {tuple(current.shape)} differ in shape")
    a, b = _grey(reference), _grey(current)
    height, width = a.shape[-2:]
    window = (torch.hann_window(height, device=a.device)[:, None]
              * torch.hann_window(width, device=a.device)[None, :])
    cross = torch.fft.rfft2(b * window) * torch.fft.rfft2(a * window).conj()
    correlation = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-12), s=(height, width))
    peak = correlation.flatten(1).argmax(dim=1)
    dy, dx = peak // width, peak % width
    dy = torch.where(dy >= (height + 1) // 2, dy - height, dy)
    dx = torch.where(dx >= (width + 1) // 2, dx - width, dx)
    return torch.stack([dy, dx], dim=1)


def shift_maps(maps: Tensor, shift: Tensor) -> Tensor:
    """Maps (B, C, H, W) moved by whole pixels: out[y, x] = maps[y - dy, x - dx], edges replicated.

    Args:
        maps: dense outputs at frame resolution, e.g. saliency maps.
        shift: (B, 2) (dy, dx) per map in pixels, as `global_shift` returns; the
            shift of the frames the maps were computed at, so a map computed at
            a smaller size needs the shift scaled first (fractional shifts are
            rounded to the nearest pixel).

    Exact for whole pixels (a gather, no interpolation); the area that moved
    into view has no earlier output and repeats the nearest edge row/column.
    """
    if maps.dim() != 4 or shift.shape != (maps.shape[0], 2):
        raise ValueError(f"maps must be (B, C, H, W) and shift (B, 2); got {tuple(maps.shape)} and "
                         f"{tuple(shift.shape)}")
    height, width = maps.shape[-2:]
    shift = (shift.round() if shift.is_floating_point() else shift).to(device=maps.device, dtype=torch.long)
    rows = (torch.arange(height, device=maps.device)[None, :] - shift[:, :1]).clamp(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=maps.device)[None, :] - shift[:, 1:]).clamp(0, width - 1)  # (B, W)
    channels = maps.shape[1]
    moved = maps.gather(2, rows[:, None, :, None].expand(-1, channels, -1, width))
    return moved.gather(3, cols[:, None, None, :].expand(-1, channels, height, -1))
