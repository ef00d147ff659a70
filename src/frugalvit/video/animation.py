"""A side-by-side animation of a dense and an eventful dense-prediction model on a clip.

Four panels per frame: the input | the dense model's map | the eventful
model's map | how many gates recomputed each token this frame (dark: kept
from earlier frames; bright: recomputed in every layer). Written as a GIF with
Pillow (which matplotlib already depends on), so it needs no video encoder.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor
from torch.nn import functional as F

PANEL_TITLES = ("frame", "dense", "eventful", "tokens recomputed")


class SideBySide:
    """Collects frames through `add` (usable as `compare_on_frames`' `on_frame`), then renders a GIF."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], grid: tuple[int, int], prefix_tokens: int,
                 gates: int, every: int = 1) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.grid, self.prefix_tokens, self.gates, self.every = grid, prefix_tokens, gates, every
        self.panels: list[Tensor] = []  # (H, 4W, 3) uint8 per kept frame

    def add(self, index: int, frame: Tensor, dense: Tensor, eventful: Tensor, updated: Tensor | None) -> None:
        if index % self.every:
            return
        image = (frame.detach().cpu().float() * self.std + self.mean).clamp(0, 1)
        size = image.shape[-2:]
        maps = [_colour(_fit(m[0].detach().cpu().float(), size), "inferno", 0.0, 1.0) for m in (dense, eventful)]
        if updated is None:
            share = torch.ones(*self.grid)
        else:
            share = updated[0, self.prefix_tokens:].float().reshape(*self.grid).cpu() / self.gates
        tokens = _colour(F.interpolate(share[None, None], size=size, mode="nearest")[0], "viridis", 0.0, 1.0)
        self.panels.append(torch.cat([image, *maps, tokens], dim=-1).permute(1, 2, 0).mul(255).round().byte())

    def gif_bytes(self, milliseconds_per_frame: int = 80, header: str = "") -> bytes:
        """The collected frames as an animated GIF, each panel titled; `header` is written above them."""
        from PIL import Image, ImageDraw

        if not self.panels:
            raise ValueError("no frames were collected for the animation")
        height, width = self.panels[0].shape[:2]
        band = 14 * (2 if header else 1)
        images = []
        for panel in self.panels:
            canvas = Image.new("RGB", (width, height + band), "white")
            canvas.paste(Image.fromarray(panel.numpy()), (0, band))
            draw = ImageDraw.Draw(canvas)
            if header:
                draw.text((4, 1), header, fill="black")
            for i, title in enumerate(PANEL_TITLES):
                draw.text((i * width // 4 + 4, band - 13), title, fill="black")
            images.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE))
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                       duration=milliseconds_per_frame, loop=0, optimize=True)
        return buffer.getvalue()


def _fit(image: Tensor, size: torch.Size) -> Tensor:
    """(1, h, w) or (h, w) map resized to `size`, as (1, H, W)."""
    image = image.reshape(1, 1, *image.shape[-2:])
    if image.shape[-2:] != size:
        image = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)
    return image[0]


def _colour(values: Tensor, name: str, low: float | None = None, high: float | None = None) -> Tensor:
    """(1, H, W) values -> (3, H, W) RGB in [0, 1] through a matplotlib colour map."""
    from matplotlib import colormaps

    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    scaled = ((values[0] - low) / max(high - low, 1e-12)).clamp(0, 1)
    rgb = colormaps[name](scaled.numpy())[..., :3]
    return torch.from_numpy(rgb).float().permute(2, 0, 1)
